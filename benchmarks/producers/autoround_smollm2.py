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

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SEQLEN = 512
MAX_SAMPLES = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def split_documents(path: Path) -> list[str]:
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == "=====":
            docs.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur).strip())
    return [d for d in docs if d]


def indivisible(src: Path, group: int) -> list[str]:
    """Linear input widths of the model that ``group`` does not divide."""
    cfg = json.loads((src / "config.json").read_text())
    widths = {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"]}
    return [f"{k}={v}" for k, v in widths.items() if v % group]


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


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
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ar.quantize_and_save(str(tmp), format=fmt)
    made = sorted(p.parent for p in tmp.rglob("config.json"))[0]  # auto-round may nest it
    copy_tokenizer(src, made)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(made, out)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/work/e2e-models/smollm2-bf16"))
    ap.add_argument("--out-root", type=Path, default=Path("/work/accuracy-models"))
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--calib", type=Path, required=True, help="text file, documents split by =====")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--format", default="auto_round", choices=["auto_round", "auto_gptq"])
    args = ap.parse_args()
    if args.iters <= 0:
        raise SystemExit("--iters must be > 0: these checkpoints are tuned, not RTN")
    docs = split_documents(args.calib)
    args.out_root.mkdir(parents=True, exist_ok=True)
    for g in args.groups:
        out = args.out_root / f"autoround-asym-g{g}"
        bad = indivisible(args.src, g)
        if bad:
            print(f"skipping group {g}: it does not divide {', '.join(bad)}; "
                  "groups would straddle rows of those layers", flush=True)
            continue
        t0 = time.time()
        quantize(args.src, out, g, docs, args.iters, args.batch_size, args.format)
        print(f"{out}: {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
