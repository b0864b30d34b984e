"""Malformed native checkpoints fail loudly through real vLLM with our own error, and the
quantizer refuses unsafe output paths."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import quantize_with_cli
from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.quantizer import quantize_model

LAYER = "model.layers.0.mlp.down_proj"


def edit_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        sd = load_file(str(dst / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _truncate_qweight(sd):
    sd[f"{LAYER}.qweight"] = sd[f"{LAYER}.qweight"][:, :-4].contiguous()


def _poison_scales(sd):
    sd[f"{LAYER}.scales"][0, 0] = float("nan")


def _bits8(cfg):
    cfg["quantization_config"]["bits"] = 8


@pytest.fixture(scope="module")
def vllm_errors(tiny_int, tmp_path_factory) -> dict[str, str]:
    """Each broken checkpoint loaded by real vLLM, all in one process (engines in turn, in
    process, so the loader's own exception text is what comes back): case -> error text."""
    pytest.importorskip("vllm")
    from test_formats_e2e import run_batch

    tmp = tmp_path_factory.mktemp("bad")
    cases = {
        "missing": edit_checkpoint(tiny_int, tmp / "missing",
                                   edit_tensors=lambda sd: sd.pop(f"{LAYER}.scales")),
        "shape": edit_checkpoint(tiny_int, tmp / "shape", edit_tensors=_truncate_qweight),
        "bits": edit_checkpoint(tiny_int, tmp / "bits", edit_config=_bits8),
        "nan": edit_checkpoint(tiny_int, tmp / "nan", edit_tensors=_poison_scales),
    }
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        res = run_batch([{"model": str(m), "quantization": "int4xpu"} for m in cases.values()])
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    out = {}
    for case, r in zip(cases, res):
        assert not r["ok"], f"{case}: the broken checkpoint loaded"
        out[case] = r["error"]
    return out


def test_missing_tensor_is_named(vllm_errors):
    out = vllm_errors["missing"]
    assert out.startswith("Int4FormatError"), out
    assert "tensor missing from checkpoint" in out and f"tensor={LAYER}.scales" in out
    assert "found=nothing" in out


def test_wrong_shape_is_named(vllm_errors):
    out = vllm_errors["shape"]
    assert out.startswith("Int4FormatError"), out
    assert f"tensor={LAYER}.qweight" in out and "file=model.safetensors" in out
    assert "expected=[128, 32]" in out and "found=[128, 28]" in out


def test_bits_8_is_refused(vllm_errors):
    # raised while vLLM builds its (pydantic) config, which re-wraps it as a ValueError
    out = vllm_errors["bits"]
    assert "int4xpu: only 4-bit weights are supported" in out, out
    assert "only 4-bit" in out and "expected=4" in out and "found=8" in out


def test_nan_scales_are_refused(vllm_errors):
    out = vllm_errors["nan"]
    assert out.startswith("Int4FormatError"), out
    assert "NaN or inf" in out and f"{LAYER}.scales" in out


def test_quantizer_refuses_overwrite_and_own_input(tiny_dir, tiny_int, tmp_path):
    with pytest.raises(Int4FormatError, match="already exists"):
        quantize_model(tiny_dir, tiny_int)
    with pytest.raises(Int4FormatError, match="inside"):
        quantize_model(tiny_dir, tiny_dir / "out")
    with pytest.raises(Int4FormatError, match="already quantized"):
        quantize_model(tiny_int, tmp_path / "again")
    with pytest.raises(Int4FormatError, match="divide"):
        quantize_model(tiny_dir, tmp_path / "g48", group_size=48)
    assert not (tmp_path / "g48").exists() and not list(tmp_path.glob(".g48.tmp-*"))


def test_quantizer_output(tiny_dir, tiny_int):
    cfg = json.loads((tiny_int / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "int4xpu", "bits": 4, "group_size": 64, "zero_point": "int",
        "act_order": False, "modules_to_not_convert": ["lm_head"], "format_version": 1}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_int / f).exists()
    sd = load_file(str(tiny_int / "model.safetensors"))
    assert sd[f"{LAYER}.qweight"].dtype == torch.int32 and sd[f"{LAYER}.qweight"].shape == (128, 32)
    assert sd[f"{LAYER}.qzeros"].dtype == torch.int8 and sd[f"{LAYER}.scales"].shape == (4, 128)
    assert "lm_head.weight" in sd and sd["lm_head.weight"].dtype == torch.bfloat16
    assert "model.embed_tokens.weight" in sd and not any(k.startswith("lm_head.q") for k in sd)


def test_quantizer_cli_sym_and_progress(tiny_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "sym"
    proc = subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "quantize", str(tiny_dir), str(out),
                           "--group-size", "128", "--sym"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "quantizing" in proc.stderr and "14/14" in proc.stderr  # tqdm progress bar
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["zero_point"] == "none" and cfg["group_size"] == 128
    proc = subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "quantize", str(tiny_dir), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "already exists" in proc.stderr
