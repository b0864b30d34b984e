"""The main job, end to end: SmolLM2-135M-Instruct -> int4 (int zero points, group 64) ->
``vllm serve --quantization int4xpu`` on 127.0.0.1 -> one chat request -> answer and tokens/s.

Usage: python examples/serve_smollm2.py [--workdir demo_models] [--port 8011] [--prompt ...]
Models are built once under --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from smollm2_model import build_bf16_model  # noqa: E402


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited (rc={proc.returncode}); log:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("vllm serve did not become healthy in time; log: " + str(log))


def chat(base: str, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        res = json.loads(r.read())
    dt = time.perf_counter() - t0
    return res["choices"][0]["message"]["content"], res["usage"]["completion_tokens"], dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="demo_models")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    work = Path(args.workdir).resolve()
    bf16 = build_bf16_model(work / "SmolLM2-135M-Instruct")
    q = work / "SmolLM2-135M-Instruct-int4xpu-g64"
    if not q.exists():
        subprocess.run([sys.executable, "-m", "vllm_int4xpu.cli", "quantize", str(bf16), str(q),
                        "--group-size", "64", "--zero-point", "int"], check=True)
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", str(q), "--quantization", "int4xpu", "--host", "127.0.0.1",
           "--port", str(args.port), "--served-model-name", "smollm2-int4", "--max-model-len", "2048"]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    log = work / "vllm_serve.log"
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(base, proc, log)
        backend = [ln for ln in log.read_text().splitlines() if "int4xpu: kernel backend" in ln]
        if backend:
            print(backend[0].split("] ", 1)[-1])
        chat(base, "smollm2-int4", "Hi", 4)  # warm-up
        answer, ntok, dt = chat(base, "smollm2-int4", args.prompt, args.max_tokens)
        print(f"\nQ: {args.prompt}\nA: {answer.strip()}\n")
        print(f"{ntok} tokens in {dt:.2f} s = {ntok / dt:.1f} tokens/s (int4xpu, CPU, one request)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"server (pid {proc.pid}) stopped; log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
