"""Checkpoint format adapters (GPTQ, AWQ, compressed-tensors, AutoRound, HQQ, torchao), no vLLM.

* every fixture in tests/fixtures/ (written by the format's own producer library, see
  scripts/make_fixtures_*.py) converts to the canonical weight whose dequantization equals the
  producer's own dequantization (oracle/dequantized.safetensors);
* tensor-parallel shards, cut from the disk tensors exactly as each TensorSpec's output/input
  dims say (what vLLM's parameter classes do), convert to slices of the full weight;
* random weights written in each format's documented layout (by an independent packer here)
  round-trip for several group sizes and zero-point kinds;
* config parsing: detection, skip/ignore lists, refusals with Int4FormatError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.formats import FORMATS, LayerGeometry, detect_format, parse_format
from vllm_int4xpu.inspect import infer_shape
from vllm_int4xpu.weight import ZeroKind, dequantize

FIXTURES = Path(__file__).parent / "fixtures"
# (HQQ qmodel.pt saves are not loadable in place: tests/test_convert.py covers them)
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "oracle").is_dir()
                      and not (p / "qmodel.pt").exists()) if FIXTURES.is_dir() else []
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def fixture_format(d: Path):
    return parse_format(json.loads((d / "config.json").read_text())["quantization_config"])


def layer_tensors(all_t: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in all_t.items()
            if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}


def convert_full(fmt, t: dict):
    """Whole-layer disk tensors -> (canonical weight, geometry), as loading at TP=1 does."""
    K, N = infer_shape(fmt, t)
    geo = LayerGeometry(K, N, K, N)
    specs = fmt.tensor_specs(geo)
    prepared = {s.name: fmt.prepare_loaded(s.name, t[s.name], geo) for s in specs if s.name in t}
    return fmt.to_canonical(prepared, geo).validate(), geo


def shard(fmt, t: dict, K: int, N: int, rank: int, tp: int, column: bool):
    """Cut one TP partition from whole disk tensors as the TensorSpec dims direct."""
    geo = LayerGeometry(K if column else K // tp, N // tp if column else N, K, N)
    full_geo = LayerGeometry(K, N, K, N)
    out = {}
    for spec in fmt.tensor_specs(geo):
        if spec.name not in t:
            continue
        x = fmt.prepare_loaded(spec.name, t[spec.name], full_geo)
        dim = spec.output_dim if column else spec.input_dim
        if dim is not None:
            size = spec.shape[dim]
            x = x.narrow(dim, rank * size, size)
        assert tuple(x.shape) == tuple(spec.shape), (spec, x.shape)
        out[spec.name] = x.contiguous()
    return fmt.to_canonical(out, geo).validate(), geo


# ---------------------------------------------------------------------------- producer oracles
@pytest.mark.parametrize("fixture", FIXTURE_DIRS, ids=lambda p: p.name)
def test_fixture_matches_producer_dequantization(fixture):
    fmt = fixture_format(fixture)
    tensors = load_file(str(fixture / "model.safetensors"))
    oracle = load_file(str(fixture / "oracle" / "dequantized.safetensors"))
    assert oracle, "fixture without oracle weights"
    for key, ref in oracle.items():
        prefix = key[: -len(".weight")]
        w, _ = convert_full(fmt, layer_tensors(tensors, prefix))
        got = dequantize(w, torch.float64)
        ref = ref.double()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-6, f"{fixture.name}:{prefix} relative error {err:.2e}"


@pytest.mark.parametrize("fixture", FIXTURE_DIRS, ids=lambda p: p.name)
def test_fixture_tp2_shards_are_slices(fixture):
    fmt = fixture_format(fixture)
    tensors = load_file(str(fixture / "model.safetensors"))
    oracle = load_file(str(fixture / "oracle" / "dequantized.safetensors"))
    for key in oracle:
        prefix = key[: -len(".weight")]
        t = layer_tensors(tensors, prefix)
        full, geo = convert_full(fmt, t)
        dense = dequantize(full, torch.float64)
        column = prefix.rsplit(".", 1)[-1] in COLUMN
        K, N = geo.in_full, geo.out_full
        if not column and fmt.group_size not in (-1, None) and (K // 2) % fmt.group_size:
            continue  # vLLM refuses this split too (group larger than the partition)
        for rank in range(2):
            part, pg = shard(fmt, t, K, N, rank, 2, column)
            got = dequantize(part, torch.float64)
            want = dense[rank * pg.out_per_partition:(rank + 1) * pg.out_per_partition] if column \
                else dense[:, rank * pg.in_per_partition:(rank + 1) * pg.in_per_partition]
            assert torch.equal(got, want), f"{fixture.name}:{prefix} rank {rank}"


def test_fixture_set_covers_the_matrix():
    names = {p.name for p in FIXTURE_DIRS}
    kinds = {type(fixture_format(p)).__name__ for p in FIXTURE_DIRS}
    assert {"GPTQFormat", "AWQFormat", "CompressedTensorsFormat", "AutoRoundGPTQ", "AutoRoundAWQ",
            "HQQFormat", "TorchAOFormat"} <= kinds
    assert len(names) >= 15
    total = sum(f.stat().st_size for p in FIXTURE_DIRS for f in p.rglob("*") if f.is_file())
    # dense fixtures ~11 MiB, tiny MoE fixtures (nine producers' exports) ~10.3 MiB
    assert total < 23 * 2**20, f"fixtures take {total / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- random layouts
def pack8(vals: torch.Tensor) -> torch.Tensor:
    """Independent reference packer: [..., 8m] codes -> int32 [..., m], value i at bits 4i."""
    v = vals.to(torch.int64).reshape(*vals.shape[:-1], -1, 8)
    word = sum(v[..., i] << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def random_quant(N, K, g, asym, seed, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    G = K // g
    q = torch.randint(0, 16, (N, K), generator=gen)
    s = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    zp = torch.randint(1, 16, (G, N), generator=gen) if asym else torch.full((G, N), 8)
    g_idx = torch.arange(K) // g
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    gi = g_idx.long()
    ref = (q.double() - zp.double().t()[:, gi]) * s.double().t()[:, gi]
    return q, s, zp, g_idx.to(torch.int32), ref


def gptq_disk(q, s, zp, g_idx, v2):
    return {"qweight": pack8(q).t().contiguous(), "scales": s,
            "qzeros": pack8(zp if v2 else zp - 1), "g_idx": g_idx}


def awq_disk(q, s, zp):
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i holds column order[i]

    def pack_awq(x):  # x [R, C]
        x = x.reshape(x.shape[0], -1, 8)[..., order]
        return pack8(x.reshape(x.shape[0], -1))
    return {"qweight": pack_awq(q.t().contiguous()), "scales": s, "qzeros": pack_awq(zp)}


def ct_disk(q, s, zp, g_idx, asym):
    d = {"weight_packed": pack8(q), "weight_scale": s.t().contiguous().bfloat16().float(),
         "weight_shape": torch.tensor([q.shape[0], q.shape[1]])}
    if asym:
        d["weight_zero_point"] = pack8(zp).t().contiguous()
    if g_idx is not None:
        d["weight_g_idx"] = g_idx
    return d


GROUPS = [32, 64, 128, -1]


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_random_gptq(g, v2, sym):
    N, K = 64, 256
    gg = K if g == -1 else g
    for act_order in ([False, True] if g != -1 else [False]):
        q, s, zp, g_idx, ref = random_quant(N, K, gg, not sym, seed=gg + v2, act_order=act_order)
        fmt = parse_format({"quant_method": "gptq", "bits": 4, "group_size": g, "sym": sym,
                            "desc_act": act_order,
                            "checkpoint_format": "gptq_v2" if v2 else "gptq"})
        w, _ = convert_full(fmt, gptq_disk(q, s, zp, g_idx, v2))
        assert w.zero_kind == (ZeroKind.NONE if sym else ZeroKind.INT)
        assert (w.g_idx is not None) == act_order
        assert torch.equal(dequantize(w, torch.float64), ref)


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("zero_point", [True, False])
def test_random_awq(g, zero_point):
    N, K = 64, 256
    q, s, zp, _, ref = random_quant(N, K, g, zero_point, seed=g)
    fmt = parse_format({"quant_method": "awq", "w_bit": 4, "q_group_size": g,
                        "zero_point": zero_point, "version": "gemm"})
    d = awq_disk(q, s, zp)
    if not zero_point:
        d.pop("qzeros")
    w, _ = convert_full(fmt, d)
    assert torch.equal(dequantize(w, torch.float64), ref)


def ct_config(g, sym, actorder=None, ignore=("lm_head",), targets=("Linear",)):
    w = {"num_bits": 4, "type": "int", "symmetric": sym,
         "strategy": "channel" if g == -1 else "group", "actorder": actorder}
    if g != -1:
        w["group_size"] = g
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": list(ignore), "config_groups": {"group_0": {
                "targets": list(targets), "weights": w, "input_activations": None}}}


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("actorder", [None, "weight", "group"])
def test_random_compressed_tensors(g, sym, actorder):
    if actorder == "group" and g == -1:
        pytest.skip("act-order groups need a group strategy")
    N, K = 64, 256
    gg = K if g == -1 else g
    q, s, zp, g_idx, _ = random_quant(N, K, gg, not sym, seed=gg, act_order=actorder == "group")
    s = s.bfloat16()
    gi = g_idx.long()
    ref = (q.double() - zp.double().t()[:, gi]) * s.double().t()[:, gi]
    fmt = parse_format(ct_config(g, sym, actorder))
    w, _ = convert_full(fmt, ct_disk(q, s, zp, g_idx if actorder == "group" else None, not sym))
    assert torch.equal(dequantize(w, torch.float64), ref)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_random_hqq(g):
    N, K = 64, 256
    gen = torch.Generator().manual_seed(g)
    q = torch.randint(0, 16, (N * K // g, g), generator=gen, dtype=torch.uint8)
    half = q.shape[0] // 2
    w_q = (q[:half] << 4) | q[half:]  # hqq's documented 4-bit row-split packing
    scale = torch.rand(N * K // g, 1, generator=gen) * 0.02 + 1e-3
    zero = torch.rand(N * K // g, 1, generator=gen) * 15
    ref = ((q.double() - zero.double()) * scale.double()).reshape(N, K)
    fmt = parse_format({"quant_method": "hqq", "skip_modules": ["lm_head"],
                        "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": g,
                                                                 "axis": 1}}})
    w, _ = convert_full(fmt, {"W_q": w_q, "scale": scale, "zero": zero,
                              "shape": torch.tensor([N, K])})
    assert w.zero_kind == ZeroKind.FLOAT
    assert torch.allclose(dequantize(w, torch.float64), ref, rtol=0, atol=1e-6 * ref.abs().max())


def torchao_config(layout, g):
    return {"quant_method": "torchao", "quant_type": {"default": {
        "_type": "Int4WeightOnlyConfig", "_version": 2,
        "_data": {"group_size": g, "int4_packing_format": layout}}}}


@pytest.mark.parametrize("g", [32, 64, 128])
def test_random_torchao(g):
    N, K = 64, 256
    q, s, zp, _, ref = random_quant(N, K, g, True, seed=g)
    w, _ = convert_full(parse_format(torchao_config("plain_int32", g)),
                        {"_weight_qdata": pack8(q), "_weight_scale": s.float(),
                         "_weight_zero_point": zp.to(torch.int8)})
    assert torch.equal(dequantize(w, torch.float64), ref)
    # plain: two signed nibbles per int8, even k in the low nibble; w = q_signed * s + z
    signed = q - 8
    qdata = ((signed[:, ::2] & 0xF) | (signed[:, 1::2] << 4)).to(torch.int8)
    z = (torch.rand(K // g, N) - 0.5).bfloat16().float()
    gi = torch.arange(K) // g
    ref2 = signed.double() * s.double().t()[:, gi] + z.double().t()[:, gi]
    w, _ = convert_full(parse_format(torchao_config("plain", g)),
                        {"_weight_qdata": qdata, "_weight_scale": s.float(), "_weight_zero_point": z})
    assert torch.allclose(dequantize(w, torch.float64), ref2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("g", [32, 64])
def test_random_tp_act_order_row_parallel(g):
    """desc_act on a row-parallel layer: each rank keeps the whole scale table and its g_idx."""
    N, K = 64, 256
    q, s, zp, g_idx, ref = random_quant(N, K, g, True, seed=3, act_order=True)
    fmt = parse_format({"quant_method": "gptq", "bits": 4, "group_size": g, "sym": False,
                        "desc_act": True})
    t = gptq_disk(q, s, zp, g_idx, False)
    for rank in range(2):
        part, pg = shard(fmt, t, K, N, rank, 2, column=False)
        assert part.g_idx is not None and part.scales.shape[0] == K // g
        got = dequantize(part, torch.float64)
        assert torch.equal(got, ref[:, rank * K // 2:(rank + 1) * K // 2])


# ---------------------------------------------------------------------------- configs
def test_detection_order_and_names():
    assert FORMATS[0].name == "int4xpu"
    for cfg, name in [({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
                      ({"quant_method": "awq", "bits": 4, "group_size": 128}, "awq"),
                      (ct_config(128, True), "compressed-tensors"),
                      ({"quant_method": "auto-round", "bits": 4, "group_size": 128,
                        "packing_format": "auto_round:auto_gptq"}, "auto-round"),
                      ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {
                          "nbits": 4, "group_size": 64, "axis": 1}}}, "hqq"),
                      (torchao_config("plain_int32", 128), "torchao")]:
        assert detect_format(cfg).name == name
        assert parse_format(cfg).name == name
    assert detect_format({"quant_method": "fp8"}) is None


@pytest.mark.parametrize("cfg, where", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits"),
    ({"quant_method": "awq", "bits": 3, "group_size": 128}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128,
      "dynamic": {r"+:.*down": {"bits": 8}}}, "dynamic"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "packing_format": "mlx"},
     "packing_format"),
    ({"quant_method": "auto-round", "bits": 4, "group_size": 128, "data_type": "nv_fp"},
     "data_type"),
    ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {
        "nbits": 4, "group_size": 64, "axis": 0}}}, "axis"),
    ({"quant_method": "hqq", "quant_config": {"weight_quant_params": {
        "nbits": 2, "group_size": 64, "axis": 1}}}, "bits"),
    (torchao_config("tile_packed_to_4d", 128), "int4_packing_format"),
    ({"quant_method": "torchao", "quant_type": "int4_weight_only"}, "quant_type"),
    ({"quant_method": "torchao", "quant_type": {"default": {
        "_type": "Int8WeightOnlyConfig", "_data": {}}}}, "_type"),
])
def test_refused_configs(cfg, where):
    with pytest.raises(Int4FormatError) as e:
        parse_format(cfg)
    assert e.value.file == "config.json" and where in e.value.tensor
    assert e.value.expected is not None


def test_torchao_tile_packed_message_says_what_to_do():
    with pytest.raises(Int4FormatError, match="plain_int32"):
        parse_format(torchao_config("tile_packed_to_4d", 128))


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "input_activations"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=8), "weights"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float"), "weights"),
    (lambda c: c.update(format="float-quantized") or c["config_groups"]["group_0"].pop("format", None),
     "format"),
    (lambda c: c["config_groups"].update(group_1={
        "targets": ["re:.*down_proj"], "input_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": 32}}), "config_groups"),
    (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "strategy"),
])
def test_compressed_tensors_refuses_other_schemes(mutate, where):
    cfg = ct_config(128, True)
    mutate(cfg)
    with pytest.raises(Int4FormatError) as e:
        parse_format(cfg)
    assert where in e.value.tensor


def test_skip_and_ignore_lists():
    ct = parse_format(ct_config(128, True, ignore=["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"]))
    assert ct.is_layer_quantized("model.layers.0.mlp.down_proj")
    assert not ct.is_layer_quantized("model.layers.1.mlp.down_proj")
    assert not ct.is_layer_quantized("lm_head")
    ct2 = parse_format(ct_config(128, True, ignore=[], targets=[r"re:.*self_attn\..*"]))
    assert ct2.is_layer_quantized("model.layers.0.self_attn.q_proj")
    assert not ct2.is_layer_quantized("model.layers.0.mlp.up_proj")
    gptq = parse_format({"quant_method": "gptq", "bits": 4, "group_size": 32,
                         "dynamic": {r"-:.*model\.layers\.1\.mlp\.down_proj.*": {}},
                         "modules_in_block_to_quantize": [["self_attn.q_proj", "mlp.down_proj"]]})
    assert gptq.is_layer_quantized("model.layers.0.mlp.down_proj")
    assert not gptq.is_layer_quantized("model.layers.1.mlp.down_proj")
    assert not gptq.is_layer_quantized("model.layers.0.self_attn.k_proj")
    awq = parse_format({"quant_method": "awq", "bits": 4, "group_size": 128,
                        "modules_to_not_convert": ["lm_head", "mlp.gate"]})
    assert not awq.is_layer_quantized("model.layers.3.mlp.gate")
    assert awq.is_layer_quantized("model.layers.3.mlp.gate_proj")
    ar = parse_format({"quant_method": "auto-round", "bits": 4, "group_size": 64, "sym": True,
                       "packing_format": "auto_round:auto_gptq",
                       "block_name_to_quantize": "model.layers",
                       "extra_config": {"model.layers.1.mlp.down_proj": {"bits": 16}}})
    assert not ar.is_layer_quantized("model.layers.1.mlp.down_proj")
    assert ar.is_layer_quantized("model.layers.1.mlp.up_proj")
    assert not ar.is_layer_quantized("lm_head")
    hqq = parse_format({"quant_method": "hqq", "skip_modules": ["lm_head"], "quant_config": {
        "weight_quant_params": {"nbits": 4, "group_size": 64, "axis": 1}}})
    assert not hqq.is_layer_quantized("lm_head")


def test_autoround_packings_pick_the_right_layout():
    base = {"quant_method": "auto-round", "bits": 4, "group_size": 64, "sym": False}
    v1 = parse_format({**base, "packing_format": "auto_round:auto_gptq"})
    v2 = parse_format({**base, "packing_format": "auto_round"})
    awq = parse_format({**base, "packing_format": "auto_round:auto_awq"})
    assert (v1.zp_offset, v2.zp_offset) == (1, 0)
    assert type(awq).__name__ == "AutoRoundAWQ"


def test_legacy_config_files_get_their_quant_method():
    """AutoAWQ's quant_config.json and AutoGPTQ's quantize_config.json carry no quant_method."""
    from vllm_int4xpu.formats import with_legacy_quant_method
    awq = parse_format(with_legacy_quant_method(
        {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}))
    assert awq.name == "awq" and awq.group_size == 64
    gptq = parse_format(with_legacy_quant_method(
        {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01}))
    assert gptq.name == "gptq" and gptq.group_size == 128
    native = {"quant_method": "int4xpu", "bits": 4, "group_size": 64, "zero_point": "int"}
    assert with_legacy_quant_method(native) is native
    assert with_legacy_quant_method({"bits": 4}) == {"bits": 4}  # unknown: left for the error


@pytest.mark.parametrize("alias, same_as", [("dynamic", "group"), ("static", None)])
def test_compressed_tensors_actorder_aliases(alias, same_as):
    """compressed-tensors' ActivationOrdering: "dynamic" aliases "group", "static" "weight"."""
    assert parse_format(ct_config(128, True, alias)).act_order == (same_as == "group")
    assert parse_format(ct_config(128, True, alias)).describe() == \
        parse_format(ct_config(128, True, same_as)).describe()
