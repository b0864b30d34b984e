"""Write compressed-tensors pack-quantized W4A16 fixtures with llmcompressor (producer venv).

    /work/llmc-venv/bin/python scripts/make_fixtures_ct.py [NAME ...]

llmcompressor (0.14.0.1, compressed-tensors 0.19) quantizes the tiny Llama with RTN
(QuantizationModifier) or GPTQ (GPTQModifier, calibrated on a few sentences) and saves the
compressed checkpoint. The oracle is compressed-tensors' own decompression of the saved
tensors (``PackedQuantizationCompressor.decompress``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import (CALIB_TEXT, base_model, fresh_dir, linear_prefixes,  # noqa: E402
                                  read_safetensors, tidy, write_oracle)

# name: (algorithm, symmetric, strategy, group size, actorder, extra ignore entries)
VARIANTS = {
    "ct_sym_g128": ("rtn", True, "group", 128, None, []),
    "ct_asym_g64_gptq": ("gptq", False, "group", 64, "weight", []),
    "ct_sym_channel": ("rtn", True, "channel", None, None, [r"re:.*layers\.1\.mlp\.down_proj$"]),
    # actorder "group" (weight_g_idx on disk) was removed from llmcompressor/compressed-tensors
    # ("actorder='group' has been removed"); tests cover it with a hand-written checkpoint.
}


def make(name: str) -> None:
    import compressed_tensors
    import llmcompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    algo, sym, strategy, g, actorder, ignore = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(base)
        wargs = dict(num_bits=4, type="int", symmetric=sym, strategy=strategy)
        if g:
            wargs["group_size"] = g
        if algo == "gptq" and actorder:
            wargs["actorder"] = actorder
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs))
        kw = dict(config_groups={"group_0": scheme}, ignore=["lm_head"] + ignore)
        if algo == "gptq":
            ids = [tok(t)["input_ids"][:32] for t in CALIB_TEXT]
            ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
            oneshot(model=model, dataset=ds, recipe=GPTQModifier(**kw), max_seq_length=32,
                    num_calibration_samples=len(ids), processor=tok)
        else:
            oneshot(model=model, recipe=QuantizationModifier(**kw), processor=tok)
        out = fresh_dir(name)
        model.save_pretrained(str(out), save_compressed=True)
        tok.save_pretrained(str(out))
    tidy(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    t = read_safetensors(out)
    oracle = {}
    for prefix in linear_prefixes(t, "weight_packed"):
        sd = {k.split(prefix + ".", 1)[1]: v for k, v in t.items() if k.startswith(prefix + ".")}
        # fp32 scales: the dequantized products are then exact (bf16 output would round them)
        sd["weight_scale"] = sd["weight_scale"].float()
        dense = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        oracle[prefix + ".weight"] = dense.float()
    write_oracle(out, oracle, {"producer": "llmcompressor", "version": llmcompressor.__version__,
                               "compressed_tensors": compressed_tensors.__version__,
                               "algorithm": algo, "weights": wargs, "ignore": kw["ignore"],
                               "oracle": "compressed-tensors' own decompression"})
    print(name, "->", out, json.dumps(cfg)[:600])


if __name__ == "__main__":
    names = sys.argv[1:] or list(VARIANTS)
    failed = {}
    for n in names:
        try:
            make(n)
        except Exception as e:
            failed[n] = f"{type(e).__name__}: {e}"
            print("FAILED", n, failed[n], file=sys.stderr)
    if failed:
        print(json.dumps(failed, indent=1))
