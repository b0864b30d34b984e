"""HQQ 4-bit checkpoints of SmolLM2-135M-Instruct for the accuracy table (hqq venv).

    HF_HUB_OFFLINE=1 /work/hqq-venv/bin/python benchmarks/producers/hqq_smollm2.py \
        --src /work/e2e-models/smollm2-bf16 --out-root /work/accuracy-models --groups 32 64 128

hqq 0.2.8 through transformers 4.57's ``HqqConfig(nbits=4, group_size=G, axis=1)``: the model is
quantized on load (CPU, bf16) and written by ``save_pretrained`` as safetensors with
``quant_method: hqq`` -- the layout the plugin loads. lm_head (tied to the embedding) stays float.
Writes ``<out-root>/hqq-g{G}`` with the source's tokenizer files. HQQ needs no calibration data;
``--calib`` is accepted for a uniform command line and ignored.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def quantize(src: Path, out: Path, group: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, HqqConfig

    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=HqqConfig(nbits=4, group_size=group, axis=1))
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    copy_tokenizer(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("/work/e2e-models/smollm2-bf16"))
    ap.add_argument("--out-root", type=Path, default=Path("/work/accuracy-models"))
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--calib", type=Path, help="ignored: HQQ is calibration-free")
    args = ap.parse_args()
    args.out_root.mkdir(parents=True, exist_ok=True)
    for g in args.groups:
        out = args.out_root / f"hqq-g{g}"
        t0 = time.time()
        quantize(args.src, out, g)
        print(f"{out}: {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
