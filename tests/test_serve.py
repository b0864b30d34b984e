"""``vllm serve --quantization int4xpu`` answers OpenAI requests on 127.0.0.1; stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest

pytest.importorskip("vllm")

from vllm_server import serve  # noqa: E402


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tiny_int, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(tiny_int, log, "--max-model-len", "256", "--served-model-name", "tiny",
               "--enforce-eager", "--max-num-seqs", "4") as (base, proc):
        yield base, proc, log


def test_completions(server):
    base, _, log = server
    r = post(base + "/v1/completions", {"model": "tiny", "prompt": "the capital of france is",
                                        "max_tokens": 6, "temperature": 0})
    assert r["choices"][0]["text"] and r["usage"]["completion_tokens"] == 6
    text = log.read_text()
    assert "int4xpu: kernel backend 'cpu_native'" in text
    # the layers call the kernel through its C++ op (no Python in the call)
    assert "through its C++ torch op int4xpu::cpu_native_mm" in text


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
