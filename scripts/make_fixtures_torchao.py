"""Write torchao int4 fixtures (producer venv with torchao 0.18 + transformers).

    /work/llmc-venv/bin/python scripts/make_fixtures_torchao.py [NAME ...]

torchao cannot quantize to int4 on a CPU-only machine (``plain`` needs the mslk kernels package,
``plain_int32`` asserts an XPU device, ``tile_packed_to_4d`` needs CUDA), so the quantized *data*
is made here by hand, following torchao's documented layouts, and everything else is torchao's
and transformers' own code:

* ``plain_int32``: scales/zero points/codes from torchao's ``choose_qparams_affine`` and
  ``quantize_affine`` (the calls ``Int4PlainInt32Tensor.from_hp`` makes on XPU); the packing
  ``(q[:, 1::2] << 4 | q[:, ::2])`` as uint8, viewed as int32 (what the XPU
  ``_convert_weight_to_int4pack`` returns); wrapped in torchao's ``Int4PlainInt32Tensor``.
  Oracle: torchao's ``dequantize_affine``.
* ``plain``: the min/max recipe of torchao's ``int4_row_quantize_zp`` (signed codes -8..7,
  s = (max - min) / 15, z = min + 8 s), packed two signed nibbles per int8 (even k low), wrapped
  in torchao's ``Int4Tensor``. Oracle: the documented formula w = q * s + z.

Serialization is torchao's ``flatten_tensor_state_dict`` (what transformers' torchao quantizer
calls in ``save_pretrained``) and the config is transformers' ``TorchAoConfig(...).to_dict()``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures_common import ORACLE_MODULES, base_model, fresh_dir, tidy, write_oracle  # noqa: E402

VARIANTS = {"torchao_plain_int32_g64": ("plain_int32", 64), "torchao_plain_g128": ("plain", 128)}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quant_plain_int32(w: torch.Tensor, g: int):
    from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine,
                                                       dequantize_affine, quantize_affine)
    from torchao.quantization.quantize_.workflows.int4.int4_plain_int32_tensor import \
        Int4PlainInt32Tensor

    block = [1, g]
    scale, zp = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6,
                                      None, torch.int32)
    q = quantize_affine(w, block, scale, zp, torch.int32, 0, 15)
    oracle = dequantize_affine(q, block, scale.float(), zp, torch.int32, 0, 15,
                               output_dtype=torch.float32)
    packed = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8).contiguous().view(torch.int32)
    N = w.shape[0]
    t = Int4PlainInt32Tensor(packed, scale.reshape(N, -1).t().contiguous(),
                             zp.reshape(N, -1).t().contiguous().to(torch.int8), block,
                             w.shape, act_pre_scale=None)
    return t, oracle


def quant_plain(w: torch.Tensor, g: int):
    from torchao.quantization.quantize_.workflows.int4.int4_tensor import Int4Tensor

    N, K = w.shape
    x = w.float().reshape(-1, g)
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    s = ((mx - mn).clamp(min=1e-6) / 15)
    z = mn + 8 * s
    q = (x - mn).div(s).round().clamp(0, 15) - 8  # signed -8..7
    q = q.to(torch.int8).reshape(N, K)
    s_t = s.view(N, -1).t().contiguous().to(w.dtype)
    z_t = z.view(N, -1).t().contiguous().to(w.dtype)
    packed = ((q[:, ::2] & 0xF) | (q[:, 1::2] << 4)).to(torch.int8).contiguous()
    oracle = q.float() * s_t.float().t().repeat_interleave(g, 1) \
        + z_t.float().t().repeat_interleave(g, 1)
    t = Int4Tensor(qdata=packed, scale=s_t, zero_point=z_t, block_size=[1, g], shape=w.shape,
                   activation_dtype=torch.bfloat16, act_pre_scale=None)
    return t, oracle


def make(name: str) -> None:
    import torchao
    import transformers
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    layout, g = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(base)
        out = fresh_dir(name)
        tok.save_pretrained(str(out))
        (out / "generation_config.json").write_text((Path(base) / "generation_config.json").read_text())
    oracle = {}
    sd = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mname.split(".")[-1] in LINEARS:
            fn = quant_plain_int32 if layout == "plain_int32" else quant_plain
            t, o = fn(mod.weight.detach(), g)
            sd[mname + ".weight"] = t
            if mname in ORACLE_MODULES:
                oracle[mname + ".weight"] = o
    for k, v in model.state_dict().items():
        sd.setdefault(k, v)
    tensors, metadata = flatten_tensor_state_dict(sd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={**metadata, "format": "pt"})
    qcfg = TorchAoConfig(Int4WeightOnlyConfig(group_size=g, int4_packing_format=layout))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tidy(out)
    write_oracle(out, oracle, {"producer": "hand-written data, torchao tensor subclasses and "
                               "serialization", "torchao": torchao.__version__,
                               "transformers": transformers.__version__, "layout": layout,
                               "group_size": g,
                               "oracle": "torchao dequantize_affine" if layout == "plain_int32"
                               else "documented formula q*s+z"})
    print(name, "->", out, cfg["quantization_config"])


if __name__ == "__main__":
    for n in sys.argv[1:] or list(VARIANTS):
        make(n)
