"""``vllm-int4xpu quantize`` under faults: killed mid-write, disk full, file modes.

Killed with SIGKILL it leaves no OUT and the next run removes the leftover temp directory; a
write error (an injected ENOSPC from the safetensors writer) gives our error and leaves nothing;
every file of the written checkpoint gets the modes the user's umask allows (safetensors writes
0600 and mkdtemp makes 0700 on their own).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_model import make_tiny_llama
from vllm_int4xpu.errors import Int4FormatError
from vllm_int4xpu.quantizer import quantize_model


def _modes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): stat.S_IMODE(p.stat().st_mode) for p in [d, *d.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_follow_the_umask(tiny_dir, tmp_path, umask):
    out = tmp_path / "q"
    code = (f"import os; os.umask({umask}); from vllm_int4xpu.quantizer import quantize_model; "
            f"quantize_model({str(tiny_dir)!r}, {str(out)!r}, progress=False)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    modes = _modes(out)
    assert modes.pop(".") == 0o777 & ~umask
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert not any(".pid" in name for name in modes)


def test_sigkill_mid_write_leaves_no_output_and_next_run_cleans_up(tmp_path):
    src = make_tiny_llama(tmp_path / "src", hidden=512, intermediate=2048, layers=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vllm_int4xpu.cli", "quantize", str(src), str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    temp = []
    while time.time() < deadline and proc.poll() is None:
        temp = [d for d in tmp_path.glob(".out.tmp-*") if any(d.glob("*.safetensors"))
                or (d / ".int4xpu-quantize.pid").exists()]
        if temp:
            break
        time.sleep(0.005)
    assert temp and proc.poll() is None, "the run ended before it could be killed mid-write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.tmp-*")), "expected the killed run's temp directory"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "the stale temp directory was not removed"
    assert "interrupted run" in again.stderr


def test_a_live_run_into_the_same_output_is_not_disturbed(tiny_dir, tmp_path):
    """A temp directory whose process is alive (this one) belongs to a running quantize."""
    live = tmp_path / ".q.tmp-live"
    live.mkdir()
    (live / ".int4xpu-quantize.pid").write_text(str(os.getppid()))
    with pytest.raises(Int4FormatError, match="another vllm-int4xpu quantize"):
        quantize_model(tiny_dir, tmp_path / "q", progress=False)
    assert live.exists() and not (tmp_path / "q").exists()


def test_disk_full_gives_our_error_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import vllm_int4xpu.quantizer as qz

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(qz, "save_file", full)
    out = tmp_path / "q"
    with pytest.raises(Int4FormatError) as ei:
        quantize_model(tiny_dir, out, progress=False)
    e = ei.value
    assert "No space left on device" in str(e) and e.file and e.expected
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
