"""The fused Triton int4 MoE under the Triton interpreter (CPU, no GPU): both paths (gemv / dot),
every zero-point kind, group sizes, act-order, top-k 1/2/8, idle experts, ragged shapes, bf16 and
fp16, against the float64 oracle ``reference_moe``; the token sort, the dispatch rule and the
refusals on their own.

TRITON_INTERPRET=1 must be set before a @triton.jit function is *defined*; if another test module
already imported the kernels in GPU mode, this file re-runs itself in a subprocess.
"""

import triton_interp  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)


import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
IN_SUBPROCESS = triton_interp.must_rerun()
interpreted = pytest.mark.skipif(IN_SUBPROCESS, reason="kernels imported in GPU mode here; "
                                 "test_rerun_in_subprocess runs this file in interpreter mode")

from vllm_int4xpu.kernels import moe_triton as mt  # noqa: E402
from vllm_int4xpu.kernels.moe_base import Int4MoESpec  # noqa: E402
from vllm_int4xpu.kernels.triton_kernels import fused_moe as fm  # noqa: E402
from vllm_int4xpu.weight import (Int4Experts, ZeroKind, quantize_rtn,  # noqa: E402
                                 reference_moe)


@pytest.mark.skipif(not IN_SUBPROCESS, reason="kernels are interpreted in this process")
def test_rerun_in_subprocess():
    triton_interp.rerun_in_subprocess(__file__)


# The interpreter converts fp32 -> bf16 by truncation (measured: 2x the rounding error of a
# round-to-nearest cast), and the dot path rounds the dequantized weight and the intermediate to
# bf16: 2e-2 here; the GPU tests (tests/gpu/test_triton_moe_gpu.py) hold bf16 to 1e-2.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
GEMV = dict(path="gemv", BLOCK_N_13=16, BLOCK_K_13=64, warps_13=1, BLOCK_N_2=32, BLOCK_K_2=64,
            SPLIT_K=2, warps_2=1)
DOT = dict(path="dot", BLOCK_M=16, BLOCK_N_13=32, BLOCK_K_13=64, warps_13=1, BLOCK_N_2=16,
           BLOCK_K_2=64, SPLIT_K=2, warps_2=1, FRAG=2)


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def make_experts(E, N, K, group, zero_kind, dtype, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(E):
        w = quantize_rtn(torch.randn(N, K, generator=gen) * 0.1, group, zero_kind,
                         scale_dtype=dtype)
        if act_order:
            w.g_idx = (torch.randperm(K, generator=gen) % (K // w.group_size)).to(torch.int32)
        ws.append(w)
    return Int4Experts.stack(ws)


def make_layer(E, H, I, group, zero_kind, dtype, act_order=False, seed=0, activation="silu"):
    w13 = make_experts(E, 2 * I, H, group, zero_kind, dtype, act_order, seed)
    w2 = make_experts(E, H, I, group if group != -1 else -1, zero_kind, dtype, act_order,
                      seed + 1)
    spec = Int4MoESpec.of(w13, w2, dtype, "cpu", activation)
    ok, why = mt.TritonMoEKernel.can_implement(spec)
    assert ok, why
    kern = mt.TritonMoEKernel(spec)
    prepared = kern.prepare(w13, w2)
    assert list(prepared) == list(kern.tensor_names)
    return w13, w2, kern, [prepared[n] for n in kern.tensor_names]


def routing(M, E, top_k, seed=0, experts=None):
    """Distinct experts per token (from ``experts`` when given), random router weights."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts) if experts is not None else torch.arange(E)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]] for _ in range(M)])
    return torch.rand(M, top_k, generator=gen), ids


# (path, zero kind, group, dtype, top-k, act-order): each kind with each path; group size,
# dtype, top-k and act-order rotate. H = 192, I = 160 (192 for group 64) are multiples of the
# group but not powers of two; group -1 is per-channel (K tiles masked at the tail).
CASES = [
    ("gemv", ZeroKind.NONE, 32, torch.bfloat16, 2, False),
    ("gemv", ZeroKind.INT, 64, torch.float16, 8, True),
    ("gemv", ZeroKind.FLOAT, -1, torch.bfloat16, 1, False),
    ("dot", ZeroKind.NONE, 64, torch.float16, 2, True),
    ("dot", ZeroKind.INT, -1, torch.bfloat16, 8, False),
    ("dot", ZeroKind.FLOAT, 32, torch.float16, 1, False),
    ("gemv", ZeroKind.NONE, 32, torch.float16, 2, True),
    ("dot", ZeroKind.INT, 32, torch.bfloat16, 2, True),
]


@interpreted
@pytest.mark.parametrize("path,zero_kind,group,dtype,top_k,act_order", CASES,
                         ids=[f"{p}-{z.value}-g{g}-{str(d)[6:]}-k{k}{'-act' if a else ''}"
                              for p, z, g, d, k, a in CASES])
def test_paths_match_oracle(path, zero_kind, group, dtype, top_k, act_order):
    E, H, I, M = 8, 192, 160, 3
    if group == 64:
        I = 192
    w13, w2, kern, t = make_layer(E, H, I, group, zero_kind, dtype, act_order, seed=group)
    # experts 2 and 5 receive no token
    tw, ids = routing(M, E, top_k, seed=top_k,
                      experts=[0, 1, 3, 4, 6, 7] if top_k <= 6 else None)
    x = torch.randn(M, H, dtype=dtype)
    y = kern.apply(t, x, tw, ids, config=GEMV if path == "gemv" else DOT)
    assert y.shape == (M, H) and y.dtype == dtype
    assert rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[dtype]


@interpreted
@pytest.mark.parametrize("zero_kind,block_k,act_order", [(ZeroKind.FLOAT, 64, False),
                                                         (ZeroKind.INT, 128, True),
                                                         (ZeroKind.NONE, 128, False)])
def test_gemv_tiles_of_several_groups(zero_kind, block_k, act_order):
    """GEMV K tiles spanning 2 or 4 groups of 32 (each group's sums meet its own scale and
    offset), held groups-outer; gate_up's K = 192 and down's K = 128 are whole tiles, down split
    in 2."""
    E, H, I, M = 6, 192, 128, 4
    w13, w2, kern, t = make_layer(E, H, I, 32, zero_kind, torch.float16, act_order, seed=block_k)
    tw, ids = routing(M, E, 2, seed=5, experts=[0, 2, 3, 5])
    x = torch.randn(M, H, dtype=torch.float16)
    cfg = dict(GEMV, BLOCK_K_13=block_k // 2 if block_k == 128 else block_k, BLOCK_K_2=block_k)
    assert rel(kern.apply(t, x, tw, ids, config=cfg), reference_moe(x, w13, w2, tw, ids)) \
        < TOL[torch.float16]


@interpreted
@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_group_128_gelu_sorted(path):
    """Group 128, gelu, GEMV walking the pairs in expert order (SORTED), dot with BLOCK_M 32 and
    FRAG 0 (the interleaving unpack), default dispatch on top."""
    w13, w2, kern, t = make_layer(4, 256, 128, 128, ZeroKind.INT, torch.bfloat16, seed=7,
                                  activation="gelu")
    tw, ids = routing(5, 4, 2, seed=3)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ref = reference_moe(x, w13, w2, tw, ids, activation="gelu")
    cfg = dict(GEMV, SORTED=True) if path == "gemv" else dict(DOT, BLOCK_M=32, FRAG=0)
    assert rel(kern.apply(t, x, tw, ids, config=cfg), ref) < TOL[torch.bfloat16]
    if path == "gemv":  # the dispatcher's own choice (a dot row at 2.5 pairs per expert)
        assert rel(kern.apply(t, x, tw, ids), ref) < TOL[torch.bfloat16]


# (zero kind, group, top-k, act-order, BLOCK_K, M, SPLIT_K): the down GEMM reducing in its own
# programs (SERIAL: the last of a token's top-k x split arrivals sums them into y), one case per
# zero kind: K tiles of two groups (BLOCK_K 64 over group 32), top-8 with act-order, and
# per-channel with more K splits asked for than down has tiles (SPLIT_K 4 over 2 tiles: 2 are
# launched, and the last of top_k x 2 arrivals reduces).
SERIAL = [
    (ZeroKind.NONE, 32, 2, False, 64, 5, 2),
    (ZeroKind.INT, 64, 8, True, 64, 3, 1),
    (ZeroKind.FLOAT, -1, 2, False, 64, 4, 4),
]


@interpreted
@pytest.mark.parametrize("zero_kind,group,top_k,act_order,block_k,M,split", SERIAL,
                         ids=[f"{z.value}-g{g}-k{k}{'-act' if a else ''}-bk{bk}-M{m}-s{sp}"
                              for z, g, k, a, bk, m, sp in SERIAL])
def test_gemv_serial_reduce(zero_kind, group, top_k, act_order, block_k, M, split):
    from vllm_int4xpu.kernels.triton_kernels.common import tile_counters
    E, H, I = 8, 192, 128
    assert fm.gemv_splits(split, block_k, group if group > 0 else I, I) == min(split, I // block_k)
    w13, w2, kern, t = make_layer(E, H, I, group, zero_kind, torch.float16, act_order,
                                  seed=block_k + 10 * top_k)
    tw, ids = routing(M, E, top_k, seed=M, experts=[0, 1, 3, 4, 6, 7] if top_k <= 6 else None)
    x = torch.randn(M, H, dtype=torch.float16)
    cfg = dict(GEMV, SERIAL=True, BLOCK_K_13=block_k, BLOCK_K_2=block_k, SPLIT_K=split)
    ref = reference_moe(x, w13, w2, tw, ids)
    y = kern.apply(t, x, tw, ids, config=cfg)
    assert rel(y, ref) < TOL[torch.float16]
    # the counters are left at zero (ready for the next call or graph replay), and the result
    # is bit-equal to the reduce launch's (the same fp32 summation order)
    assert int(tile_counters(x.device).abs().sum()) == 0
    assert torch.equal(kern.apply(t, x, tw, ids, config=dict(cfg, SERIAL=False)), y)


@interpreted
@pytest.mark.parametrize("block_k,split", [(32, 1), (64, 2)])
def test_gemv_down_prefetch(block_k, split):
    """The down GEMM fetching each weight tile one tile ahead (PREFETCH: the first before PDL's
    wait for gate_up): one-group tiles (4 per program) and two-group tiles (one per K split),
    bit-equal to the plain loop and against the oracle."""
    w13, w2, kern, t = make_layer(6, 192, 128, 32, ZeroKind.INT, torch.float16, seed=block_k)
    tw, ids = routing(3, 6, 2, seed=1)
    x = torch.randn(3, 192, dtype=torch.float16)
    cfg = dict(GEMV, BLOCK_K_2=block_k, SPLIT_K=split)
    y = kern.apply(t, x, tw, ids, config=dict(cfg, PREFETCH=True))
    assert torch.equal(y, kern.apply(t, x, tw, ids, config=cfg))
    assert rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[torch.float16]


@interpreted
def test_dot_several_blocks_per_expert():
    """Many rows on few experts: several (partly padded) BLOCK_M blocks per expert."""
    w13, w2, kern, t = make_layer(3, 64, 32, 32, ZeroKind.FLOAT, torch.float16, seed=9)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2, (21, 1), generator=gen)  # expert 2 idle, 21 rows over 2 experts
    tw = torch.rand(21, 1, generator=gen)
    x = torch.randn(21, 64, dtype=torch.float16)
    y = kern.apply(t, x, tw, ids, config=dict(DOT, SPLIT_K=1))
    assert rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[torch.float16]


@interpreted
@pytest.mark.parametrize("frag,zero_kind,group", [(2, ZeroKind.INT, -1), (1, ZeroKind.FLOAT, -1),
                                                  (2, ZeroKind.NONE, 32), (2, ZeroKind.FLOAT, 64)])
def test_dot_operands_pre_permuted(frag, zero_kind, group, monkeypatch):
    """XPERM_13 (x gathered into the gate_up's fragment order before the launch) and XPERM_2
    (gate_up writes h in the down GEMM's fragment order): the same products in the same order as
    the per-tile permute in the kernel, so bit-equal to it. The orders taken are the launches'
    own (K tiles of 128 for gate_up, 32 or 64 for down; a 32 or 64 group leaves gate_up without
    one, so XPERM_13 is a no-op there), and the h a pre-permuted gate_up writes is the plain h
    with its columns moved to frag_positions (a wrong order could not pass)."""
    H, I = 128, 64
    w13, w2, kern, t = make_layer(3, H, I, group, zero_kind, torch.float16, seed=13)
    tw, ids = routing(4, 3, 2, seed=2)
    x = torch.randn(4, H, dtype=torch.float16)
    base = dict(DOT, BLOCK_K_13=128, BLOCK_N_13=64, BLOCK_K_2=64, FRAG=frag, SPLIT_K=1)
    seen = []  # (gated, x_order / out_order asked for, h written) per launch
    real = fm.moe_gemm

    def spy(a, q, s, z, p, zk, g, out, *args, **kw):
        r = real(a, q, s, z, p, zk, g, out, *args, **kw)
        seen.append((args[3], kw.get("XPERM"), kw.get("out_order"), kw.get("a_order"),
                     out.clone()))
        return r
    monkeypatch.setattr(fm, "moe_gemm", spy)
    y = kern.apply(t, x, tw, ids, config=base)
    assert rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[torch.float16]
    h_plain = seen[0][4]
    g13, g2 = kern.spec.group_w13, kern.spec.group_w2
    zk = mt._ZERO_CODE[zero_kind]
    (_, s13, z13, _, _, s2, z2, _) = t
    stages = base.get("stages", 2)
    order13 = fm.x_order(fm.dot_operand(x.dtype, s13.dtype, z13.dtype, zk, g13, H, False, True,
                                        64, 128, 1, frag, False), H, stages)
    order2 = fm.x_order(fm.dot_operand(x.dtype, s2.dtype, z2.dtype, zk, g2, I, False, False, 16,
                                       64, 1, frag, False), I, stages)
    assert fm.x_order(fm.dot_operand(x.dtype, s2.dtype, z2.dtype, zk, g2, I, False, False, 16,
                                     64, 1, frag, False), I, 4) is None  # 4 stages: NaN seen
    # gate_up K tiles of a 32 or 64 group are below 128: no fragment order there (dot_operand);
    # float zero points of another dtype than x take FRAG 1 (no packed pair)
    packed = frag == 2 and (zero_kind != ZeroKind.FLOAT or z2.dtype == x.dtype)
    assert order13 == (None if group in (32, 64) else (128, packed))
    assert order2 == (32 if group == 32 else 64, packed)
    from vllm_int4xpu.kernels.triton_kernels.gemm import frag_positions
    for knobs in (dict(XPERM_2=True), dict(XPERM_13=True, XPERM_2=True)):
        seen.clear()
        assert torch.equal(kern.apply(t, x, tw, ids, config=dict(base, **knobs)), y), knobs
        (_, xperm, out_order, _, h), (_, _, _, a_order, _) = seen
        assert out_order == a_order == order2 and bool(xperm) == ("XPERM_13" in knobs)
        moved = torch.empty_like(h_plain)
        moved[:, frag_positions(I, order2[0], order2[1])] = h_plain
        assert torch.equal(h, moved) and not torch.equal(h, h_plain)


def test_frag_positions_is_a_permutation_per_tile():
    """The host twin maps every K tile onto itself, one to one, for each tile size and order."""
    from vllm_int4xpu.kernels.triton_kernels.gemm import frag_positions
    for bk in (32, 64, 128, 256):
        for packed in (False, True):
            pos = frag_positions(2 * bk, bk, packed)
            assert torch.equal(pos.sort().values, torch.arange(2 * bk))
            assert (pos // bk == torch.arange(2 * bk) // bk).all()
            assert not torch.equal(pos, torch.arange(2 * bk))


@interpreted
@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_grouped_program_order(path):
    """GROUP_M rows (pairs or blocks) walking the N tiles together: every (N tile, row) is still
    computed exactly once, so the result is bit-equal to the row-by-row order: a group that
    divides neither the rows nor the N tiles (3), and on the dot path one above all rows (64)."""
    w13, w2, kern, t = make_layer(6, 64, 80, 16, ZeroKind.INT, torch.float16, seed=11)
    tw, ids = routing(4, 6, 2, seed=5)
    x = torch.randn(4, 64, dtype=torch.float16)
    base = dict(GEMV, SERIAL=True, BLOCK_N_2=16) if path == "gemv" else dict(DOT, BLOCK_M=4)
    y = kern.apply(t, x, tw, ids, config=base)
    assert rel(y, reference_moe(x, w13, w2, tw, ids)) < TOL[torch.float16]
    for g in (3, 64) if path == "dot" else (3,):
        assert torch.equal(kern.apply(t, x, tw, ids, config=dict(base, GROUP_M=g)), y)


@interpreted
@pytest.mark.parametrize("M,top_k,E,bm", [(5, 2, 5, 4), (37, 8, 16, 16), (300, 2, 8, 64),
                                          (1, 8, 128, 16), (700, 4, 40, 32), (16, 8, 128, 16),
                                          (16, 2, 8, 16)])
def test_sort_pairs_triton_equals_torch(M, top_k, E, bm):
    """The Triton sort gives the torch sort's runs (stable order, padding, block experts,
    padded count): in one launch where the pairs fit one chunk of 128 (up to exactly 128), in
    three over many chunks; idle experts."""
    gen = torch.Generator().manual_seed(M)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(M)])
    ref = fm.sort_pairs(ids, E, bm)
    got = fm.sort_pairs_triton(ids.to(torch.int32), E, bm)
    n = int(ref[2])
    assert int(got[2]) == n
    assert torch.equal(got[0][:n], ref[0][:n])
    assert torch.equal(got[1], ref[1])


def test_sort_pairs_blocks_and_padding(monkeypatch):
    """sort_pairs: every pair once, each block one expert, padding = the sentinel P, sizes
    fixed by (P, E, BLOCK_M) alone, and no host read (item / tolist / bool raise here)."""
    E, bm = 5, 4
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 4], [1, 3]])  # expert 2 idle
    P = ids.numel()

    def no_sync(*a, **k):
        raise AssertionError("host sync in sort_pairs")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "nonzero"):
            mp.setattr(torch.Tensor, name, no_sync)
        sorted_ids, block_expert, npad = fm.sort_pairs(ids, E, bm)
    assert sorted_ids.shape == (P + E * (bm - 1),)
    assert block_expert.numel() == fm.max_blocks(P, E, bm)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert int(npad) == int(((counts + bm - 1) // bm * bm).sum())
    used = sorted_ids[:int(npad)]
    assert sorted(used[used < P].tolist()) == list(range(P))
    assert bool((sorted_ids[int(npad):] == P).all())
    flat = ids.flatten()
    for b in range(int(npad) // bm):
        rows = used[b * bm:(b + 1) * bm]
        rows = rows[rows < P]
        assert len(rows) and bool((flat[rows] == block_expert[b]).all())


def test_dispatch_rule():
    assert mt.choose_moe_config(8, 128, 2048, 768)["path"] == "gemv"  # 1 token, Qwen3-30B-A3B
    assert mt.choose_moe_config(2, 8, 4096, 14336)["path"] == "gemv"  # 1 token, Mixtral
    # the gemv down GEMM reduces itself (at most SERIAL_PAIRS pairs); the dot path never does
    assert mt.choose_moe_config(8, 128, 2048, 768)["SERIAL"]
    assert mt.choose_moe_config(8, 8, 4096, 14336)["SERIAL"]
    assert not mt.choose_moe_config(64, 128, 2048, 768)["SERIAL"]
    for key in mt._ROW_KEYS:
        assert key not in mt.choose_moe_config(8, 128, 2048, 768)
        assert key not in mt.choose_moe_config(32, 8, 4096, 14336)
    # ~1 pair per expert: gemv for a few pairs, sorted blocks once there are enough (MAX_PAIRS)
    assert mt.choose_moe_config(32, 128, 2048, 768)["path"] == "gemv"  # 4 Qwen tokens
    assert mt.choose_moe_config(8, 8, 4096, 14336)["path"] == "gemv"  # 4 Mixtral tokens
    assert mt.choose_moe_config(128, 128, 2048, 768)["path"] == "dot"  # 16 Qwen tokens
    # a down GEMM of few programs splits K (FEW_PROGRAMS); one of many does not
    few = mt.choose_moe_config(32, 8, 4096, 14336)  # 16 Mixtral tokens: ~10 blocks x 32 tiles
    assert few["path"] == "dot" and few["SPLIT_K"] == 2 and few["BLOCK_N_2"] == 64
    assert mt.choose_moe_config(128, 128, 2048, 768)["SPLIT_K"] == 1
    big = mt.choose_moe_config(4096 * 8, 128, 2048, 768)  # 256 pairs per expert: 128-row blocks
    assert big["path"] == "dot" and big["BLOCK_M"] == 128
    assert mt.choose_moe_config(1024 * 2, 8, 4096, 14336)["BLOCK_M"] == 128  # Mixtral, 1024 tokens
    assert mt.choose_moe_config(1024 * 8, 128, 2048, 768)["BLOCK_M"] == 32  # Qwen, 1024 tokens
    for pairs in (1, 8, 64, 512, 4096, 32768):  # every row is complete
        cfg = mt.choose_moe_config(pairs, 128, 2048, 768)
        assert {"path", "BLOCK_N_13", "BLOCK_K_13", "BLOCK_N_2", "BLOCK_K_2"} <= set(cfg)
    assert fm.max_blocks(8, 128, 16) == 8  # one partial block per hit expert at most
    assert fm.max_blocks(4096, 8, 64) == triton.cdiv(4096 + 8 * 63, 64)


def _spec(**kw):
    base = dict(num_experts=8, hidden=2048, intermediate=768, group_w13=128, group_w2=128,
                zero_kind=ZeroKind.NONE, has_g_idx=False, act_dtype=torch.float16,
                device_type="cuda")
    base.update(kw)
    return Int4MoESpec(**base)


def test_can_implement_and_refusals(monkeypatch):
    assert mt.TritonMoEKernel.can_implement(_spec()) == (True, None)
    assert mt.TritonMoEKernel.can_implement(_spec(device_type="xpu"))[0]
    assert mt.TritonMoEKernel.can_implement(_spec(group_w13=2048, group_w2=768))[0]
    for bad, word in [(_spec(group_w13=8), "group size 8"), (_spec(group_w2=24), "group size 24"),
                      (_spec(act_dtype=torch.float32), "dtype"),
                      (_spec(activation="relu"), "activation"),
                      (_spec(uneven_act_order=True), "unevenly"),
                      (_spec(hidden=2052, group_w13=2052), "multiple of 8")]:
        ok, why = mt.TritonMoEKernel.can_implement(bad)
        assert not ok and word in why, (bad, why)
    monkeypatch.setattr(mt, "interpreting", lambda: False)
    ok, why = mt.TritonMoEKernel.can_implement(_spec(device_type="cpu"))
    assert not ok and "cpu" in why


@interpreted
def test_checks_can_fail():
    """The oracle comparison catches a wrong expert (ids shifted) and wrong router weights."""
    w13, w2, kern, t = make_layer(4, 64, 32, 32, ZeroKind.INT, torch.float16, seed=4)
    tw, ids = routing(2, 4, 2, seed=5)
    x = torch.randn(2, 64, dtype=torch.float16)
    ref = reference_moe(x, w13, w2, tw, ids)
    assert rel(kern.apply(t, x, tw, ids, config=GEMV), ref) < TOL[torch.float16]
    assert rel(kern.apply(t, x, tw, (ids + 1) % 4, config=GEMV), ref) > 0.1
    assert rel(kern.apply(t, x, tw.flip(-1), ids, config=DOT), ref) > 0.05
