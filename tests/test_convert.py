"""``vllm-int4xpu convert``: HQQ's own save (``qmodel.pt``, written by hqq 0.2.8's
``AutoHQQHFModel.save_quantized``, see scripts/make_fixtures_hqq.py) and HQQ safetensors with
``view_as_float`` rewritten into the native format, losslessly.

Oracles: hqq's own ``Quantizer.dequantize`` evaluated in float64 on the stored codes, scales and
zeros (``oracle/dequantized_f64.safetensors``) must equal OUT's dequantization bit for bit;
hqq's ``HQQLinear.dequantize()`` in its compute dtype (``oracle/dequantized.safetensors``)
must match OUT's weights rounded to that dtype up to hqq's own rounding of (q - zero) in that
dtype. Real vLLM serves a converted checkpoint as it serves a dense copy of its weights.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_utils import native_weights
from vllm_int4xpu.convert import convert_checkpoint, detect_source
from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.weight import dequantize

FIXTURES = Path(__file__).parent / "fixtures"
QMODEL = ["hqq_qmodel_g64", "hqq_qmodel_g128_fp16"]


def native_dequantized(out: Path) -> dict[str, torch.Tensor]:
    return {p + ".weight": dequantize(w, torch.float64) for p, w in native_weights(out)[1].items()}


@pytest.mark.parametrize("name", QMODEL)
def test_hqq_save_converts_bit_for_bit(name, tmp_path):
    src = FIXTURES / name
    assert detect_source(src) == "hqq-save"
    meta = json.loads((src / "oracle" / "meta.json").read_text())
    summary = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert summary["layers"] == len(meta["quantized_modules"]) == 14
    assert summary["group_size"] == meta["group_size"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "int4xpu" and cfg["zero_point"] == "float"
    assert cfg["modules_to_not_convert"] == ["lm_head"]
    got = native_dequantized(tmp_path / "out")
    assert set(got) == {m + ".weight" for m in meta["quantized_modules"]}
    exact = load_file(str(src / "oracle" / "dequantized_f64.safetensors"))
    assert exact
    for key, ref in exact.items():
        assert ref.dtype == torch.float64
        assert torch.equal(got[key], ref), key
    # hqq's own dequantization in its compute dtype rounds (q - zero) to that dtype first
    dtype = getattr(torch, meta["compute_dtype"])
    eps = torch.finfo(dtype).eps
    for key, ref in load_file(str(src / "oracle" / "dequantized.safetensors")).items():
        diff = (got[key].to(dtype).double() - ref.double()).abs().max() / ref.abs().max()
        assert diff <= 8 * eps, (key, float(diff))


def test_unquantized_tensors_are_copied_and_tokenizer_kept(tmp_path):
    src = FIXTURES / "hqq_qmodel_g64"
    convert_checkpoint(src, tmp_path / "out", progress=False)
    raw = torch.load(src / "qmodel.pt", weights_only=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for mod, sd in raw.items():
        if "W_q" in sd:
            assert f"{mod}.qweight" in out and f"{mod}.weight" not in out
            continue
        for k, v in sd.items():
            assert torch.equal(out[f"{mod}.{k}"], v), (mod, k)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).exists(), f
    assert not (tmp_path / "out" / "qmodel.pt").exists()


def _view_as_float_copy(tmp: Path) -> Path:
    """The transformers-HqqConfig fixture with its W_q bytes stored as a bf16 view, as hqq's
    view_as_float option writes them (our loader refuses this layout in place)."""
    dst = tmp / "hqq_vaf"
    shutil.copytree(FIXTURES / "hqq_g64", dst, ignore=shutil.ignore_patterns("oracle"))
    t = load_file(str(dst / "model.safetensors"))
    for k in [k for k in t if k.endswith(".W_q")]:
        t[k] = t[k].contiguous().view(torch.bfloat16)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]["quant_config"]
    for v in [qc] + [x for x in qc.values() if isinstance(x, dict)]:
        if isinstance(v.get("weight_quant_params"), dict):
            v["weight_quant_params"]["view_as_float"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_view_as_float_hqq_converts_to_what_the_plain_layout_loads(tmp_path):
    from vllm_int4xpu.inspect import check_checkpoint

    src = _view_as_float_copy(tmp_path)
    rep = check_checkpoint(str(src), "cpu")
    assert rep.problems and "vllm-int4xpu convert" in str(rep.problems[0])
    convert_checkpoint(src, tmp_path / "out", progress=False)
    got = native_dequantized(tmp_path / "out")
    oracle = load_file(str(FIXTURES / "hqq_g64" / "oracle" / "dequantized.safetensors"))
    for key, ref in oracle.items():
        err = float((got[key] - ref.double()).abs().max() / ref.abs().max())
        assert err <= 1e-6, (key, err)
    rep = check_checkpoint(str(tmp_path / "out"), "cpu")
    assert not rep.problems and rep.layers == 14


def test_inspect_suggests_convert_for_an_hqq_save():
    r = subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "inspect",
                        str(FIXTURES / "hqq_qmodel_g64")], capture_output=True, text=True)
    assert r.returncode == 1 and "vllm-int4xpu convert" in r.stdout, r.stdout + r.stderr


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_sources_are_refused_and_leave_nothing(tmp_path, tiny_dir):
    out = tmp_path / "out"

    def refused(src, msg):
        with pytest.raises(Int4FormatError, match=msg):
            convert_checkpoint(src, out, progress=False)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    refused(tiny_dir, "nothing to convert")
    refused(FIXTURES / "ct_sym_g128", "nothing to convert")

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(FIXTURES / "hqq_qmodel_g64", d, ignore=shutil.ignore_patterns("oracle"))
        w = torch.load(d / "qmodel.pt", weights_only=True)
        edit(w)
        torch.save(w, d / "qmodel.pt")
        return d

    # arbitrary pickled objects are never executed: weights_only refuses them
    d = variant("evil", lambda w: w.__setitem__("model.norm", {"weight": _Evil()}))
    refused(d, "weights_only=True")
    layer = "model.layers.0.self_attn.q_proj"
    refused(variant("bits3", lambda w: w[layer].__setitem__("nbits", 3)), "only 4-bit")
    refused(variant("axis0", lambda w: w[layer].__setitem__("axis", 0)), "axis 1")
    refused(variant("noscale", lambda w: w[layer].pop("scale")), "lacks a tensor")
    refused(variant("nan", lambda w: w[layer]["scale"].__setitem__(0, float("nan"))), "scale")
    refused(variant("g32", lambda w: w[layer].__setitem__("group_size", 32)), "W_q")
    refused(variant("short", lambda w: w[layer].__setitem__("W_q", w[layer]["W_q"][:-2])), "W_q")
    bad = tmp_path / "notpickle"
    shutil.copytree(FIXTURES / "hqq_qmodel_g64", bad, ignore=shutil.ignore_patterns("oracle"))
    (bad / "qmodel.pt").write_bytes(pickle.dumps([1, 2]) + b"garbage")
    refused(bad, "qmodel.pt")
    out.mkdir()
    with pytest.raises(Int4FormatError, match="refusing to overwrite"):
        convert_checkpoint(FIXTURES / "hqq_qmodel_g64", out, progress=False)


def test_cli_convert(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "convert",
                        str(FIXTURES / "hqq_qmodel_g64"), str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "14 of 14 bit-exact" in r.stdout and "vllm serve" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "convert", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "qmodel.pt" in r.stdout
