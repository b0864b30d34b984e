"""GPTQ W4A16 asymmetric checkpoints of SmolLM2-135M-Instruct for the accuracy table (llmc venv).

    HF_HUB_OFFLINE=1 /work/llmc-venv/bin/python benchmarks/producers/llmcompressor_smollm2.py \
        --src /work/e2e-models/smollm2-bf16 --out-root /work/accuracy-models --groups 32 64 128 \
        --calib vllm_int4xpu/data/calibration.txt

llm-compressor 0.14 ``oneshot`` with ``GPTQModifier``: 4-bit int weights, asymmetric (integer
zero points), strategy group G, default GPTQ settings (static act-order, dampening 0.01),
lm_head kept float. Calibration: the documents of ``--calib`` (split on lines equal to
``=====``), tokenized here (truncated to 512 tokens) into an in-memory ``datasets.Dataset``, all
of them used. Writes ``<out-root>/llmc-gptq-asym-g{G}`` (compressed-tensors pack-quantized)
with the source's tokenizer files. Needs no network. A group that does not divide hidden_size
or intermediate_size (128 for SmolLM2's 576) is skipped: llm-compressor refuses it.
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

MAX_SEQ_LEN = 512
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


def quantize(src: Path, out: Path, group: int, docs: list[str]) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    enc = [tok(d, truncation=True, max_length=MAX_SEQ_LEN) for d in docs]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc],
                            "attention_mask": [e["attention_mask"] for e in enc]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=group))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=MAX_SEQ_LEN,
            num_calibration_samples=len(ds))
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), save_compressed=True)
    copy_tokenizer(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/work/e2e-models/smollm2-bf16"))
    ap.add_argument("--out-root", type=Path, default=Path("/work/accuracy-models"))
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--calib", type=Path, required=True, help="text file, documents split by =====")
    args = ap.parse_args()
    docs = split_documents(args.calib)
    print(f"{len(docs)} calibration documents from {args.calib}", flush=True)
    args.out_root.mkdir(parents=True, exist_ok=True)
    for g in args.groups:
        out = args.out_root / f"llmc-gptq-asym-g{g}"
        bad = indivisible(args.src, g)
        if bad:
            print(f"skipping group {g}: it does not divide {', '.join(bad)}; "
                  "llm-compressor refuses such layers", flush=True)
            continue
        t0 = time.time()
        quantize(args.src, out, g, docs)
        print(f"{out}: {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
