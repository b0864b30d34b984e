// torch op int4xpu::cpu_native_mm: the cpu_native kernel (int4_cpu.cpp) registered with the
// dispatcher for the CPU key, so a linear layer's call goes from the caller (eager code or
// Inductor's wrapper) straight to the kernel. Through the Python op int4xpu::linear the same call
// boxes its arguments into Python, looks the backend up and calls the kernel through ctypes,
// which costs more than the kernel itself for SmolLM2's small layers at decode.
//
// Built by kernels/cpu_native.py against torch's headers and libraries, linked to the kernel
// library of the same build (the C functions below); the fake (shape) implementation is
// registered in Python. Semantics are CpuNativeKernel.apply's: act-order gather, the dense path
// (dequantize w into a reused buffer, torch GEMM with w^T) from ``dense_from`` rows (0: never), else
// int4_gemm; bias added last.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

extern "C" {
int int4_gemm(const void* x, int x_dt, int64_t M, int64_t K, const uint8_t* qb, const float* sb,
              int64_t N, int64_t group, void* y, int y_dt, int use_amx, int64_t dense_min_m,
              int64_t dp_max_m, int nthreads);
int int4_dequant(const uint8_t* qb, const float* sb, int64_t N, int64_t K, int64_t group,
                 void* w, int w_dt, int nthreads);
}

namespace {

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK(false, "int4xpu::cpu_native_mm: activation dtype ", t,
                             " not float32/bfloat16/float16");
    }
    return -1;
}

// A reused buffer per thread and dtype for the dense path, grown to the largest layer seen.
at::Tensor scratch(int64_t numel, at::ScalarType dt) {
    thread_local at::Tensor bufs[3];
    at::Tensor& buf = bufs[dtype_code(dt)];
    if (!buf.defined() || buf.numel() < numel)
        buf = at::empty({numel}, at::TensorOptions().dtype(dt));
    return buf.narrow(0, 0, numel);
}

at::Tensor cpu_native_mm(const at::Tensor& x_in, const at::Tensor& qb, const at::Tensor& sb,
                         const at::Tensor& perm, const std::optional<at::Tensor>& bias,
                         int64_t N, int64_t group, int64_t dense_from, bool amx,
                         int64_t amx_dense_min_m, int64_t dp_max_m) {
    TORCH_CHECK(x_in.dim() >= 1, "int4xpu::cpu_native_mm: x must have a feature dimension");
    TORCH_CHECK(qb.is_contiguous() && qb.scalar_type() == at::kByte &&
                    sb.is_contiguous() && sb.scalar_type() == at::kFloat,
                "int4xpu::cpu_native_mm: qb (uint8) and sb (float32) must be the prepared, "
                "contiguous tensors of CpuNativeKernel.prepare");
    at::Tensor x = x_in.reshape({-1, x_in.size(-1)});
    if (perm.numel()) x = at::index_select(x, 1, perm);
    x = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    TORCH_CHECK(qb.numel() == (N + 15) / 16 * 16 * (K / 2),
                "int4xpu::cpu_native_mm: qb holds ", qb.numel(), " codes, expected ",
                (N + 15) / 16 * 16 * (K / 2), " for N=", N, " K=", K);
    const int dt = dtype_code(x.scalar_type());
    const int threads = at::get_num_threads();
    at::Tensor y;
    int rc;
    if (dense_from > 0 && M >= dense_from) {
        // fp16 x multiplies fp32 weights in fp32 (CPUs without native fp16 math)
        const at::ScalarType gdt = x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
        at::Tensor w = scratch(N * K, gdt).view({N, K});
        rc = int4_dequant(qb.data_ptr<uint8_t>(), sb.data_ptr<float>(), N, K, group,
                          w.data_ptr(), dtype_code(gdt), threads);
        TORCH_CHECK(rc == 0, "int4xpu::cpu_native_mm: int4_dequant returned ", rc);
        y = at::mm(x.to(gdt), w.t()).to(x.scalar_type());
    } else {
        y = at::empty({M, N}, x.options());
        rc = int4_gemm(x.data_ptr(), dt, M, K, qb.data_ptr<uint8_t>(), sb.data_ptr<float>(), N,
                       group, y.data_ptr(), dt, amx ? 1 : 0, amx_dense_min_m, dp_max_m, threads);
        TORCH_CHECK(rc == 0, "int4xpu::cpu_native_mm: int4_gemm returned ", rc);
    }
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
    shape.push_back(N);
    return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(int4xpu, m) {
    m.def("cpu_native_mm(Tensor x, Tensor qb, Tensor sb, Tensor perm, Tensor? bias, int N, "
          "int group, int dense_from, bool amx, int amx_dense_min_m, int dp_max_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(int4xpu, CPU, m) { m.impl("cpu_native_mm", &cpu_native_mm); }
