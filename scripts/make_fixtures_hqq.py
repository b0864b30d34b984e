"""Write HQQ fixtures with hqq 0.2.8 through transformers 4.57's HqqConfig (hqq venv).

    /work/hqq-venv/bin/python scripts/make_fixtures_hqq.py [NAME ...]

transformers quantizes the tiny Llama on load (``quantization_config=HqqConfig(...)``) and
saves safetensors with ``quant_method: hqq``. The oracle is hqq's own ``HQQLinear.dequantize()``
of each quantized layer.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import ORACLE_MODULES, base_model, fresh_dir, tidy, write_oracle  # noqa: E402

VARIANTS = {"hqq_g64": 64, "hqq_g128": 128}


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


if __name__ == "__main__":
    for n in sys.argv[1:] or list(VARIANTS):
        make(n)
