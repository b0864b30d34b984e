"""``vllm-int4xpu``: quantize models, inspect checkpoints, self-check kernels.

Subcommands import their heavy dependencies lazily so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import Int4FormatError

EPILOG = """examples:
  vllm-int4xpu quantize ./SmolLM2-135M ./SmolLM2-135M-int4 --group-size 64 --zero-point int
  vllm-int4xpu inspect ./SmolLM2-135M-int4
  vllm-int4xpu selfcheck --device auto
  vllm serve ./SmolLM2-135M-int4 --quantization int4xpu
"""


def _quantize(args: argparse.Namespace) -> int:
    from .quantizer import quantize_model

    zero = "none" if args.sym else args.zero_point
    out = quantize_model(args.src, args.out, group_size=args.group_size, zero_point=zero,
                         skip=["lm_head", *[m for m in args.skip if m != "lm_head"]],
                         progress=not args.quiet)
    print(f"wrote int4xpu checkpoint (group {args.group_size}, zero point {zero}) to {out}")
    print(f"serve it with: vllm serve {out}   (its config names int4xpu: no --quantization "
          "flag needed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-int4xpu", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="int4 weight-only quantization for vLLM (--quantization int4xpu): Intel GPUs "
                    "(oneDNN / Triton), CUDA (Triton) and CPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a bf16/fp16/fp32 Hugging Face model directory",
                       description="Round-to-nearest int4 quantization of every nn.Linear weight "
                                   "(lm_head and embeddings stay unquantized) into a native int4xpu "
                                   "checkpoint. Tokenizer and config files are copied. Writes to a "
                                   "temporary directory and renames at the end; refuses to overwrite.")
    q.add_argument("src", help="source model directory (config.json + safetensors)")
    q.add_argument("out", help="new output directory (must not exist)")
    q.add_argument("--group-size", type=int, default=64,
                   help="input channels per scale group; -1 = per output channel (default 64)")
    q.add_argument("--zero-point", choices=["int", "float"], default="int",
                   help="int: integer zero points (GPTQ/AWQ style, fastest on XPU); float: float "
                        "zero points w = (q-8)*s + z (HQQ/torchao style). Default int.")
    q.add_argument("--sym", action="store_true", help="symmetric: no zero points (zp = 8)")
    q.add_argument("--skip", nargs="*", default=[], metavar="MODULE",
                   help="more modules to leave unquantized: a name, a dotted suffix, a glob or "
                        "'re:REGEX' (lm_head, embeddings and MoE routers are never quantized); "
                        "'--skip experts' keeps mixture-of-experts experts in bf16 (default: "
                        "experts are int4)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quantize)

    i = sub.add_parser("inspect", help="describe an int4 checkpoint and the backend that would run it",
                       add_help=False)
    i.set_defaults(func=lambda a: _forward(FORWARDED["inspect"], a.rest))
    i.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("selfcheck", help="check every kernel backend on this device against float64",
                       add_help=False)
    s.set_defaults(func=lambda a: _forward(FORWARDED["selfcheck"], a.rest))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


FORWARDED = {"inspect": "vllm_int4xpu.inspect", "selfcheck": "vllm_int4xpu.selfcheck"}


def _forward(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:
        # argparse's REMAINDER drops a remainder that starts with an option (``selfcheck
        # --device cpu`` failed with "unrecognized arguments"): hand the rest over as is.
        try:
            return _forward(FORWARDED[argv[0]], argv[1:])
        except Int4FormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Int4FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
