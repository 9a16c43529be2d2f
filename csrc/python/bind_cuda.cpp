// pybind11 module fastlangevin._C_cuda: the CUDA backend. Device pointers and the stream come in as Python ints
// (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream). The launch is asynchronous; errors of the launch
// itself raise RuntimeError. The caller makes the tensors' device current.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastlangevin/cuda.h"
#include "fastlangevin/langevin_step.h"

namespace py = pybind11;
namespace flcu = fastlangevin::cuda;

#ifndef FASTLANGEVIN_VERSION
#define FASTLANGEVIN_VERSION "unknown"
#endif
#ifndef FASTLANGEVIN_CXX_COMPILER
#define FASTLANGEVIN_CXX_COMPILER "unknown"
#endif
#ifndef FASTLANGEVIN_CUDA_FLAGS
#define FASTLANGEVIN_CUDA_FLAGS ""
#endif

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check_dtype(const char* fn, int dtype) {
  if (dtype < fastlangevin::kFloat32 || dtype > fastlangevin::kBFloat16)
    throw py::value_error(std::string(fn) +
                          ": dtype must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), got " +
                          std::to_string(dtype));
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

void langevin_step(uintptr_t z, uintptr_t grad, uintptr_t out, int64_t n, int64_t D, int prior_kind, uintptr_t mean,
                   uintptr_t inv_var, uintptr_t rng_state, double step_size, double noise_scale, int dtype,
                   int n_threads, uintptr_t stream) {
  (void)n_threads;  // the CPU backend's knob; kept so that both backends share one signature
  if (n < 0) throw py::value_error("langevin_step: n must be >= 0, got " + std::to_string(n));
  if (prior_kind < fastlangevin::kPriorFlat || prior_kind > fastlangevin::kPriorDiagonal)
    throw py::value_error("langevin_step: prior_kind must be 0 (flat), 1 (normal) or 2 (diagonal), got " +
                          std::to_string(prior_kind));
  if (prior_kind == fastlangevin::kPriorDiagonal && (D <= 0 || !mean || !inv_var))
    throw py::value_error("langevin_step: the diagonal prior (prior_kind=2) needs D >= 1 (got " + std::to_string(D) +
                          "), mean_ptr and inv_var_ptr (float32 for 16-bit dtypes)");
  if (noise_scale != 0.0 && !rng_state) throw py::value_error("langevin_step: noise_scale != 0 needs rng_state_ptr");
  check_dtype("langevin_step", dtype);
  std::string err;
  {
    py::gil_scoped_release release;
    err = flcu::langevin_step(ptr<const void>(z), ptr<const void>(grad), ptr<void>(out), n, D, prior_kind,
                              ptr<const void>(mean), ptr<const void>(inv_var), ptr<const int64_t>(rng_state),
                              step_size, noise_scale, dtype, stream);
  }
  raise_if(err);
}

void normal_noise(uintptr_t out, int64_t n, uintptr_t rng_state, int dtype, int n_threads, uintptr_t stream) {
  (void)n_threads;
  if (n < 0) throw py::value_error("normal_noise: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && !rng_state) throw py::value_error("normal_noise: rng_state_ptr is 0");
  check_dtype("normal_noise", dtype);
  std::string err;
  {
    py::gil_scoped_release release;
    err = flcu::normal_noise(ptr<void>(out), n, ptr<const int64_t>(rng_state), dtype, stream);
  }
  raise_if(err);
}

py::dict build_info() {
  py::dict d;
  d["backend"] = "cuda";
  d["version"] = FASTLANGEVIN_VERSION;
  d["compiler"] = FASTLANGEVIN_CXX_COMPILER;
  d["cuda_flags"] = FASTLANGEVIN_CUDA_FLAGS;
  d["cuda_archs"] = std::string(flcu::archs());
  d["nvcc_version"] = flcu::compiler_version();
  d["cuda_runtime_version"] = flcu::runtime_version();
  d["cuda_driver_version"] = flcu::driver_version();
  d["cudart"] = "static";
  d["dtypes"] = py::make_tuple("float32", "float64", "float16", "bfloat16");
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastlangevin CUDA kernels (framework-free; pass device data_ptr() ints and a cudaStream_t int)";
  m.def("langevin_step", &langevin_step, py::arg("z_ptr"), py::arg("grad_ptr"), py::arg("out_ptr"), py::arg("n"),
        py::arg("D"), py::arg("prior_kind"), py::arg("mean_ptr"), py::arg("inv_var_ptr"), py::arg("rng_state_ptr"),
        py::arg("step_size"), py::arg("noise_scale"), py::arg("dtype"), py::arg("n_threads"), py::arg("stream"),
        "out = z - (step_size/2)(grad + prior_term) + noise_scale * noise, launched on `stream`.\n"
        "dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (16-bit types compute in float32; mean/inv_var are then "
        "float32). rng_state_ptr: device int64 [seed, counter], read in the kernel, not advanced. n_threads: "
        "ignored.");
  m.def("normal_noise", &normal_noise, py::arg("out_ptr"), py::arg("n"), py::arg("rng_state_ptr"), py::arg("dtype"),
        py::arg("n_threads"), py::arg("stream"),
        "Writes the first n values of the Philox/Box-Muller stream at rng_state to out (in dtype).");
  m.def("build_info", &build_info, "How this module was built: compiler, CUDA archs, runtime and driver versions.");
  m.def(
      "runtime_status",
      []() -> py::object {
        const std::string s = flcu::runtime_status();
        if (s.empty()) return py::none();
        return py::str(s);
      },
      "None when the (statically linked) CUDA runtime reaches a device, else why not. Needs no torch.");
  m.def("device_count", &flcu::device_count, "Devices the runtime sees (0 on any error).");
}
