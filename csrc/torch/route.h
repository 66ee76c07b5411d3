// Which backend serves a call that reached a C++ kernel through the dispatcher.
//
// The C++ backends register their kernels under the CPU and CUDA dispatch keys,
// so a call they serve runs without any Python between torch.ops and the kernel.
// A call goes to the package's Python router instead when another backend is
// asked for (ssae_kernels.use_backend, SSAE_BACKEND), preferred on the device
// (triton on CUDA tensors), or needed (a size this backend does not take). The
// router answers with the result, or with NotImplemented when this backend
// should serve the call after all.
#pragma once

#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

namespace ssae::route {

// The backend asked for by name: use_backend() sets it from Python; otherwise
// SSAE_BACKEND is read per call, since it may change while the process runs.
enum class Request : int { None = 0, Cpu = 1, Cuda = 2, Other = 3 };

inline std::atomic<int>& override_request() {
  static std::atomic<int> request{-1};  // -1: no use_backend() block is active
  return request;
}

inline Request requested() {
  const int active = override_request().load(std::memory_order_relaxed);
  if (active >= 0) return Request(active);
  const char* env = std::getenv("SSAE_BACKEND");
  if (env == nullptr || *env == '\0') return Request::None;
  if (!std::strcmp(env, "cpu")) return Request::Cpu;
  if (!std::strcmp(env, "cuda")) return Request::Cuda;
  return Request::Other;  // another backend, or a spelling the router normalises or rejects
}

// CPU tensors: the cpu backend comes first in the default order.
inline bool cpu_serves() {
  const Request r = requested();
  return r == Request::None || r == Request::Cpu;
}

// CUDA tensors: triton comes first by default, so the cuda backend serves only
// when asked for, and not while SSAE_CHECK_INDICES=1 asks the router for range checks.
inline bool cuda_serves() {
  if (requested() != Request::Cuda) return false;
  const char* check = std::getenv("SSAE_CHECK_INDICES");
  return check == nullptr || std::strcmp(check, "1") != 0;
}

// The router, router(op, native_backend, *args), installed by ssae_kernels at import.
// Held as a raw reference that is never released: a static py::object would be
// destroyed after the interpreter is gone.
inline PyObject*& router() {
  static PyObject* fn = nullptr;
  return fn;
}

// Asks the router to serve op; nullopt (or false for ops without a result) when
// it hands the call back to the native backend.
template <typename Ret, typename... Args>
auto ask_router(const char* op, const char* native, const Args&... args) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(router() != nullptr, "ssae::", op, " was called before ssae_kernels was imported; "
              "import ssae_kernels first (it installs the backend router)");
  py::object result = py::reinterpret_borrow<py::object>(router())(op, native, args...);
  const bool handed_back = result.is(py::handle(Py_NotImplemented));
  if constexpr (std::is_void_v<Ret>) {
    return !handed_back;
  } else {
    return handed_back ? std::nullopt : std::optional<Ret>(result.cast<Ret>());
  }
}

// Routed<&kernel>::call<name, serves>: the dispatcher kernel of a C++ backend.
template <auto Kernel>
struct Routed;

template <typename Ret, typename... Args, Ret (*Kernel)(Args...)>
struct Routed<Kernel> {
  template <const char* Op, const char* Native, bool (*Serves)()>
  static Ret call(Args... args) {
    if (!Serves()) {
      if constexpr (std::is_void_v<Ret>) {
        if (ask_router<Ret>(Op, Native, args...)) return;
      } else {
        if (auto result = ask_router<Ret>(Op, Native, args...)) return std::move(*result);
      }
    }
    return Kernel(args...);
  }
};

}  // namespace ssae::route

// Registers kernel `fn` of backend `native` ("cpu" or "cuda") for ssae::op in a
// TORCH_LIBRARY_IMPL block `m`, behind the routing decision `serves`.
#define SSAE_ROUTED_IMPL(m, op, native, serves, fn)                                                    \
  do {                                                                                                 \
    static constexpr char op_name[] = #op;                                                             \
    static constexpr char native_name[] = native;                                                      \
    using routed = ::ssae::route::Routed<&fn>;                                                         \
    constexpr auto kernel = &routed::template call<op_name, native_name, serves>;                      \
    m.impl(#op, TORCH_FN(kernel));                                                                     \
  } while (0)
