"""MoE backend ``triton``: the fused Triton int4 MoE (``triton_kernels/fused_moe.py``).

Per layer call: gate_up + activation (one launch), down + router weight (one launch), a
deterministic reduce over the top-k slots and K splits (one launch, none where the down GEMM
reduces itself: ``SERIAL``), plus, on the tensor-core path only, a token sort in three Triton
launches (``fused_moe.sort_pairs_triton``: fixed sizes, no host sync). Nothing reads the
device on the host, so the call is CUDA-graph safe. The path and its launch parameters come from
:func:`choose_moe_config` (THE dispatch rule) over the tuned rows in :data:`MOE_CONFIGS`.

``prepare`` keeps the canonical stacked layout; act-order experts get their input channels
permuted once (groups contiguous) and keep the permutation ``perm`` [E, K], through which the
kernels gather A's columns.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..weight import Int4Experts, ZeroKind, act_order_permutation, permute_input_channels
from .moe_base import Int4MoEKernel, Int4MoESpec, check_moe_spec

try:  # a missing or broken Triton is a refusal, not an import error
    from .triton_kernels import fused_moe as fm
    from .triton_kernels.common import interpreting
    _TRITON_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the install
    fm = None
    _TRITON_ERROR = f"triton not importable ({type(e).__name__}: {e})"

_ZERO_CODE = {ZeroKind.NONE: 0, ZeroKind.INT: 1, ZeroKind.FLOAT: 2}
_ACT_CODE = {"silu": 0, "gelu": 1}
_MIN_BLOCK_K = 16  # tl.dot needs K tiles of at least 16

# Tuned launch rows (data): keyed by the largest pairs-per-expert (M * top_k / E) they serve.
# "gemv" rows: one pair per program on CUDA cores; "dot" rows: BLOCK_M sorted pairs per program
# on tensor cores. ``*_13`` / ``*_2`` are the gate_up / down GEMM; SPLIT_K applies to down only;
# a gemv BLOCK_K above the group size makes K tiles of several whole groups where K allows.
# SERIAL_PAIRS (gemv): up to this many pairs the down GEMM reduces into y itself (``SERIAL``,
# no reduce launch); above it the last arrival would sum too many partials (top_k x SPLIT_K).
# MAX_PAIRS (gemv): from this many pairs on the next row (dot) serves: a gemv program reads its
# expert's weight for its own pair, so once experts hold ~1.5 pairs each and there are enough
# pairs to amortize the token sort, reading each weight once per block wins (Qwen3-30B-A3B at 16
# tokens: 123 vs 155 µs), while 8 pairs on Mixtral's large experts stay faster on gemv (275 vs
# 286 µs). FEW_PROGRAMS (dot): the down launch used where the down GEMM would have fewer than
# 4 programs per SM (DOWN_MIN_PROGRAMS) with BLOCK_N_2 128: narrower N tiles and K split in two
# (Mixtral-8x7B at 16 and 64 tokens: 406 vs 426 and 442 vs 467 µs).
# Rows: the fastest of the candidates of benchmarks/bench_moe.py --sweep (fp16, group 128,
# Qwen3-30B-A3B and Mixtral-8x7B shapes): gemv rows timed on an H100, dot rows on an H200
# (benchmarks/results/bench_moe_sweep_gemv_h100.txt, bench_moe_sweep_gemv_serial_h100.txt,
# bench_moe_h200.json), the decode dot rows, MAX_PAIRS and FEW_PROGRAMS on an H100
# (--sweep-set decode_dot, bench_moe_sweep_decode_dot_h100.txt). Program order (GROUP_M 8 / all
# rows) and PDL, each row on an H100 (--sweep-set order_pdl,
# benchmarks/results/bench_moe_sweep_order_pdl_h100.txt): no row moved by more than the
# run-to-run spread, so both stay at their defaults (GROUP_M 1, no PDL). Taller blocks at 1024 /
# 4096 tokens, H100 (--sweep-set large_dot, bench_moe_sweep_large_dot_h100.txt): BLOCK_M 128 with
# the default tiles beat 64 at 256 pairs per expert (Qwen3-30B-A3B 4096 tokens 1098 vs 1155 µs,
# Mixtral-8x7B 1024 tokens 2398 vs 2557 µs) and lost to 32 at 64 (Qwen 1024: 467 vs 417 µs),
# hence 128 from 192 pairs per expert on; BLOCK_M 256 and 8-warp tiles were slower everywhere.
# XPERM_2 / XPERM_13 (dot: A handed over in fragment order; --sweep-set xperm,
# bench_moe_sweep_xperm_h100.txt) on an H100: XPERM_13 + XPERM_2 on the 128-row blocks
# (Qwen3-30B-A3B 4096 tokens 1073 -> 938 µs, Mixtral-8x7B 1024 / 4096 tokens 2347 -> 1868 /
# 7645 -> 6807 µs), XPERM_2 wherever a gate_up tile covers whole down K tiles (Qwen 16 / 64
# tokens 124 -> 116 / 181 -> 171 µs; with the down's 128-wide K tiles of FEW_PROGRAMS it cost
# 1-5 %). PDL between the gemv GEMMs with down's first weight tile fetched before its wait
# (PREFETCH) and gate_up releasing down at its start (PDL_EARLY), H100 (--sweep-set
# pdl_prefetch, bench_moe_sweep_pdl_prefetch_h100.txt): Qwen3-30B-A3B at 1 token 19.8-20.0 ->
# 18.7 µs, so on the first gemv row; at 4 tokens and on Mixtral-8x7B (1 / 4 tokens) no variant
# beat the spread, and PREFETCH alone cost up to 7 % (168 instead of 128 registers). A gemv
# down GEMM launches at most one K split per K tile (fm.gemv_splits): Qwen3-30B-A3B's down K of
# 768 is 3 tiles of 256, so SPLIT_K 8 / 4 run as 3 there (H100, --sweep-set down_split,
# bench_moe_sweep_down_split_h100.txt: 4 tokens 50.5 -> 43.1 µs, 1 token 18.7 -> 19.0, within
# the spread), while Mixtral-8x7B's 56 tiles keep the rows' splits.
DOWN_MIN_PROGRAMS = 528  # 4 x 132 SMs (H100 / H200)
_DOT = dict(path="dot", BLOCK_N_13=64, BLOCK_K_13=128, warps_13=4, BLOCK_N_2=128, BLOCK_K_2=64,
            SPLIT_K=1, warps_2=4, FRAG=2, stages=3, XPERM_2=True,
            FEW_PROGRAMS=dict(BLOCK_N_2=64, BLOCK_K_2=128, SPLIT_K=2))
MOE_CONFIGS = {
    "cuda": [
        (0.125, dict(path="gemv", SORTED=False, BLOCK_N_13=16, BLOCK_K_13=1024, warps_13=4,
                     BLOCK_N_2=64, BLOCK_K_2=256, SPLIT_K=4, warps_2=2,
                     SERIAL_PAIRS=1 << 30, PDL=True, PDL_EARLY=True, PREFETCH=True)),
        (2.0, dict(path="gemv", SORTED=False, BLOCK_N_13=16, BLOCK_K_13=256, warps_13=1,
                   BLOCK_N_2=32, BLOCK_K_2=256, SPLIT_K=8, warps_2=1, SERIAL_PAIRS=64,
                   MAX_PAIRS=64)),
        (24.0, dict(_DOT, BLOCK_M=16)),
        (96.0, dict(_DOT, BLOCK_M=32)),
        (192.0, dict(_DOT, BLOCK_M=64)),
        (float("inf"), dict(_DOT, BLOCK_M=128, XPERM_13=True)),
    ],
}
_ROW_KEYS = ("SERIAL_PAIRS", "MAX_PAIRS", "FEW_PROGRAMS")


@functools.lru_cache(maxsize=1024)
def choose_moe_config(pairs: int, num_experts: int, hidden: int, intermediate: int,
                      family: str = "cuda") -> dict:
    """THE dispatch rule: the launch row for ``pairs`` = M * top_k routed rows over
    ``num_experts``, by rows per expert (decode: ~1 per expert -> gemv; prefill -> dot) and, at
    the edges, by pairs (MAX_PAIRS) and the down GEMM's program count (FEW_PROGRAMS)."""
    rows = MOE_CONFIGS.get(family, MOE_CONFIGS["cuda"])
    per_expert = pairs / num_experts
    row = next((r for limit, r in rows
                if per_expert <= limit and pairs < r.get("MAX_PAIRS", float("inf"))),
               rows[-1][1])
    cfg = {k: v for k, v in row.items() if k not in _ROW_KEYS}
    cfg["SERIAL"] = pairs <= row.get("SERIAL_PAIRS", 0)
    if "FEW_PROGRAMS" in row:
        n_tiles = -(-hidden // row["BLOCK_N_2"])
        if fm.max_blocks(pairs, num_experts, row["BLOCK_M"]) * n_tiles < DOWN_MIN_PROGRAMS:
            cfg.update(row["FEW_PROGRAMS"])
    return cfg


def _permute_experts(w: Int4Experts) -> tuple[Int4Experts, torch.Tensor]:
    """Per expert: input channels sorted by group (act-order), perm [E, K] int32 (empty if none)."""
    dev = w.qweight.device
    if w.g_idx is None:
        return w, torch.empty(0, dtype=torch.int32, device=dev)
    perms, ws = [], []
    for ex in w.experts():
        p = act_order_permutation(ex.g_idx).to(dev)
        perms.append(p.to(torch.int32))
        ws.append(permute_input_channels(ex, p))
    stacked = Int4Experts.stack(ws, zero_kind=w.zero_kind)
    return stacked, torch.stack(perms).contiguous()


class TritonMoEKernel(Int4MoEKernel):
    name = "triton"
    tensor_names = ("w13_qweight", "w13_scales", "w13_zeros", "w13_perm",
                    "w2_qweight", "w2_scales", "w2_zeros", "w2_perm")

    @classmethod
    def can_implement(cls, spec: Int4MoESpec):
        why = check_moe_spec(spec)
        if why:
            return False, why
        if _TRITON_ERROR:
            return False, _TRITON_ERROR
        if spec.device_type not in ("cuda", "xpu") and not (
                spec.device_type == "cpu" and interpreting()):
            return False, (f"device {spec.device_type!r} has no Triton GPU target (cuda/xpu "
                           "only; cpu only under TRITON_INTERPRET=1)")
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, f"activation dtype {spec.act_dtype} not bf16/fp16"
        if spec.uneven_act_order:
            return False, ("act-order groups split unevenly across tensor-parallel ranks (no "
                           "per-expert permutation makes them contiguous)")
        for part, K, g in (("gate_up", spec.hidden, spec.group_w13),
                           ("down", spec.intermediate, spec.group_w2)):
            if K % 8:
                return False, f"{part}: in_features {K} not a multiple of 8"
            if g < K and (g & -g) < _MIN_BLOCK_K:
                return False, (f"{part}: group size {g} not a multiple of {_MIN_BLOCK_K} (a K "
                               f"tile of 16..256 must divide the group; per-channel is fine)")
        return True, None

    def prepare(self, w13: Int4Experts, w2: Int4Experts) -> dict[str, torch.Tensor]:
        out = {}
        for tag, w in (("w13", w13), ("w2", w2)):
            w, perm = _permute_experts(w)
            zeros = (w.zeros.contiguous() if w.zero_kind != ZeroKind.NONE
                     else torch.empty(0, dtype=torch.int8, device=w.qweight.device))
            out.update({f"{tag}_qweight": w.qweight.contiguous(),
                        f"{tag}_scales": w.scales.contiguous(), f"{tag}_zeros": zeros,
                        f"{tag}_perm": perm})
        return out

    def apply(self, tensors, x, topk_weights, topk_ids, config: Optional[dict] = None):
        """``config`` overrides :func:`choose_moe_config` (tests and tuning)."""
        q13, s13, z13, p13, q2, s2, z2, p2 = tensors
        spec = self.spec
        M, top_k = topk_ids.shape
        P = M * top_k
        E, H, I = spec.num_experts, spec.hidden, spec.intermediate
        cfg = config if config is not None else choose_moe_config(P, E, H, I)
        zk = _ZERO_CODE[spec.zero_kind]
        ids = topk_ids.reshape(-1)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(torch.int32)
        ids = ids.contiguous()
        topw = topk_weights.reshape(-1).to(torch.float32).contiguous()
        if cfg["path"] == "dot":
            sorting = fm.sort_pairs_triton(ids, E, cfg["BLOCK_M"])
        elif cfg.get("SORTED"):
            sorting = torch.argsort(ids, stable=True).to(torch.int32)
        else:
            sorting = None
        z13 = z13 if z13.numel() else s13
        z2 = z2 if z2.numel() else s2
        common = dict(path=cfg["path"], sorting=sorting, BLOCK_M=cfg.get("BLOCK_M", 16),
                      SORTED=cfg.get("SORTED", False), FRAG=cfg.get("FRAG", 0),
                      GROUP_M=cfg.get("GROUP_M", 1), PDL=cfg.get("PDL", False),
                      PDL_EARLY=cfg.get("PDL_EARLY", False), PREFETCH=cfg.get("PREFETCH", False),
                      num_stages=cfg.get("stages", 2))
        h_order = None  # XPERM_2: gate_up writes h in the down GEMM's fragment order
        if cfg["path"] == "dot" and cfg.get("XPERM_2"):
            h_order = fm.x_order(fm.dot_operand(
                x.dtype, s2.dtype, z2.dtype, zk, spec.group_w2, I, p2.numel() > 0, False,
                cfg["BLOCK_N_2"], cfg["BLOCK_K_2"], cfg["warps_2"], common["FRAG"], x.is_cuda), I,
                common["num_stages"])
            if h_order and cfg["BLOCK_N_13"] % h_order[0]:
                h_order = None  # a gate_up tile would write parts of two down K tiles' columns
        h = torch.empty((P, I), dtype=x.dtype, device=x.device)
        fm.moe_gemm(x, q13, s13, z13, p13, zk, spec.group_w13, h, ids, topw, top_k, True,
                    act=_ACT_CODE[spec.activation], BLOCK_N=cfg["BLOCK_N_13"],
                    BLOCK_K=cfg["BLOCK_K_13"], num_warps=cfg["warps_13"],
                    XPERM=cfg.get("XPERM_13", False), out_order=h_order, **common)
        split = cfg.get("SPLIT_K", 1)
        if cfg["path"] == "gemv":  # at most one split per K tile: no empty programs
            split = fm.gemv_splits(split, cfg["BLOCK_K_2"], spec.group_w2, I)
        # the dot path's partials (P x H, large at prefill) in the activation dtype: half the
        # traffic of fp32 through the reduce, as vLLM's own intermediate; fp32 for the gemv path
        ws = torch.empty((split, P, H), dtype=x.dtype if cfg["path"] == "dot" else torch.float32,
                         device=x.device)
        y = torch.empty((M, H), dtype=x.dtype, device=x.device)
        serial = (cfg["path"] == "gemv" and cfg.get("SERIAL", False)
                  and fm.serial_ok(M, H, cfg["BLOCK_N_2"]))
        if fm.moe_gemm(h, q2, s2, z2, p2, zk, spec.group_w2, ws, ids, topw, top_k, False,
                       BLOCK_N=cfg["BLOCK_N_2"], BLOCK_K=cfg["BLOCK_K_2"], SPLIT_K=split,
                       num_warps=cfg["warps_2"], y=y if serial else None, a_order=h_order,
                       **common):
            return y  # the down GEMM's last arrivals reduced into y
        return fm.moe_reduce(ws, y, top_k)
