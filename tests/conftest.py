"""Shared fixtures: tiny random Llama models, quantized with our own CLI, built once per run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gpu_marker import mark_gpu_tests  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    mark_gpu_tests(items, Path(__file__).parent / "gpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-bf16")


def quantize_with_cli(src: Path, out: Path, *args: str) -> Path:
    """Run the real CLI (``vllm-int4xpu quantize``) in a subprocess."""
    cmd = [sys.executable, "-m", "vllm_int4xpu.cli", "quantize", str(src), str(out), "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_int(tiny_dir, tmp_path_factory) -> Path:
    return quantize_with_cli(tiny_dir, tmp_path_factory.mktemp("q") / "tiny-int-g64",
                             "--group-size", "64", "--zero-point", "int")


@pytest.fixture(scope="session")
def tiny_float(tiny_dir, tmp_path_factory) -> Path:
    return quantize_with_cli(tiny_dir, tmp_path_factory.mktemp("q") / "tiny-float-g32",
                             "--group-size", "32", "--zero-point", "float")
