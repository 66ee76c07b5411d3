// ssae_kernels._C: plugs the compiled backends into the ssae ops.
//
// The op schemas are declared in Python, one per op module (ssae_kernels/ops);
// this file registers the CPU backend's kernels under the CPU dispatch key and,
// when built with CUDA, the CUDA backend's under the CUDA key, each behind the
// routing decision of route.h. The Python module only carries what the package
// needs to drive that routing, and build facts for `python -m ssae_kernels.info`.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_ops.h"
#include "route.h"
#ifdef SSAE_WITH_CUDA
#include "cuda_ops.h"
#endif

TORCH_LIBRARY_IMPL(ssae, CPU, m) {
  using ssae::route::cpu_serves;
  SSAE_ROUTED_IMPL(m, topk_encode, "cpu", cpu_serves, ssae::topk_encode_cpu);
  SSAE_ROUTED_IMPL(m, sparse_decode, "cpu", cpu_serves, ssae::sparse_decode_cpu);
  SSAE_ROUTED_IMPL(m, sampled_dot, "cpu", cpu_serves, ssae::sampled_dot_cpu);
  SSAE_ROUTED_IMPL(m, latent_transpose, "cpu", cpu_serves, ssae::latent_transpose_cpu);
  SSAE_ROUTED_IMPL(m, sparse_transpose_matmul, "cpu", cpu_serves, ssae::sparse_transpose_matmul_cpu);
  SSAE_ROUTED_IMPL(m, tilted_group_stats, "cpu", cpu_serves, ssae::tilted_group_stats_cpu);
  SSAE_ROUTED_IMPL(m, row_sq_error, "cpu", cpu_serves, ssae::row_sq_error_cpu);
  SSAE_ROUTED_IMPL(m, sparse_decode_sq_error, "cpu", cpu_serves, ssae::sparse_decode_sq_error_cpu);
  SSAE_ROUTED_IMPL(m, sparse_decode_residual, "cpu", cpu_serves, ssae::sparse_decode_residual_cpu);
  SSAE_ROUTED_IMPL(m, project_subspace, "cpu", cpu_serves, ssae::project_subspace_cpu);
  SSAE_ROUTED_IMPL(m, project_subspace_, "cpu", cpu_serves, ssae::project_subspace__cpu);
}

#ifdef SSAE_WITH_CUDA
TORCH_LIBRARY_IMPL(ssae, CUDA, m) {
  using ssae::route::cuda_serves;
  SSAE_ROUTED_IMPL(m, topk_encode, "cuda", cuda_serves, ssae::topk_encode_cuda);
  SSAE_ROUTED_IMPL(m, sparse_decode, "cuda", cuda_serves, ssae::sparse_decode_cuda);
  SSAE_ROUTED_IMPL(m, sampled_dot, "cuda", cuda_serves, ssae::sampled_dot_cuda);
  SSAE_ROUTED_IMPL(m, latent_transpose, "cuda", cuda_serves, ssae::latent_transpose_cuda);
  SSAE_ROUTED_IMPL(m, sparse_transpose_matmul, "cuda", cuda_serves, ssae::sparse_transpose_matmul_cuda);
  SSAE_ROUTED_IMPL(m, tilted_group_stats, "cuda", cuda_serves, ssae::tilted_group_stats_cuda);
  SSAE_ROUTED_IMPL(m, row_sq_error, "cuda", cuda_serves, ssae::row_sq_error_cuda);
  SSAE_ROUTED_IMPL(m, sparse_decode_sq_error, "cuda", cuda_serves, ssae::sparse_decode_sq_error_cuda);
  SSAE_ROUTED_IMPL(m, sparse_decode_residual, "cuda", cuda_serves, ssae::sparse_decode_residual_cuda);
  SSAE_ROUTED_IMPL(m, project_subspace, "cuda", cuda_serves, ssae::project_subspace_cuda);
  SSAE_ROUTED_IMPL(m, project_subspace_, "cuda", cuda_serves, ssae::project_subspace__cuda);
}
#endif

namespace {

py::dict build_info() {
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#if defined(__x86_64__)
  __builtin_cpu_init();
  info["cpu_avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  info["cpu_avx2"] = bool(__builtin_cpu_supports("avx2"));
#endif
  info["compiler"] = __VERSION__;
#ifdef SSAE_WITH_CUDA
  info["cuda"] = true;  // the CUDA backend was compiled in (setup.py: SSAE_BUILD_CUDA=1 or TORCH_CUDA_ARCH_LIST)
#else
  info["cuda"] = false;
#endif
  return info;
}

void set_router(py::object fn) {
  PyObject*& slot = ssae::route::router();
  Py_XDECREF(slot);
  slot = fn.release().ptr();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssae_kernels compiled backends (kernels registered with the dispatcher at load)";
  m.def("build_info", &build_info);
  m.def("set_router", &set_router, "router(op, native_backend, *args): serves calls the C++ backends hand over");
  m.def("set_override", [](int request) { ssae::route::override_request().store(request); },
        "the backend of the innermost use_backend() block: -1 none, 0 default, 1 cpu, 2 cuda, 3 another");
  m.def("topk_encode_plan_cpu", &ssae::topk_encode_plan_cpu);
}
