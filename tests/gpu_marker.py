"""Every test under tests/gpu carries the ``gpu`` marker, so ``python -m pytest -m gpu tests/gpu``
selects them (and the default ``-m 'not slow and not gpu'`` leaves them out). Called from
tests/conftest.py's collection hook; the GPU modules skip themselves where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest


def mark_gpu_tests(items, gpu_dir: Path) -> None:
    gpu_dir = gpu_dir.resolve()
    for item in items:
        if gpu_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
