"""AutoRound (tuned) 4-bit asymmetric checkpoints of SmolLM2-135M-Instruct (producers venv).

    HF_HUB_OFFLINE=1 /work/producers-venv/bin/python benchmarks/producers/autoround_smollm2.py \
        --src /work/e2e-models/smollm2-bf16 --out-root /work/accuracy-models --groups 32 64 128 \
        --calib vllm_int4xpu/data/calibration.txt [--iters 100]

auto-round 0.16.1 SignRound tuning (not RTN): bits 4, asymmetric, group G, seqlen 512, on CPU.
Calibration: the documents of ``--calib`` (split on lines equal to ``=====``) passed as a list
of strings; nsamples = number of documents (at most 64). auto-round truncates each to 512 tokens
and *drops* documents shorter than 512 tokens, so the count actually used is printed.
iters defaults to 100 (auto-round's default is 200) to keep the CPU run affordable.
Exported with ``--format`` (default ``auto_round``; ``auto_gptq`` as fallback) to
``<out-root>/autoround-asym-g{G}`` with the source's tokenizer files. Needs no network.
A group that does not divide hidden_size or intermediate_size (128 for SmolLM2's 576) is
skipped, as llm-compressor refuses it and the plugin refuses HQQ's such groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, publish, run_groups, setup_offline, split_documents  # noqa: E402

setup_offline()

SEQLEN = 512
MAX_SAMPLES = 64


def quantize(src: Path, out: Path, group: int, docs: list[str], iters: int, batch_size: int,
             fmt: str) -> None:
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    docs = docs[:MAX_SAMPLES]
    used = sum(len(tok(d)["input_ids"]) >= SEQLEN for d in docs)
    print(f"{len(docs)} documents, {used} with >= {SEQLEN} tokens (auto-round drops shorter)",
          flush=True)
    ar = AutoRound(model, tok, bits=4, group_size=group, sym=False, iters=iters, dataset=docs,
                   seqlen=SEQLEN, nsamples=len(docs), batch_size=min(batch_size, used),
                   device_map="cpu")

    def write(tmp: Path) -> Path:
        ar.quantize_and_save(str(tmp), format=fmt)
        return sorted(p.parent for p in tmp.rglob("config.json"))[0]  # auto-round may nest it

    publish(out, write, src)


def main() -> None:
    ap = parser(__doc__, calib_required=True)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--format", default="auto_round", choices=["auto_round", "auto_gptq"])
    args = ap.parse_args()
    if args.iters <= 0:
        raise SystemExit("--iters must be > 0: these checkpoints are tuned, not RTN")
    docs = split_documents(args.calib)
    run_groups(args, "autoround-asym-g",
               lambda out, g: quantize(args.src, out, g, docs, args.iters, args.batch_size,
                                       args.format),
               refuses="groups would straddle rows of those layers")


if __name__ == "__main__":
    main()
