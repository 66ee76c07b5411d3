// ssae_kernels._C: the compiled backends, called by ssae_kernels/backends.py.
// The public op schemas live in ssae_kernels/ops/library.py; these functions
// are the kernels the CPU backend plugs into them.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_ops.h"

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
  info["cuda"] = false;
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
  m.def("topk_encode_tile_cpu", &ssae::topk_encode_tile_cpu);
  m.def("tilted_group_stats_cpu", &ssae::tilted_group_stats_cpu);
  m.def("row_sq_error_cpu", &ssae::row_sq_error_cpu);
  m.def("sparse_decode_sq_error_cpu", &ssae::sparse_decode_sq_error_cpu);
}
