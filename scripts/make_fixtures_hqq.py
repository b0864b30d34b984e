"""Write HQQ fixtures with hqq 0.2.8 (hqq venv), in both of HQQ's on-disk layouts.

    /work/hqq-venv/bin/python scripts/make_fixtures_hqq.py [NAME ...]

``hqq_g*``: transformers 4.57 quantizes the tiny Llama on load
(``quantization_config=HqqConfig(...)``) and saves safetensors with ``quant_method: hqq``.

``hqq_qmodel_*``: hqq's own API (``AutoHQQHFModel.quantize_model`` + ``save_quantized``) writes
``config.json`` without a quantization_config and ``qmodel.pt``, a ``torch.save`` of
``{module_name: state_dict}`` (quantized linears carry W_q, scale, zero, shape, nbits, ...).

The oracle is hqq's own ``HQQLinear.dequantize()`` of each quantized layer.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import ORACLE_MODULES, base_model, fresh_dir, tidy, write_oracle  # noqa: E402

VARIANTS = {"hqq_g64": 64, "hqq_g128": 128}
# hqq's own save format: name -> (group size, compute dtype)
QMODEL_VARIANTS = {"hqq_qmodel_g64": (64, torch.bfloat16),
                   "hqq_qmodel_g128_fp16": (128, torch.float16)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def make(name: str) -> None:
    import hqq
    import transformers
    from hqq.core.quantize import HQQLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer, HqqConfig

    g = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.bfloat16, device_map="cpu",
            quantization_config=HqqConfig(nbits=4, group_size=g, axis=1))
        tok = AutoTokenizer.from_pretrained(base)
        out = fresh_dir(name)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    oracle = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, HQQLinear) and mname in ORACLE_MODULES:
            oracle[mname + ".weight"] = mod.dequantize().float()
    tidy(out)
    write_oracle(out, oracle, {"producer": "hqq via transformers HqqConfig",
                               "hqq": getattr(hqq, "__version__", "0.2.8"),
                               "transformers": transformers.__version__, "group_size": g,
                               "oracle": "hqq's own HQQLinear.dequantize()"})
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    print(name, "->", out, cfg)


def make_qmodel(name: str) -> None:
    import hqq
    import transformers
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    g, compute_dtype = QMODEL_VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype, device_map="cpu")
        AutoHQQHFModel.quantize_model(
            model, quant_config=BaseQuantizeConfig(nbits=4, group_size=g, axis=1),
            compute_dtype=compute_dtype, device="cpu")
        out = fresh_dir(name)
        AutoHQQHFModel.save_quantized(model, str(out))
        for f in TOKENIZER_FILES:
            if (base / f).exists():
                shutil.copy(base / f, out / f)
    from hqq.core.quantize import Quantizer
    from safetensors.torch import save_file

    quantized, oracle, exact = [], {}, {}
    for mname, mod in model.named_modules():
        if isinstance(mod, HQQLinear):
            quantized.append(mname)
            if mname not in ORACLE_MODULES:
                continue
            oracle[mname + ".weight"] = mod.dequantize().float()
            # hqq's own dequantization of the stored codes, scale and zero in float64: the
            # value a lossless conversion must reproduce bit for bit
            meta64 = dict(mod.meta, scale=mod.meta["scale"].double(),
                          zero=mod.meta["zero"].double(), compute_dtype=torch.float64)
            exact[mname + ".weight"] = Quantizer.dequantize(mod.W_q.data, meta64).contiguous()
    tidy(out, keep=TOKENIZER_FILES + ("config.json", "qmodel.pt", "oracle"))
    write_oracle(out, oracle, {"producer": "hqq AutoHQQHFModel.quantize_model + save_quantized",
                               "hqq": getattr(hqq, "__version__", "0.2.8"),
                               "transformers": transformers.__version__, "group_size": g,
                               "nbits": 4, "axis": 1,
                               "compute_dtype": str(compute_dtype).removeprefix("torch."),
                               "quantized_modules": sorted(quantized),
                               "oracle": "hqq's own HQQLinear.dequantize()",
                               "oracle_f64": "hqq's Quantizer.dequantize with scale/zero in "
                                             "float64 (dequantized_f64.safetensors)"})
    save_file(exact, str(out / "oracle" / "dequantized_f64.safetensors"))
    print(name, "->", out, f"{len(quantized)} quantized linears")


if __name__ == "__main__":
    for n in sys.argv[1:] or list(VARIANTS) + list(QMODEL_VARIANTS):
        make_qmodel(n) if n in QMODEL_VARIANTS else make(n)
