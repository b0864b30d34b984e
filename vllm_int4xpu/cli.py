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
  vllm-int4xpu quantize HuggingFaceTB/SmolLM2-135M-Instruct ./smol-gptq --method gptq
  vllm-int4xpu convert ./hqq-saved-model ./hqq-int4xpu
  vllm-int4xpu inspect ./SmolLM2-135M-int4
  vllm-int4xpu selfcheck --device auto
  vllm serve ./SmolLM2-135M-int4 --quantization int4xpu
"""


def _quantize(args: argparse.Namespace) -> int:
    from .quantizer import quantize_model

    zero = "none" if args.sym else (args.zero_point or
                                    ("float" if args.method == "hqq" else "int"))
    out = quantize_model(args.src, args.out, group_size=args.group_size, zero_point=zero,
                         skip=["lm_head", *[m for m in args.skip if m != "lm_head"]],
                         progress=not args.quiet, method=args.method, act_order=args.act_order,
                         calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                         damp=args.damp, classic_gptq=args.classic_gptq,
                         revision=args.revision)
    print(f"wrote int4xpu checkpoint ({args.method}, group {args.group_size}, zero point {zero}) "
          f"to {out}")
    print(f"serve it with: vllm serve {out}   (its config names int4xpu: no --quantization "
          "flag needed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-int4xpu", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="int4 weight-only quantization for vLLM (--quantization int4xpu): Intel GPUs "
                    "(oneDNN / Triton), CUDA (Triton) and CPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser(
        "quantize", help="quantize a bf16/fp16/fp32 Hugging Face model (directory or model id)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="int4 quantization of every nn.Linear weight and MoE expert (lm_head, "
                    "embeddings and MoE routers stay unquantized) into a native int4xpu "
                    "checkpoint. Tokenizer and config files are copied. Writes to a temporary "
                    "directory and renames at the end; refuses to overwrite.\n\n"
                    "methods:\n"
                    "  rtn   round to nearest from each group's min/max (seconds)\n"
                    "  hqq   half-quadratic optimisation of float zero points, no data (seconds)\n"
                    "  gptq  error compensation from calibration activations, one decoder layer\n"
                    "        at a time on the CPU (minutes); int or float zero points; --act-order\n"
                    "        writes g_idx; --calib FILE or the built-in text sample")
    q.add_argument("src", help="source model: a directory (config.json + safetensors) or a "
                               "Hugging Face model id org/name (from the local cache when "
                               "HF_HUB_OFFLINE=1; cache at HF_HOME)")
    q.add_argument("out", help="new output directory (must not exist)")
    q.add_argument("--revision", default=None,
                   help="branch, tag or commit of a model id (default: main)")
    q.add_argument("--method", choices=["rtn", "hqq", "gptq"], default="rtn",
                   help="quantization method (default rtn; see above)")
    q.add_argument("--group-size", type=int, default=64,
                   help="input channels per scale group; -1 = per output channel (default 64)")
    q.add_argument("--zero-point", choices=["int", "float"], default=None,
                   help="int: integer zero points (GPTQ/AWQ style); float: float zero points "
                        "w = (q-8)*s + z (HQQ/torchao style; served at integer speed). Default: "
                        "int, float for --method hqq (the only kind it writes).")
    q.add_argument("--sym", action="store_true", help="symmetric: no zero points (zp = 8)")
    q.add_argument("--skip", nargs="*", default=[], metavar="MODULE",
                   help="more modules to leave unquantized: a name, a dotted suffix, a glob or "
                        "'re:REGEX' (lm_head, embeddings and MoE routers are never quantized); "
                        "'--skip experts' keeps mixture-of-experts experts in bf16 (default: "
                        "experts are int4)")
    q.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns by decreasing activation energy (writes g_idx)")
    q.add_argument("--calib", default=None, metavar="FILE",
                   help="gptq: calibration text (UTF-8; documents separated by '=====' lines); "
                        "default: the built-in sample")
    q.add_argument("--nsamples", type=int, default=32,
                   help="gptq: most calibration windows to use, evenly spread over the text "
                        "(default 32; the built-in sample has 57 windows of 512 tokens)")
    q.add_argument("--damp", type=float, default=0.01,
                   help="gptq: added to the Hessian's diagonal, as a fraction of its mean "
                        "(default 0.01)")
    q.add_argument("--seqlen", type=int, default=512,
                   help="gptq: tokens per calibration window (default 512)")
    q.add_argument("--classic-gptq", action="store_true",
                   help="gptq: quantize each linear towards its own output on the quantized "
                        "model's inputs, as GPTQ did originally (default: towards the float "
                        "model's output on the float model's inputs, which also compensates the "
                        "error of earlier layers, at the cost of a second forward stream)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_quantize)

    i = sub.add_parser("inspect", help="describe an int4 checkpoint and the backend that would run it",
                       add_help=False)
    i.set_defaults(func=lambda a: _forward(FORWARDED["inspect"], a.rest))
    i.add_argument("rest", nargs=argparse.REMAINDER)

    c = sub.add_parser("convert", help="rewrite a checkpoint vLLM cannot load in place (HQQ's "
                                       "own qmodel.pt save, ...) into the native format, losslessly",
                       add_help=False)
    c.set_defaults(func=lambda a: _forward(FORWARDED["convert"], a.rest))
    c.add_argument("rest", nargs=argparse.REMAINDER)

    s = sub.add_parser("selfcheck", help="check every kernel backend on this device against float64",
                       add_help=False)
    s.set_defaults(func=lambda a: _forward(FORWARDED["selfcheck"], a.rest))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


FORWARDED = {"inspect": "vllm_int4xpu.inspect", "selfcheck": "vllm_int4xpu.selfcheck",
             "convert": "vllm_int4xpu.convert"}


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
