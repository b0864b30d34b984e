"""Backend ``cpu_native``: the project's own int4 CPU kernel (``csrc/int4_cpu.cpp``).

It computes from the canonical codes (one copy of the weight: 0.5 byte per weight plus an fp32
scale and offset per group and output channel), with fp32 accumulation and the exact
dequantized weights w = q * s + b (b = -zp * s for integer zero points, z - 8 s for float ones),
so both zero-point kinds run the same code at the same speed:

* M < ``DENSE_MIN_M`` rows: ``int4_gemm``, AVX-512: 16 codes unpacked to fp32 in registers per
  load and multiplied with up to 4 activation rows; the scale is applied once per group and the
  offset through the group sums of x;
* from ``DENSE_MIN_M`` rows: ``int4_dequant`` writes ``TILE_ROWS`` output channels of w (bf16 for
  bf16 activations, rounded once from fp32) into a cache-sized tile, and torch's dense GEMM
  (oneDNN, AMX/AVX-512 where the CPU has them) multiplies it; tile by tile.

The library is compiled on first use with the system C++ compiler (``$CXX``, else g++, else c++;
vLLM's CPU build already needs one), ``-O3 -march=native -fopenmp``, into a cache directory
keyed by the source, the compiler and this CPU (``$VLLM_INT4XPU_CACHE``, else
``$XDG_CACHE_HOME/vllm_int4xpu``, else ``~/.cache/vllm_int4xpu``), ~2 s. Without a compiler,
or if the build fails, the backend refuses with the reason and the selector falls back to
``cpu`` (torch's int4 op). It links the libgomp torch has loaded (same soname), so its threads
are torch's threads (``torch.get_num_threads()``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..weight import Int4Weight, ZeroKind
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order

SOURCE = Path(__file__).with_name("csrc") / "int4_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Rows from which dequantize-a-tile + dense GEMM beats the direct kernel (benchmarks/bench_cpu.py)
DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_DENSE_MIN_M", "16"))
TILE_ROWS = 4096  # output channels dequantized per tile on the dense path (measured)
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cache_dir() -> Path:
    env = os.environ.get("VLLM_INT4XPU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm_int4xpu"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> Optional[str]:
    for c in (os.environ.get("CXX"), "g++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


@functools.lru_cache(maxsize=1)
def load_library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(library, None) or (None, why it is not available). Built once per machine."""
    if os.environ.get("VLLM_INT4XPU_CPU_NATIVE", "1") == "0":
        return None, "disabled by VLLM_INT4XPU_CPU_NATIVE=0"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, g++, c++) to build csrc/int4_cpu.cpp"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
        key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, *version, *FLAGS,
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"int4_cpu_{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode != 0:
                os.unlink(tmp)
                err = (proc.stderr or proc.stdout).strip().splitlines()
                return None, f"building csrc/int4_cpu.cpp failed: {' '.join(err[:3])[:300]}"
            os.replace(tmp, lib)  # atomic: concurrent builders (TP ranks) each write their own
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"csrc/int4_cpu.cpp unavailable ({type(e).__name__}: {e})"
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    dll.int4_gemm.argtypes = [ptr, cint, i64, i64, ptr, ptr, i64, i64, ptr, cint, cint]
    dll.int4_dequant.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, cint, cint]
    dll.int4_gemm.restype = dll.int4_dequant.restype = dll.int4_cpu_has_avx512.restype = cint
    return dll, None


_SCRATCH: dict = {}


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of at least ``numel`` elements (one per dtype and thread), so the dense
    path does not fault in fresh pages on every call. Grows to the largest tile seen."""
    import threading
    key = (threading.get_ident(), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def scale_offset(w: Int4Weight) -> torch.Tensor:
    """fp32 [N, G, 2]: (s, b) with w = q * s + b for every zero-point kind."""
    s = w.scales.to(torch.float32)
    if w.zero_kind == ZeroKind.NONE:
        b = -8.0 * s
    elif w.zero_kind == ZeroKind.INT:
        b = -w.zeros.to(torch.float32) * s
    else:
        b = w.zeros.to(torch.float32) - 8.0 * s
    return torch.stack([s, b], dim=-1).transpose(0, 1).contiguous()


class CpuNativeKernel(Int4Kernel):
    name = "cpu_native"
    # qweight: canonical int32 [N, K/8]; sb: fp32 [N, G, 2]; perm: act-order gather (or empty)
    tensor_names = ("qweight", "sb", "perm")

    @classmethod
    def can_implement(cls, spec: Int4LinearSpec):
        if spec.device_type != "cpu":
            return False, f"device is {spec.device_type}, not cpu"
        if spec.act_dtype not in _DT:
            return False, f"activation dtype {spec.act_dtype} unsupported"
        if spec.in_features % 16 or spec.group_size % 16:
            return False, (f"K={spec.in_features} and group {spec.group_size} must be multiples "
                           "of 16")
        lib, why = load_library()
        if lib is None:
            return False, why
        return True, None

    def prepare(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        w, perm = permute_for_act_order(w)
        return {"qweight": w.qweight.contiguous(), "sb": scale_offset(w), "perm": perm}

    def apply(self, tensors, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight, sb, perm = tensors
        lib, _ = load_library()
        x = gather_act_order(x, perm).contiguous()
        M, K = x.shape
        N, g = self.spec.out_features, self.spec.group_size
        threads = torch.get_num_threads()
        if M < DENSE_MIN_M or M == 0:
            y = torch.empty(M, N, dtype=x.dtype)
            if M:
                rc = lib.int4_gemm(x.data_ptr(), _DT[x.dtype], M, K, qweight.data_ptr(),
                                   sb.data_ptr(), N, g, y.data_ptr(), _DT[x.dtype], threads)
                assert rc == 0, rc
        else:
            # y^T tile by tile: tile [rows, K] @ x^T -> y^T[r0:r1] (contiguous rows; measured
            # faster than x @ tile^T into a column slice of y)
            rows = min(TILE_ROWS, N)
            tile = _scratch(rows * K, x.dtype).view(rows, K)
            yt = torch.empty(N, M, dtype=x.dtype)
            xt = x.t()
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                rc = lib.int4_dequant(qweight.data_ptr(), sb.data_ptr(), r0, r1, K, g,
                                      tile.data_ptr(), _DT[x.dtype], threads)
                assert rc == 0, rc
                torch.mm(tile[: r1 - r0], xt, out=yt[r0:r1])
            y = yt.t().contiguous()
        if bias is not None:
            y = y + bias
        return y
