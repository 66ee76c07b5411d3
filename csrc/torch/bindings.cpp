// ssae_kernels._C: the compiled backends, called by ssae_kernels/backends.py.
// The public op schemas live in ssae_kernels/ops/library.py; these functions
// are the kernels the CPU backend plugs into them.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_ops.h"
#ifdef SSAE_WITH_CUDA
#include "cuda_ops.h"
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssae_kernels compiled backends";
  m.def("build_info", &build_info);
  m.def("topk_encode_cpu", &ssae::topk_encode_cpu);
  m.def("sparse_decode_cpu", &ssae::sparse_decode_cpu);
  m.def("sampled_dot_cpu", &ssae::sampled_dot_cpu);
  m.def("latent_transpose_cpu", &ssae::latent_transpose_cpu);
  m.def("sparse_transpose_matmul_cpu", &ssae::sparse_transpose_matmul_cpu);
  m.def("topk_encode_plan_cpu", &ssae::topk_encode_plan_cpu);
#ifdef SSAE_WITH_CUDA
  m.def("topk_encode_cuda", &ssae::topk_encode_cuda);
  m.def("sparse_decode_cuda", &ssae::sparse_decode_cuda);
  m.def("sampled_dot_cuda", &ssae::sampled_dot_cuda);
  m.def("latent_transpose_cuda", &ssae::latent_transpose_cuda);
  m.def("sparse_transpose_matmul_cuda", &ssae::sparse_transpose_matmul_cuda);
  m.def("tilted_group_stats_cuda", &ssae::tilted_group_stats_cuda);
  m.def("row_sq_error_cuda", &ssae::row_sq_error_cuda);
  m.def("sparse_decode_sq_error_cuda", &ssae::sparse_decode_sq_error_cuda);
  m.def("sparse_decode_residual_cuda", &ssae::sparse_decode_residual_cuda);
  m.def("project_subspace_cuda", &ssae::project_subspace_cuda);
  m.def("project_subspace__cuda", &ssae::project_subspace__cuda);
#endif
  m.def("tilted_group_stats_cpu", &ssae::tilted_group_stats_cpu);
  m.def("row_sq_error_cpu", &ssae::row_sq_error_cpu);
  m.def("sparse_decode_sq_error_cpu", &ssae::sparse_decode_sq_error_cpu);
  m.def("sparse_decode_residual_cpu", &ssae::sparse_decode_residual_cpu);
  m.def("project_subspace_cpu", &ssae::project_subspace_cpu);
  m.def("project_subspace__cpu", &ssae::project_subspace__cpu);
}
