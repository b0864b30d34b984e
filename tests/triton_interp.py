"""Triton's CPU interpreter for the kernel test files (import this module before anything else).

TRITON_INTERPRET=1 must be set before a @triton.jit function is *defined*, and Triton caches its
interpreter switch when it is first imported: if anything (vLLM's import, another test module)
imported triton or our kernels first, kernels defined afterwards can end up half interpreted.
This module records, at its first import in the process, whether that already happened, then
sets the variable. A kernel test file whose kernels cannot be interpreted in this process runs
itself in a subprocess instead (:func:`rerun_in_subprocess`).
"""

import os
import subprocess
import sys

# evaluated once per process, at the first import of this module (shared by every test file)
TRITON_IMPORTED_FIRST = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

KERNEL_MODULES = ("vllm_int4xpu.kernels.triton_kernels.gemv",
                  "vllm_int4xpu.kernels.triton_kernels.fused_moe")


def kernels_compiled_for_gpu() -> bool:
    """True when our kernel modules were imported before TRITON_INTERPRET was set."""
    from triton.runtime.interpreter import InterpretedFunction

    for name in KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        jitted = [v for v in vars(mod).values() if hasattr(v, "fn") and hasattr(v, "run")]
        if any(not isinstance(k, InterpretedFunction) for k in jitted):
            return True
    return any(m.startswith("vllm_int4xpu.kernels.triton") for m in sys.modules) and \
        not any(m in sys.modules for m in KERNEL_MODULES)  # partly imported: play safe


def must_rerun() -> bool:
    return TRITON_IMPORTED_FIRST or kernels_compiled_for_gpu()


def rerun_in_subprocess(path: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
