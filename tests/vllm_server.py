"""Start ``vllm serve`` on 127.0.0.1 for a test and stop it (its whole process group) after."""

from __future__ import annotations

import contextlib
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

from vllm_runner import vllm_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    exe = Path(sys.executable).with_name("vllm")
    return str(exe) if exe.exists() else shutil.which("vllm")


@contextlib.contextmanager
def serve(model, log: Path, *args: str, timeout: float = 300, quantization="int4xpu",
          command: list[str] | None = None, cwd=None):
    """Yield (base url, process) of ``vllm serve MODEL --quantization int4xpu ARGS``, or of
    ``command`` (a whole ``vllm serve ...`` argv, e.g. from the README) on a free port."""
    port = free_port()
    quant = ["--quantization", quantization] if quantization else []
    if command is None:
        command = ["vllm", "serve", str(model), *quant, *args]
    cmd = [vllm_cli() if command[0] == "vllm" else command[0], *command[1:],
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=vllm_env(),
                                start_new_session=True, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
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
        yield base, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine/worker processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def group_rss_bytes(proc: subprocess.Popen) -> int:
    """Resident memory of every process in the server's process group (API server, engine
    core, workers), from /proc."""
    pgid = os.getpgid(proc.pid)
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total
