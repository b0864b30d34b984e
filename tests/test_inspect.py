"""`vllm-int4xpu inspect` works on every fixture checkpoint and on our own native format."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_int4xpu.inspect import main as inspect_main

# (HQQ qmodel.pt saves are refused with a pointer to convert: tests/test_convert.py)
FIXTURES = sorted(p for p in (Path(__file__).parent / "fixtures").iterdir()
                  if (p / "config.json").exists() and not (p / "qmodel.pt").exists())
EXPECTED_FORMAT = {"moe_ar_awq": "awq", "moe_ar_gptq": "gptq", "moe_mixtral_ar_gptq": "gptq",
                   "moe_qwen3_ct_": "compressed-tensors", "moe_qwen3_ar_": "auto-round",
                   "moe_ct_": "compressed-tensors", "moe_hqq_": "hqq", "ar_awq": "awq", "ar_gptq": "gptq", "ar_native": "auto-round", "ct_": "compressed-tensors",
                   "gptq_": "gptq", "hqq_": "hqq", "torchao_": "torchao"}


@pytest.mark.parametrize("ckpt", FIXTURES, ids=lambda p: p.name)
def test_inspect_every_fixture(ckpt, capsys):
    assert inspect_main([str(ckpt)]) == 0
    out = capsys.readouterr().out
    fmt = next(v for k, v in EXPECTED_FORMAT.items() if ckpt.name.startswith(k))
    assert f"format:      {fmt}" in out and "problems: 0" in out
    assert "kernel backend on this machine:" in out
    if ckpt.name.startswith("moe_"):  # every MoE layer found, stacked and given a backend
        assert "MoE layers: 2 with int4 experts (4 experts each)" in out, out
        assert "MoE kernel backend on this machine: cpu_native (MoE E=4 H=128" in out, out
        assert ("dequantized once at load" in out) == ckpt.name.startswith("moe_hqq"), out


def test_inspect_native(tiny_int, capsys):
    assert inspect_main([str(tiny_int)]) == 0
    out = capsys.readouterr().out
    assert "format:      int4xpu" in out and "group size:  64" in out and "quantized layers: 14" in out
