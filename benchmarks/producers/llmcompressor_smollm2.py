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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, publish, run_groups, setup_offline, split_documents  # noqa: E402

setup_offline()

MAX_SEQ_LEN = 512


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

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), save_compressed=True)

    publish(out, write, src)


def main() -> None:
    args = parser(__doc__, calib_required=True).parse_args()
    docs = split_documents(args.calib)
    print(f"{len(docs)} calibration documents from {args.calib}", flush=True)
    run_groups(args, "llmc-gptq-asym-g", lambda out, g: quantize(args.src, out, g, docs),
               refuses="llm-compressor refuses such layers")


if __name__ == "__main__":
    main()
