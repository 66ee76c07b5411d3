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

// Every op with a kernel in each compiled backend: ssae::<op> is served by ssae::<op>_cpu and ssae::<op>_cuda.
#define SSAE_COMPILED_OPS(X)                                                                                  \
  X(topk_encode) X(threshold_encode) X(sparse_decode) X(sampled_dot) X(latent_transpose) X(sparse_transpose_matmul)              \
  X(tilted_group_stats) X(row_sq_error) X(sparse_decode_sq_error) X(sparse_decode_residual) X(project_subspace) \
  X(project_subspace_) X(sparse_adam_)

TORCH_LIBRARY_IMPL(ssae, CPU, m) {
#define SSAE_CPU_IMPL(op) SSAE_ROUTED_IMPL(m, op, "cpu", ssae::route::cpu_serves, ssae::op##_cpu);
  SSAE_COMPILED_OPS(SSAE_CPU_IMPL)
#undef SSAE_CPU_IMPL
}

#ifdef SSAE_WITH_CUDA
TORCH_LIBRARY_IMPL(ssae, CUDA, m) {
#define SSAE_CUDA_IMPL(op) SSAE_ROUTED_IMPL(m, op, "cuda", ssae::route::cuda_serves, ssae::op##_cuda);
  SSAE_COMPILED_OPS(SSAE_CUDA_IMPL)
#undef SSAE_CUDA_IMPL
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
  info["cpu_avx512_bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
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
  m.def("topk_encode_screens_cpu", &ssae::topk_encode_screens_cpu);
  m.def("set_bf16_dot", &ssae::set_bf16_dot);
}
