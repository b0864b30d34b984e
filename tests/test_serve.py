"""``vllm serve --quantization int4xpu`` answers OpenAI requests on 127.0.0.1; stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_runner import vllm_env  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def vllm_cli() -> str:
    exe = Path(sys.executable).with_name("vllm")
    return str(exe) if exe.exists() else shutil.which("vllm")


@pytest.fixture(scope="module")
def server(tiny_int, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [vllm_cli(), "serve", str(tiny_int), "--quantization", "int4xpu", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "256", "--served-model-name", "tiny",
           "--enforce-eager", "--max-num-seqs", "4"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=vllm_env(),
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited rc={proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("server did not become healthy:\n" + log.read_text()[-4000:])
        yield base, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine/worker processes
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_completions(server):
    base, _, log = server
    r = post(base + "/v1/completions", {"model": "tiny", "prompt": "the capital of france is",
                                        "max_tokens": 6, "temperature": 0})
    assert r["choices"][0]["text"] and r["usage"]["completion_tokens"] == 6
    assert "int4xpu: kernel backend 'cpu'" in log.read_text()


def test_chat_completions(server):
    base, _, _ = server
    r = post(base + "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 5, "temperature": 0,
        "messages": [{"role": "user", "content": "hello world"}]})
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] > 0


def test_server_stops_by_pid(server):
    _, proc, _ = server
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) is not None
