"""Malformed foreign checkpoints fail with Int4FormatError naming file, tensor, expected, found.

Each case copies a producer-written fixture, breaks one thing, and runs the offline validator
(``vllm-int4xpu inspect``'s :func:`check_checkpoint`, the same conversion loading does); one case
goes through real vLLM to check the message reaches the user there too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.inspect import check_checkpoint, main as inspect_main

FIXTURES = Path(__file__).parent / "fixtures"
LAYER = "model.layers.0.self_attn.q_proj"


def broken_copy(tmp_path: Path, fixture: str, edit_tensors=None, edit_config=None) -> Path:
    dst = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, dst, ignore=shutil.ignore_patterns("oracle"))
    if edit_tensors:
        f = dst / "model.safetensors"
        t = load_file(str(f))
        edit_tensors(t)
        save_file(t, str(f), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def only_problem(path: Path) -> Int4FormatError:
    rep = check_checkpoint(str(path), "cpu")
    assert rep.problems, "the broken checkpoint was accepted"
    e = rep.problems[0]
    assert isinstance(e, Int4FormatError)
    for attr in ("file", "tensor", "expected", "found"):
        assert getattr(e, attr) is not None, f"{attr} missing from: {e}"
    return e


def set_(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


def test_clean_fixtures_have_no_problems():
    for d in sorted(p for p in FIXTURES.iterdir() if (p / "oracle").is_dir()
                    and not (p / "qmodel.pt").exists()):
        rep = check_checkpoint(str(d), "cpu")
        assert not rep.problems, (d.name, [str(e) for e in rep.problems])
        assert rep.layers >= 13, d.name


@pytest.mark.parametrize("fixture, suffix", [
    ("ar_gptq_asym_g64", "qweight"), ("ar_awq_asym_g128", "qweight"),
    ("ct_sym_g128", "weight_packed"), ("hqq_g64", "W_q"), ("torchao_plain_int32_g64", "_weight_qdata")])
def test_truncated_packed_tensor(tmp_path, fixture, suffix):
    key = f"{LAYER}.{suffix}"
    e = only_problem(broken_copy(tmp_path, fixture, set_(key, lambda x: x[: x.shape[0] // 2].clone())))
    assert e.file == "model.safetensors" and e.tensor == key, e


def test_gptq_v1_stored_15_is_zero_point_16(tmp_path):
    """GPTQ v1 stores zp - 1; old packers wrote zp 0 as -1, i.e. a stored 15. The producers'
    dequantization (zeros + 1) and vLLM's GPTQ kernels compute (q - 16) * s there: not an error,
    and our conversion must give exactly that (checked against the formula written out here)."""
    from vllm_int4xpu.formats import LayerGeometry, parse_format
    from vllm_int4xpu.inspect import infer_shape
    from vllm_int4xpu.weight import ZeroKind, dequantize

    d = broken_copy(tmp_path, "ar_gptq_asym_g64", set_(f"{LAYER}.qzeros", lambda x: x | 0xF))
    assert not check_checkpoint(str(d), "cpu").problems
    t = load_file(str(d / "model.safetensors"))
    lt = {k[len(LAYER) + 1:]: v for k, v in t.items() if k.startswith(LAYER + ".")}
    qw, qz, s = lt["qweight"], lt["qzeros"], lt["scales"].double()
    K, N, G = qw.shape[0] * 8, qw.shape[1], qz.shape[0]
    nib = torch.arange(8, dtype=torch.int32) * 4
    q = ((qw.unsqueeze(1) >> nib.view(1, 8, 1)) & 0xF).reshape(K, N)  # code of k: word k//8
    zp = ((qz.unsqueeze(-1) >> nib) & 0xF).reshape(G, N) + 1  # v1: stored + 1
    assert int(zp.max()) == 16 and int((zp == 16).sum()) >= N // 8 * G
    rows = torch.arange(K) // (K // G)
    ref = ((q.double() - zp.double()[rows]) * s[rows]).t()  # [N, K]

    fmt = parse_format(json.loads((d / "config.json").read_text())["quantization_config"])
    K_, N_ = infer_shape(fmt, lt)
    geo = LayerGeometry(K_, N_, K_, N_)
    w = fmt.to_canonical({sp.name: fmt.prepare_loaded(sp.name, lt[sp.name], geo)
                          for sp in fmt.tensor_specs(geo) if sp.name in lt}, geo).validate()
    assert w.zero_kind == ZeroKind.FLOAT
    assert torch.equal(dequantize(w, torch.float64), ref)


def test_zero_points_out_of_range(tmp_path):
    e = only_problem(broken_copy(tmp_path, "torchao_plain_int32_g64",
                                 set_(f"{LAYER}._weight_zero_point",
                                      lambda x: x.index_fill(0, torch.tensor([0]), 20))))
    assert e.tensor.endswith("_weight_zero_point") and e.expected == "0..15"


@pytest.mark.parametrize("fixture, suffix, bad", [
    ("ar_gptq_sym_g128", "scales", float("nan")), ("ct_asym_g64_gptq", "weight_scale", float("inf")),
    ("hqq_g64", "scale", float("nan")), ("hqq_g64", "zero", float("inf"))])
def test_non_finite_scales(tmp_path, fixture, suffix, bad):
    def poison(x):
        x = x.clone()
        x.view(-1)[3] = bad
        return x
    e = only_problem(broken_copy(tmp_path, fixture, set_(f"{LAYER}.{suffix}", poison)))
    assert e.tensor.endswith(suffix) and "NaN" in str(e)


def test_group_size_not_dividing_in_features(tmp_path):
    e = only_problem(broken_copy(tmp_path, "ar_gptq_asym_g64",
                                 edit_config=lambda q: q.update(group_size=48)))
    assert e.found == 48 and "divide" in str(e)


def test_g_idx_wrong_length(tmp_path):
    e = only_problem(broken_copy(tmp_path, "gptq_v1_asym_descact_g32",
                                 set_(f"{LAYER}.g_idx", lambda x: x[:-8].clone())))
    assert e.tensor == f"{LAYER}.g_idx" and e.expected == [128] and e.found == [120]


def test_bits_8(tmp_path):
    for fixture in ("ar_gptq_sym_g128", "ar_awq_asym_g128", "ar_native_sym_g64"):
        e = only_problem(broken_copy(tmp_path / fixture, fixture,
                                     edit_config=lambda q: q.update(bits=8)))
        assert e.file == "config.json" and e.tensor.endswith("bits") and e.found == 8
    e = only_problem(broken_copy(tmp_path, "ct_sym_g128", edit_config=lambda q: q["config_groups"][
        "group_0"]["weights"].update(num_bits=8)))
    assert e.file == "config.json"


def test_inspect_cli_output(capsys):
    assert inspect_main([str(FIXTURES / "gptq_v1_asym_descact_g32")]) == 0
    out = capsys.readouterr().out
    for word in ("format:      gptq", "zero points: int", "group size:  32", "act-order:   True",
                 "quantized layers: 14", "kernel backend on this machine:", "problems: 0"):
        assert word in out, out
    assert inspect_main([str(FIXTURES / "ar_gptq_sym_g32")]) == 0
    out = capsys.readouterr().out
    assert "unquantized linear layers: 1 (model.layers.1.mlp.down_proj)" in out


def test_inspect_cli_reports_problems(tmp_path, capsys):
    bad = broken_copy(tmp_path, "ct_sym_g128", set_(f"{LAYER}.weight_scale",
                                                    lambda x: x * float("nan")))
    assert inspect_main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "problems: 1" in out and "weight_scale" in out and "model.safetensors" in out


def test_vllm_names_the_broken_tensor(tmp_path):
    """Through real vLLM: a truncated GPTQ qweight fails the load with our message."""
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_runner import run_generate

    bad = broken_copy(tmp_path, "ar_gptq_asym_g64",
                      set_(f"{LAYER}.qweight", lambda x: x[: x.shape[0] // 2].clone()))
    rc, out = run_generate(bad, quantization="int4xpu", max_tokens=1, expect_error=True,
                           timeout=600)
    assert rc != 0
    assert "Int4FormatError" in out and "qkv_proj.qweight" in out and "model.safetensors" in out, \
        out[-3000:]


def test_non_finite_bias_of_a_quantized_layer(tmp_path):
    """Found by the loader fuzzer: a NaN bias on a quantized projection (Qwen2's k_proj has one)
    was accepted."""
    key = "model.layers.0.self_attn.k_proj.bias"

    def poison(x):
        x = x.clone()
        x[1] = float("nan")
        return x
    e = only_problem(broken_copy(tmp_path, "moe_ar_gptq_asym_g32", set_(key, poison)))
    assert e.tensor == key and "1 NaN/inf" in str(e)
