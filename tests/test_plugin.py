"""Registration: vLLM's own plugin loading finds int4xpu in a fresh process; register() is
idempotent and cheap; the override claims only what it should."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")


def run_py(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "int4xpu"]
    assert eps and eps[0].value == "vllm_int4xpu:register"


def test_vllm_plugin_loader_registers_int4xpu_in_fresh_process():
    out = run_py(
        "import json, sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config\n"
        "assert 'int4xpu' not in QUANTIZATION_METHODS\n"
        "load_general_plugins(); load_general_plugins()\n"
        "cls = get_quantization_config('int4xpu')\n"
        "heavy = [m for m in sys.modules if m.startswith('vllm_int4xpu.kernels.') and m.split('.')[-1] in "
        "('cpu', 'triton_backend', 'xpu_onednn')]\n"
        "print(json.dumps({'n': QUANTIZATION_METHODS.count('int4xpu'), 'cls': cls.__module__ + '.' + cls.__name__, "
        "'heavy': heavy}))")
    res = json.loads(out)
    assert res["n"] == 1
    assert res["cls"] == "vllm_int4xpu.quant_method.Int4XPUConfig"
    assert res["heavy"] == [], "register() must not import kernel backends"


def test_override_claims_only_on_request():
    from vllm_int4xpu.quant_method import Int4XPUConfig

    native = {"quant_method": "int4xpu", "bits": 4, "group_size": 64, "zero_point": "int"}
    assert Int4XPUConfig.override_quantization_method(native, None) == "int4xpu"
    assert Int4XPUConfig.override_quantization_method(native, "int4xpu") == "int4xpu"
    assert Int4XPUConfig.override_quantization_method({"quant_method": "fp8"}, "int4xpu") is None
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    assert Int4XPUConfig.override_quantization_method(gptq, None) is None  # vLLM keeps its own


def test_bits_8_config_is_refused():
    from vllm_int4xpu.errors import Int4FormatError
    from vllm_int4xpu.quant_method import Int4XPUConfig

    with pytest.raises(Int4FormatError, match="only 4-bit") as e:
        Int4XPUConfig.from_config({"quant_method": "int4xpu", "bits": 8, "group_size": 64})
    assert "expected=4" in str(e.value) and "found=8" in str(e.value)


def test_layers_stored_dense_load_unquantized(tmp_path):
    """A layer the config does not exclude but the checkpoint stores as a plain float .weight
    (Qwen3-MoE routers in GPTQ checkpoints) is unquantized; int4 layers, a float weight beside
    quantized tensors, and an integer .weight are not; names are also found through the model's
    checkpoint -> vLLM name mapper once vLLM hands it over."""
    import torch
    from safetensors.torch import save_file
    from vllm.model_executor.models.utils import WeightsMapper

    from vllm_int4xpu.quant_method import Int4XPUConfig

    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(4, 8, dtype=torch.bfloat16),
               "model.layers.0.mlp.experts.0.up_proj.qweight": torch.zeros(1, 8, dtype=torch.int32),
               "model.layers.0.mlp.experts.0.up_proj.scales": torch.zeros(1, 8),
               "model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8),
               "model.layers.0.self_attn.o_proj.weight_scale": torch.zeros(8, 1),
               "model.layers.0.mlp.odd.weight": torch.zeros(8, 8, dtype=torch.int8)},
              str(tmp_path / "model.safetensors"))
    cfg = Int4XPUConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "desc_act": False, "sym": True})
    cfg.maybe_update_config(str(tmp_path))
    assert not cfg._layer_quantized("model.layers.0.mlp.gate")
    assert cfg._layer_quantized("model.layers.0.mlp.experts.0.up_proj")
    assert cfg._layer_quantized("model.layers.0.self_attn.o_proj")  # not a plain weight
    assert cfg._layer_quantized("model.layers.0.mlp.odd")  # not a float weight
    assert cfg._layer_quantized("model.layers.1.mlp.gate")  # not on disk: the config decides
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "model.language_model."}))
    assert not cfg._layer_quantized("model.language_model.layers.0.mlp.gate")
