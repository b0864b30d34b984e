"""Backend ``cpu_native``: the project's own int4 CPU kernel (``csrc/int4_cpu.cpp``).

One kernel for every M, from one copy of the codes (0.5 byte per weight, regrouped at load into
blocks of 16 output channels) plus an fp32 scale and offset per group and channel. The codes are
multiplied exactly as (16 + q) and the group's scale and offset applied once per group, in fp32
(see the C++ file), so both zero-point kinds run the same code at the same speed and the result
is the exactly dequantized model's, up to fp32 summation order:

* bf16 activations on a CPU with AMX: the codes of 16 channels become AMX B tiles in L1/L2 once
  per call, and TDPBF16PS multiplies them with up to 16 rows of x at a time;
* bf16 activations with AVX512-BF16 (decode on AMX CPUs; every M below the dense path on CPUs
  without AMX): the codes become bf16 (16 + q) pairs in registers and VDPBF16PS multiplies them
  with up to 8 rows of x;
* fp32/fp16 activations, or no AVX512-BF16: AVX-512 FMAs over the same blocks (scalar loops
  without AVX-512);
* many rows without AMX (bf16 on the VDPBF16PS path from ``DP_DENSE_MIN_M`` or
  ``DP_DENSE_MIN_M_SMALL`` rows by layer size; ``DENSE_MIN_M`` without AVX-512; fp16/fp32 on the
  FMA path only from ``FMA_DENSE_MIN_M``, by default never): w dequantized whole into a reused
  buffer for torch's GEMM of x @ w^T (fp32 for fp16 x).

The library is compiled on first use with the system C++ compiler (``$CXX``, else g++, else c++;
vLLM's CPU build already needs one), ``-O3 -march=native -fopenmp`` (``-march`` from
``$VLLM_INT4XPU_CPU_NATIVE_MARCH``, e.g. ``x86-64-v3`` to leave AVX-512 out), into a cache directory
keyed by the source, the compiler and this CPU (``$VLLM_INT4XPU_CACHE``, else
``$XDG_CACHE_HOME/vllm_int4xpu``, else ``~/.cache/vllm_int4xpu``), a few seconds. Without a
compiler, or if the build fails, the backend refuses with the reason and the selector falls back
to ``cpu`` (torch's int4 op). It links the libgomp torch has loaded (same soname), so its
threads are torch's threads (``torch.get_num_threads()``).

vLLM layers call the kernel through the torch op ``int4xpu::cpu_native_mm``
(``csrc/int4_cpu_op.cpp``: the same computation as :meth:`CpuNativeKernel.apply`, registered
for the dispatcher's CPU key, no Python in the call; ~4.5 µs less per call than the Python op
``int4xpu::linear``, which is most of a small layer's decode call). It is built the same way
against torch's headers and libraries, and linked to the kernel library; where it cannot be
built or loaded (or ``VLLM_INT4XPU_CPU_NATIVE_OP=0``), the log says why once and layers call
the kernel through ``int4xpu::linear``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..weight import Int4Weight, ZeroKind
from .base import Int4Kernel, Int4LinearSpec, gather_act_order, permute_for_act_order

SOURCE = Path(__file__).with_name("csrc") / "int4_cpu.cpp"
OP_SOURCE = SOURCE.with_name("int4_cpu_op.cpp")
logger = logging.getLogger("vllm.int4xpu")


def _flags() -> tuple[str, ...]:
    march = os.environ.get("VLLM_INT4XPU_CPU_NATIVE_MARCH", "native")
    return ("-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Rows from which the AMX path multiplies dequantized bf16 tiles over the whole K (no per-group
# scaling in the loop), and, without AMX, from which w is dequantized whole into a reused
# buffer for torch's GEMM (benchmarks/bench_cpu.py).
AMX_DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_AMX_DENSE_MIN_M", "64"))
# Rows up to which bf16 x takes the register-only VDPBF16PS path (decode) instead of AMX tiles;
# without AMX that path takes every bf16 call below DP_DENSE_MIN_M (-1: never, AVX-512 FMAs).
DP_MAX_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_DP_MAX_M", "2"))
DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_DENSE_MIN_M", "64"))
# fp16/fp32 x on the AVX-512 FMA path: rows from which the dense path takes over (0: never; the
# FMA path with 8-row blocks beat torch's fp32 GEMM at every M up to 1024 on a 2-core EPYC,
# benchmarks/bench_cpu.py --dtype float32).
FMA_DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_FMA_DENSE_MIN_M", "0"))
# The same for bf16 x on the VDPBF16PS path without AMX, by layer size: that path re-reads the
# codes once per 8 rows of x, from L2 where they fit, so it is ahead of the dequantize + GEMM path
# up to 512 rows for layers of less than DP_LARGE_BYTES of codes, and behind it from 384 rows
# for larger ones (2-core EPYC, 1 MB of L2 per core, the SmolLM2 and 1B shapes, both paths
# timed round-robin: benchmarks/tuning/cpu_dense_crossover.py,
# benchmarks/results/cpu_dense_crossover_epyc.txt).
DP_DENSE_MIN_M = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_DP_DENSE_MIN_M", "384"))
DP_DENSE_MIN_M_SMALL = int(os.environ.get("VLLM_INT4XPU_CPU_NATIVE_DP_DENSE_MIN_M_SMALL", "1024"))
DP_LARGE_BYTES = 1 << 20
_SCRATCH: dict = {}


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer (per thread and dtype) for the dense path, grown to the largest layer
    seen, so prefill does not fault in a fresh K x N buffer on every call."""
    key = (threading.get_ident(), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


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


def _build(source: Path, flags: Sequence[str], extra: Sequence[str] = (),
           key_parts: Sequence[str] = ()) -> tuple[Optional[Path], Optional[str]]:
    """(path of the built library, None) or (None, why): ``source`` compiled once per machine
    with ``flags`` + ``extra`` into the cache directory, keyed by everything that changes it."""
    cxx = _compiler()
    if cxx is None:
        return None, f"no C++ compiler found ($CXX, g++, c++) to build csrc/{source.name}"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
        key = hashlib.sha256("\n".join([source.read_text(), cxx, *version, *flags, *extra,
                                        *key_parts, _cpu_flags()]).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"{source.stem}_{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            proc = subprocess.run([cxx, *flags, str(source), *extra, "-o", tmp],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                os.unlink(tmp)
                err = (proc.stderr or proc.stdout).strip().splitlines()
                return None, f"building csrc/{source.name} failed: {' '.join(err[:3])[:300]}"
            os.replace(tmp, lib)  # atomic: concurrent builders (TP ranks) each write their own
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"csrc/{source.name} unavailable ({type(e).__name__}: {e})"
    return lib, None


@functools.lru_cache(maxsize=1)
def library_path() -> tuple[Optional[Path], Optional[str]]:
    """The kernel library (csrc/int4_cpu.cpp), built once per machine, or why not."""
    if os.environ.get("VLLM_INT4XPU_CPU_NATIVE", "1") == "0":
        return None, "disabled by VLLM_INT4XPU_CPU_NATIVE=0"
    return _build(SOURCE, _flags())


@functools.lru_cache(maxsize=1)
def load_library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(library, None) or (None, why it is not available). Built once per machine."""
    path, why = library_path()
    if path is None:
        return None, why
    try:
        dll = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"csrc/int4_cpu.cpp unavailable ({type(e).__name__}: {e})"
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    dll.int4_gemm.argtypes = [ptr, cint, i64, i64, ptr, ptr, i64, i64, ptr, cint, cint, i64,
                              i64, cint]
    dll.int4_pack_blocks.argtypes = [ptr, i64, i64, ptr, cint]
    dll.int4_dequant.argtypes = [ptr, ptr, i64, i64, i64, ptr, cint, cint]
    dll.int4_gemm.restype = dll.int4_pack_blocks.restype = cint
    dll.int4_dequant.restype = dll.int4_cpu_features.restype = cint
    return dll, None


def _mm_fake(x, qb, sb, perm, bias, N, group, dense_from, amx, amx_dense_min_m, dp_max_m):
    return x.new_empty((*x.shape[:-1], N))


def _op_flags(kernel: Path) -> tuple[list[str], list[str]]:
    """(compile flags, link arguments) of the op: torch's headers and ABI, and links to torch's
    libraries and to the kernel library ``kernel`` (rpaths, so no loader path is needed)."""
    from torch.utils import cpp_extension
    abi = int(torch.compiled_with_cxx11_abi())
    flags = [*_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    link = [str(kernel), f"-Wl,-rpath,{kernel.parent}"]
    for d in cpp_extension.library_paths():
        link += [f"-L{d}", f"-Wl,-rpath,{d}"]
    return flags, [*link, "-lc10", "-ltorch_cpu", "-ltorch"]


def _op_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("int4xpu::cpu_native_mm", "CPU")
    except RuntimeError:  # no such op yet
        return False


@functools.lru_cache(maxsize=1)
def load_op() -> Optional[str]:
    """Registers the torch op ``int4xpu::cpu_native_mm`` (csrc/int4_cpu_op.cpp: the kernel
    behind the dispatcher's CPU key, no Python in the call); None once it is there, else why not
    (then layers call the kernel through ``int4xpu::linear``, logged once)."""
    why = None
    if os.environ.get("VLLM_INT4XPU_CPU_NATIVE_OP", "1") == "0":
        why = "disabled by VLLM_INT4XPU_CPU_NATIVE_OP=0"
    elif _op_registered():
        return None  # loaded earlier in this process
    else:
        kernel, why = library_path()
    if why is None:
        path, why = _build(OP_SOURCE, *_op_flags(kernel),
                           key_parts=(torch.__version__, str(kernel)))
        if path is not None:
            try:
                torch.ops.load_library(str(path))
                torch.library.register_fake("int4xpu::cpu_native_mm", _mm_fake)
            except (OSError, RuntimeError) as e:
                why = f"csrc/int4_cpu_op.cpp does not load ({type(e).__name__}: {str(e)[:200]})"
    if why is not None:
        logger.info("int4xpu: cpu_native layers call the kernel through int4xpu::linear "
                    "(torch op int4xpu::cpu_native_mm unavailable: %s)", why)
    else:
        logger.info("int4xpu: cpu_native layers call the kernel through its C++ torch op "
                    "int4xpu::cpu_native_mm")
    return why


def scale_offset(w: Int4Weight) -> torch.Tensor:
    """fp32 [NB, G, 2, 16]: per block of 16 channels and group, (s, b - 16 s) with
    w = q * s + b for every zero-point kind; channels past N get 0."""
    s = w.scales.to(torch.float32)  # [G, N]
    if w.zero_kind == ZeroKind.NONE:
        b = -8.0 * s
    elif w.zero_kind == ZeroKind.INT:
        b = -w.zeros.to(torch.float32) * s
    else:
        b = w.zeros.to(torch.float32) - 8.0 * s
    G, N = s.shape
    nb = -(-N // 16)
    out = torch.zeros(G, 2, nb * 16, dtype=torch.float32)
    out[:, 0, :N] = s
    out[:, 1, :N] = b - 16.0 * s
    return out.view(G, 2, nb, 16).permute(2, 0, 1, 3).contiguous()


@functools.lru_cache(maxsize=1)
def dp_built() -> bool:
    """Whether the library has the AVX512-BF16 dot-product path (built for this CPU)."""
    lib, _ = load_library()
    return lib is not None and bool(lib.int4_cpu_features() & 4)


@functools.lru_cache(maxsize=1)
def fma_built() -> bool:
    """Whether the library has the AVX-512 FMA path (else scalar loops)."""
    lib, _ = load_library()
    return lib is not None and bool(lib.int4_cpu_features() & 1)


@functools.lru_cache(maxsize=1)
def amx_enabled() -> bool:
    """Ask Linux for the AMX register state (torch's helper); False where it is refused."""
    lib, _ = load_library()
    if lib is None or not lib.int4_cpu_features() & 2:
        return False
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    return bool(init()) if init is not None else False


class CpuNativeKernel(Int4Kernel):
    name = "cpu_native"
    # qb: uint8 [NB, K/2, 16] codes in blocks of 16 channels; sb: fp32 [NB, G, 2, 16];
    # perm: act-order gather (or empty)
    tensor_names = ("qb", "sb", "perm")

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
        lib, _ = load_library()
        w, perm = permute_for_act_order(w)
        N, K = w.out_features, w.in_features
        qb = torch.empty(-(-N // 16), K // 2, 16, dtype=torch.uint8)
        rc = lib.int4_pack_blocks(w.qweight.contiguous().data_ptr(), N, K, qb.data_ptr(),
                                  torch.get_num_threads())
        assert rc == 0, rc
        amx_enabled()  # once per process, before the first call
        return {"qb": qb, "sb": scale_offset(w), "perm": perm}

    def _dense_from(self, x_dtype: torch.dtype) -> int:
        """Rows from which the dense path serves (0: never) for this layer and x dtype."""
        bf16 = x_dtype == torch.bfloat16
        if bf16 and dp_built():
            large = self.spec.in_features * self.spec.out_features // 2 >= DP_LARGE_BYTES
            dense_from = DP_DENSE_MIN_M if large else DP_DENSE_MIN_M_SMALL
        elif not bf16 and fma_built():
            dense_from = FMA_DENSE_MIN_M
        else:
            dense_from = DENSE_MIN_M
        if dense_from <= 0 or (amx_enabled() and bf16 and self.spec.group_size % 32 == 0):
            return 0
        return dense_from

    def op_args(self) -> Optional[tuple]:
        """The layer's static arguments of the torch op ``int4xpu::cpu_native_mm`` (after
        x, qb, sb, perm, bias), which :func:`~.ops.int4_linear` then calls instead of
        ``int4xpu::linear`` (the same computation, bit for bit, without Python in the call);
        None where the op is unavailable (:func:`load_op` logs why)."""
        if load_op() is not None:
            return None
        return (self.spec.out_features, self.spec.group_size,
                self._dense_from(self.spec.act_dtype), amx_enabled(), AMX_DENSE_MIN_M, DP_MAX_M)

    def apply(self, tensors, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qb, sb, perm = tensors
        lib, _ = load_library()
        x = gather_act_order(x, perm)
        if not x.is_contiguous():
            x = x.contiguous()
        M, K = x.shape
        N = self.spec.out_features
        g, threads = self.spec.group_size, torch.get_num_threads()
        amx = amx_enabled()
        dense_from = self._dense_from(x.dtype)
        if M >= dense_from > 0:
            # fp16 GEMMs on CPUs without native fp16 math are slow in torch: fp16 x multiplies
            # fp32 weights in fp32 (exact for fp16 x, and fp32 accumulation as everywhere else)
            gemm_dt = torch.float32 if x.dtype == torch.float16 else x.dtype
            wd = _scratch(N * K, gemm_dt).view(N, K)
            rc = lib.int4_dequant(qb.data_ptr(), sb.data_ptr(), N, K, g, wd.data_ptr(),
                                  _DT[gemm_dt], threads)
            assert rc == 0, rc
            y = torch.mm(x.to(gemm_dt), wd.t()).to(x.dtype)
        else:
            y = torch.empty(M, N, dtype=x.dtype)
            rc = lib.int4_gemm(x.data_ptr(), _DT[x.dtype], M, K, qb.data_ptr(), sb.data_ptr(),
                               N, g, y.data_ptr(), _DT[x.dtype], int(amx), AMX_DENSE_MIN_M,
                               DP_MAX_M, threads)
            assert rc == 0, rc
        if bias is not None:
            y = y + bias
        return y
