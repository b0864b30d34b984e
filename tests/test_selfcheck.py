"""``python -m vllm_int4xpu.selfcheck``: passes on CPU, and fails when a backend is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_int4xpu import selfcheck
from vllm_int4xpu.kernels import ops, selector
from vllm_int4xpu.kernels.reference import ReferenceKernel

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_selfcheck_passes_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # set by the kernel test files: a user's CPU has none
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vllm_int4xpu.selfcheck", "--quick", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference" in proc.stdout and "PASS" in proc.stdout and "FAIL" not in proc.stdout
    assert "0 failed" in proc.stdout
    assert "xpu_onednn" in proc.stdout and "needs an Intel GPU" in proc.stdout  # skip says why
    assert "GB/s" in proc.stdout
    # the fused-MoE backends: cpu_native, cpu and reference run, triton's refusal says why
    moe_pass = [ln for ln in proc.stdout.splitlines() if ln.startswith("moe:") and "PASS" in ln]
    assert {ln.split()[0] for ln in moe_pass} == {"moe:cpu_native", "moe:cpu", "moe:reference"}, \
        proc.stdout
    assert "moe:triton" in proc.stdout and "no Triton GPU target" in proc.stdout
    assert elapsed < 60, f"quick selfcheck took {elapsed:.1f}s"


def test_selfcheck_does_not_import_vllm():
    code = ("import sys, vllm_int4xpu.selfcheck as s; "
            "sys.exit(1 if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


class OffByOneZeroKernel(ReferenceKernel):
    """A deliberately wrong backend: shifts every output a little (like a wrong zero point)."""

    name = "broken_for_test"

    def apply(self, tensors, x, bias=None):
        y = super().apply(tensors, x, bias)
        return y + 0.05 * y.abs().mean()


class CrashingKernel(ReferenceKernel):
    name = "crashing_for_test"

    def apply(self, tensors, x, bias=None):
        raise RuntimeError("kernel exploded")


@pytest.fixture
def injected(monkeypatch):
    """Register the broken backends for this test only."""
    for cls in (OffByOneZeroKernel, CrashingKernel):
        monkeypatch.setitem(selector.BACKENDS, cls.name, f"{cls.__module__}:{cls.__name__}")
    yield
    selector.load_backend.cache_clear()
    ops._kernel.cache_clear()


@pytest.mark.parametrize("name", ["broken_for_test", "crashing_for_test"])
def test_wrong_backend_makes_selfcheck_fail(injected, capsys, name):
    rc = selfcheck.main(["--quick", "--device", "cpu", "--backends", name, "--no-speed"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "PASS" not in out


def test_reference_alone_passes(capsys):
    assert selfcheck.main(["--quick", "--device", "cpu", "--backends", "reference",
                           "--no-speed"]) == 0


def test_compare_catches_wrong_outputs():
    ref = torch.randn(4, 16, dtype=torch.float64)
    y = ref.to(torch.bfloat16)
    assert selfcheck.compare(y, ref, torch.bfloat16)[0]
    assert not selfcheck.compare(y * 1.1, ref, torch.bfloat16)[0]
    assert not selfcheck.compare(y.float().fill_(float("nan")), ref, torch.bfloat16)[0]
    assert not selfcheck.compare(y[:, :8], ref, torch.bfloat16)[0]


def test_unavailable_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert selfcheck.main(["--quick", "--device", "cuda"]) == 2


def test_cli_forwards_options_to_selfcheck():
    """``vllm-int4xpu selfcheck --device cpu ...``: options right after the subcommand reach it
    (argparse's REMAINDER used to reject them as "unrecognized arguments")."""
    from vllm_int4xpu import cli
    assert cli.main(["selfcheck", "--quick", "--device", "cpu", "--backends", "reference",
                     "--no-speed"]) == 0
    assert cli.main(["selfcheck", "--quick", "--device", "cuda"]) == 2 or \
        __import__("torch").cuda.is_available()
