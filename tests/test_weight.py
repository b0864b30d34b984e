"""The canonical weight: packing, RTN quantization, reference dequantize, validation."""

from __future__ import annotations

import pytest
import torch

from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.weight import (Int4Weight, ZeroKind, act_order_permutation, dequantize, pack_int4,
                                 permute_input_channels, quantize_rtn, reference_linear, unpack_int4)

GROUPS = [32, 64, 128, -1]
KINDS = [ZeroKind.NONE, ZeroKind.INT, ZeroKind.FLOAT]


def naive_dequant(w: Int4Weight) -> torch.Tensor:
    """Element by element from the DESIGN.md §1 definition (independent of weight.dequantize)."""
    N, K = w.out_features, w.in_features
    out = torch.empty(N, K, dtype=torch.float64)
    qw = w.qweight.tolist()
    for n in range(N):
        for k in range(K):
            q = (qw[n][k // 8] >> (4 * (k % 8))) & 0xF
            g = int(w.g_idx[k]) if w.g_idx is not None else k // w.group_size
            s = float(w.scales[g, n])
            if w.zero_kind == ZeroKind.NONE:
                out[n, k] = (q - 8) * s
            elif w.zero_kind == ZeroKind.INT:
                out[n, k] = (q - int(w.zeros[g, n])) * s
            else:
                out[n, k] = (q - 8) * s + float(w.zeros[g, n])
    return out


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.int32)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (7, 8)
    assert torch.equal(unpack_int4(packed).to(torch.int32), codes)
    # low nibble first: element 0 in bits 0..3, element 7 in bits 28..31
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 0], one[0, 7] = 3, 0xF
    assert pack_int4(one).item() == (3 | (0xF << 28)) - (1 << 32)


def test_pack_rejects_out_of_range():
    with pytest.raises(Int4FormatError, match="out of range"):
        pack_int4(torch.full((1, 8), 16))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [32, -1])
def test_dequantize_matches_naive_definition(kind, group):
    torch.manual_seed(1)
    w = quantize_rtn(torch.randn(5, 64), group, kind)
    assert torch.allclose(dequantize(w, torch.float64), naive_dequant(w), atol=1e-12)


def test_dequantize_with_g_idx_matches_naive():
    torch.manual_seed(2)
    w = quantize_rtn(torch.randn(6, 64), 16, ZeroKind.INT)
    w.g_idx = torch.randint(0, 4, (64,), dtype=torch.int32)
    assert torch.allclose(dequantize(w, torch.float64), naive_dequant(w), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
def test_rtn_error_is_within_half_a_step(kind, group):
    torch.manual_seed(3)
    N, K = 48, 256
    W = torch.randn(N, K) * torch.rand(N, 1) * 3
    w = quantize_rtn(W, group, kind, scale_dtype=torch.float32).validate()
    g = K if group == -1 else group
    err = (dequantize(w, torch.float64) - W.double()).abs().view(N, K // g, g)
    step = w.scales.double().t().unsqueeze(-1)
    # round-to-nearest: half a step, plus the clamp at the grid's ends for symmetric
    bound = step * (0.5 if kind != ZeroKind.NONE else 1.0) + 1e-6
    assert (err <= bound).all()
    assert float(err.mean()) < float(step.mean()) * 0.3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_reference_linear_equals_float64_matmul(kind, group, M):
    torch.manual_seed(4)
    w = quantize_rtn(torch.randn(40, 128), group, kind)
    x = torch.randn(M, 128, dtype=torch.float64)
    bias = torch.randn(40, dtype=torch.float64)
    expect = x @ naive_dequant(w).t() + bias
    assert torch.allclose(reference_linear(x, w, bias), expect, rtol=1e-10, atol=1e-10)


def test_act_order_permutation_preserves_the_function():
    torch.manual_seed(5)
    w = quantize_rtn(torch.randn(32, 128), 32, ZeroKind.INT)
    w.g_idx = (torch.randperm(128) // 32).to(torch.int32)
    perm = act_order_permutation(w.g_idx)
    wp = permute_input_channels(w, perm)
    assert wp.g_idx is None
    x = torch.randn(3, 128, dtype=torch.float64)
    assert torch.allclose(reference_linear(x[:, perm], wp), reference_linear(x, w), atol=1e-10)


def test_uneven_act_order_groups_are_refused():
    w = quantize_rtn(torch.randn(8, 64), 32, ZeroKind.INT)
    w.g_idx = torch.zeros(64, dtype=torch.int32)
    w.g_idx[:10] = 1
    with pytest.raises(Int4FormatError, match="uneven"):
        permute_input_channels(w, act_order_permutation(w.g_idx))


@pytest.mark.parametrize("mutate, match", [
    (lambda w: setattr(w, "qweight", w.qweight[:, :-1]), "qweight shape"),
    (lambda w: setattr(w, "qweight", w.qweight.to(torch.int64)), "qweight dtype"),
    (lambda w: w.scales.__setitem__((0, 0), float("nan")), "NaN or inf"),
    (lambda w: w.scales.__setitem__((0, 0), float("inf")), "NaN or inf"),
    (lambda w: w.zeros.__setitem__((0, 0), 16), "out of range"),
    (lambda w: setattr(w, "group_size", 48), "group size"),
    (lambda w: setattr(w, "g_idx", torch.zeros(10, dtype=torch.int32)), "g_idx length"),
    (lambda w: setattr(w, "zeros", None), "zero points missing"),
])
def test_validate_names_tensor_expected_found(mutate, match):
    w = quantize_rtn(torch.randn(16, 128), 32, ZeroKind.INT)
    mutate(w)
    with pytest.raises(Int4FormatError, match=match) as e:
        w.validate(file="model.safetensors", name="layers.0.q_proj")
    msg = str(e.value)
    assert "file=model.safetensors" in msg and "tensor=layers.0.q_proj." in msg
    assert "expected=" in msg and "found=" in msg


def test_group_size_must_divide_k():
    with pytest.raises(Int4FormatError, match="divide"):
        quantize_rtn(torch.randn(4, 96), 64)


def test_act_order_groups_even_detects_row_parallel_shards():
    """A whole act-order layer has groups of exactly group_size; half of it (a row-parallel
    shard) generally does not, and permute_input_channels must then refuse."""
    from vllm_int4xpu.weight import act_order_groups_even, permute_input_channels
    K, N, g = 256, 16, 32
    w = quantize_rtn(torch.randn(N, K), g, ZeroKind.INT)
    gen = torch.Generator().manual_seed(0)
    w.g_idx = (torch.randperm(K, generator=gen) % (K // g)).to(torch.int32)
    assert act_order_groups_even(w)
    half = quantize_rtn(torch.randn(N, K // 2), g, ZeroKind.INT)
    half.g_idx = w.g_idx[: K // 2]  # the first rank's channels, group ids from the full table
    assert not act_order_groups_even(half)
    with pytest.raises(Int4FormatError):
        permute_input_channels(half, act_order_permutation(half.g_idx))
