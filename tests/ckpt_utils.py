"""Test helpers: build the oracle model (a plain bf16 checkpoint holding the dequantized int4
weights) and compare vLLM outputs token by token with logprob tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_int4xpu.formats.native import NativeFormat
from vllm_int4xpu.formats.base import LayerGeometry
from vllm_int4xpu.weight import dequantize


def dequantized_copy(qdir, out, dtype=torch.bfloat16) -> Path:
    """Write a bf16 HF checkpoint whose linear weights are dequantize(int4 weight) (float64 math)."""
    qdir, out = Path(qdir), Path(out)
    shutil.copytree(qdir, out)
    cfg = json.loads((qdir / "config.json").read_text())
    fmt = NativeFormat.from_hf_config(cfg.pop("quantization_config"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = load_file(str(qdir / "model.safetensors"))
    dense = {}
    for name in [n for n in sd if n.endswith(".qweight")]:
        p = name[: -len(".qweight")]
        t = {k.split(".")[-1]: sd[k] for k in sd if k.rsplit(".", 1)[0] == p}
        N, K = t["qweight"].shape[0], t["qweight"].shape[1] * 8
        w = fmt.to_canonical(t, LayerGeometry(K, N, K, N)).validate(name=p)
        dense[p + ".weight"] = dequantize(w, torch.float64).to(dtype)
    for k, v in sd.items():
        if k.rsplit(".", 1)[0] + ".weight" not in dense:
            dense[k] = v
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def assert_outputs_close(ours, ref, topk_ok: int = 5, max_lp_diff: float = 0.15,
                         min_exact_prefix: int = 1):
    """Greedy tokens must match until a near-tie; where they first differ, each side's token must
    be in the other's top-k and their logprobs close (the check vLLM's own tests use).
    Logprobs of matching steps must agree within ``max_lp_diff``."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        ta, tb = a["token_ids"], b["token_ids"]
        for pos, (x, y) in enumerate(zip(ta, tb)):
            la, lb = a["logprobs"][pos], b["logprobs"][pos]
            if x == y:
                diff = abs(la[str(x)] - lb[str(y)])
                assert diff <= max_lp_diff, f"prompt {i} pos {pos}: logprob of {x} differs by {diff:.3f}"
                continue
            assert pos >= min_exact_prefix, f"prompt {i}: first token differs ({x} vs {y})"
            assert str(x) in lb and str(y) in la, (
                f"prompt {i} pos {pos}: tokens {x} vs {y} not in each other's top-{topk_ok}")
            assert abs(la[str(x)] - lb[str(x)]) <= max_lp_diff + 0.1
            break


def native_weights(qdir) -> tuple[dict, dict]:
    """(quantization_config, {module prefix: canonical Int4Weight}) of a native checkpoint."""
    qdir = Path(qdir)
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    fmt = NativeFormat.from_hf_config(cfg)
    sd = load_file(str(qdir / "model.safetensors"))
    weights = {}
    for name in [n for n in sd if n.endswith(".qweight")]:
        p = name[: -len(".qweight")]
        t = {k.rsplit(".", 1)[1]: sd[k] for k in sd if k.rsplit(".", 1)[0] == p}
        N, K = t["qweight"].shape[0], t["qweight"].shape[1] * 8
        weights[p] = fmt.to_canonical(t, LayerGeometry(K, N, K, N)).validate(name=p)
    return cfg, weights
