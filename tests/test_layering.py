"""STYLE.md's layering rule, checked: kernels and formats run where vLLM is absent."""

from __future__ import annotations

import subprocess
import sys


def test_kernels_formats_quantizer_do_not_import_vllm():
    code = (
        "import sys, pkgutil, importlib\n"
        "import vllm_int4xpu.kernels as k, vllm_int4xpu.formats as f\n"
        "mods = ['vllm_int4xpu.' + p + '.' + m.name for p, pkg in (('kernels', k), ('formats', f))"
        " for m in pkgutil.iter_modules(pkg.__path__)]\n"
        "for m in mods + ['vllm_int4xpu.quantizer', 'vllm_int4xpu.weight', 'vllm_int4xpu.kernels.ops']:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as e:\n"
        "        if 'triton' not in str(e): raise\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_kernels_do_not_import_formats():
    import pathlib

    root = pathlib.Path(__file__).parents[1] / "vllm_int4xpu" / "kernels"
    for py in root.rglob("*.py"):
        text = py.read_text()
        assert "from ..formats" not in text and "vllm_int4xpu.formats" not in text, py
