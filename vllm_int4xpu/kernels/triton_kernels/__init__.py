"""Triton int4 weight-only GEMM kernels, one file per algorithm.

* :mod:`.gemv`    small M: split-K GEMV on CUDA cores / EUs (FMA);
* :mod:`.gemm`    mid M: tiled tl.dot with in-register dequant, optional split-K;
* :mod:`.dequant` large M: dequantize to a dense weight, then the vendor GEMM;
* :mod:`.common`  nibble unpack, zero points, split-K reduce.

The backend (``kernels/triton_backend.py``) chooses among them by M and shape.
"""

from .common import ZERO_FLOAT, ZERO_INT, ZERO_NONE
from .dequant import int4_dequant_matmul, int4_dequantize
from .gemm import int4_gemm
from .gemv import int4_gemv

ALGORITHMS = {"gemv": int4_gemv, "gemm": int4_gemm, "dequant": int4_dequant_matmul}

__all__ = ["ALGORITHMS", "ZERO_NONE", "ZERO_INT", "ZERO_FLOAT", "int4_gemv", "int4_gemm",
           "int4_dequant_matmul", "int4_dequantize"]
