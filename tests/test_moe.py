"""Mixture-of-experts models through real vLLM. int4xpu has no fused-MoE kernel, so:

* our quantizer leaves the MoE parts that vLLM builds without a quantization method (routers,
  ``shared_expert_gate``, experts) unquantized and lists them in ``modules_to_not_convert``; the
  rest (attention, shared experts) is int4 and the model gives the tokens of a dense copy that
  holds the dequantized weights (float32, so the comparison is tight);
* a foreign checkpoint whose experts are int4 is refused with our error naming the layer,
  before vLLM's loader would fail on an unknown parameter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import quantize_with_cli  # noqa: E402
from test_formats_e2e import dense_copy  # noqa: E402
from tiny_model import make_tiny_moe  # noqa: E402
from vllm_runner import run_generate  # noqa: E402


def test_quantized_moe_model_matches_dense_copy(tmp_path):
    src = make_tiny_moe(tmp_path / "qwen2moe", "qwen2_moe")
    out = quantize_with_cli(src, tmp_path / "qwen2moe-int4", "--group-size", "32")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "shared_expert_gate" in qcfg["modules_to_not_convert"], qcfg
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.shared_expert.gate_proj.qweight" in keys  # the shared expert is int4
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys  # its gate is not
    assert "model.layers.0.self_attn.q_proj.qweight" in keys
    dense = dense_copy(out, tmp_path / "qwen2moe-dense", "float32")
    ours = run_generate(out, quantization="int4xpu", dtype="float32", max_tokens=6)
    ref = run_generate(dense, dtype="float32", max_tokens=6)
    assert [o["token_ids"] for o in ours] == [r["token_ids"] for r in ref]


def _gptq_layer(w: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """A GPTQ v1 layer (documented layout: qweight [K/8, N] along K, qzeros [G, N/8] storing
    zp - 1, scales [G, N]) of RTN codes of ``w`` [N, K], written by hand."""
    from vllm_int4xpu.weight import ZeroKind, quantize_rtn
    q = quantize_rtn(w.float(), g, ZeroKind.INT)  # canonical words are GPTQ's, transposed
    zp1 = (q.zeros.to(torch.int64) - 1).clamp(min=0)  # v1 stores zp - 1
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (zp1.view(zp1.shape[0], -1, 8) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"qweight": q.qweight.t().contiguous(), "qzeros": words,
            "scales": q.scales.to(torch.float16), "g_idx": (torch.arange(w.shape[1]) // g).int()}


def test_foreign_checkpoint_with_int4_experts_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file
    src = make_tiny_moe(tmp_path / "mixtral", "mixtral")
    t = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in t.items():
        mod, leaf = k.rsplit(".", 1)[0], k.rsplit(".", 2)[-2]
        if k.endswith(".weight") and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2",
                                              "w3"):
            out.update({f"{mod}.{n}": x for n, x in _gptq_layer(v, 32).items()})
        else:
            out[k] = v
    assert "model.layers.0.block_sparse_moe.experts.0.w1.qweight" in out
    save_file(out, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                  "desc_act": False, "sym": False, "checkpoint_format": "gptq"}
    (src / "config.json").write_text(json.dumps(cfg))
    rc, log = run_generate(src, quantization="int4xpu", max_tokens=1, expect_error=True,
                           timeout=600)
    assert rc != 0
    assert "Int4FormatError" in log and "MoE experts are not supported" in log \
        and "block_sparse_moe.experts" in log, log[-3000:]
