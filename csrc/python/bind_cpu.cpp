// pybind11 module fastlangevin._C: the CPU backend. Pointers come in as Python ints (tensor.data_ptr()); the GIL is
// released while the kernel runs. Built once per instruction-set level, as _C (baseline), _C_avx2 and _C_avx512
// (FASTLANGEVIN_CPU_MODULE, FASTLANGEVIN_CPU_LEVEL; CMakeLists.txt), each with the kernels compiled for its level.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu.h"
#include "fastlangevin/cpu_features.h"
#include "fastlangevin/langevin_step.h"
#include "fastlangevin/mlp_chain.h"

namespace py = pybind11;
namespace flc = fastlangevin::cpu;

#ifndef FASTLANGEVIN_CPU_MODULE
#define FASTLANGEVIN_CPU_MODULE _C
#endif
#ifndef FASTLANGEVIN_CPU_LEVEL
#define FASTLANGEVIN_CPU_LEVEL "unknown"
#endif
#ifndef FASTLANGEVIN_VERSION
#define FASTLANGEVIN_VERSION "unknown"
#endif
#ifndef FASTLANGEVIN_CXX_COMPILER
#define FASTLANGEVIN_CXX_COMPILER "unknown"
#endif
#ifndef FASTLANGEVIN_CXX_FLAGS
#define FASTLANGEVIN_CXX_FLAGS ""
#endif

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

[[noreturn]] void bad_dtype(const char* fn, int dtype) {
  throw py::value_error(std::string(fn) + ": the CPU backend supports dtype 0 (float32) and 1 (float64), got " +
                        std::to_string(dtype) + "; compute float16/bfloat16 in float32 and cast");
}

void langevin_step(uintptr_t z, uintptr_t grad, uintptr_t out, int64_t n, int64_t D, int prior_kind, uintptr_t mean,
                   uintptr_t inv_var, uintptr_t rng_state, double step_size, double noise_scale, int dtype,
                   int n_threads) {
  flc::check_step_args(n, D, prior_kind, ptr<void>(mean), ptr<void>(inv_var), ptr<void>(rng_state), noise_scale);
  if (dtype != fastlangevin::kFloat32 && dtype != fastlangevin::kFloat64) bad_dtype("langevin_step", dtype);
  py::gil_scoped_release release;
  if (dtype == fastlangevin::kFloat32)
    flc::langevin_step_f32(ptr<const float>(z), ptr<const float>(grad), ptr<float>(out), n, D, prior_kind,
                           ptr<const float>(mean), ptr<const float>(inv_var), ptr<const int64_t>(rng_state),
                           step_size, noise_scale, n_threads);
  else
    flc::langevin_step_f64(ptr<const double>(z), ptr<const double>(grad), ptr<double>(out), n, D, prior_kind,
                           ptr<const double>(mean), ptr<const double>(inv_var), ptr<const int64_t>(rng_state),
                           step_size, noise_scale, n_threads);
}

void normal_noise(uintptr_t out, int64_t n, uintptr_t rng_state, int dtype, int n_threads) {
  if (n < 0) throw py::value_error("normal_noise: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && !rng_state) throw py::value_error("normal_noise: rng_state_ptr is 0");
  if (dtype != fastlangevin::kFloat32 && dtype != fastlangevin::kFloat64) bad_dtype("normal_noise", dtype);
  py::gil_scoped_release release;
  if (dtype == fastlangevin::kFloat32)
    flc::normal_noise_f32(ptr<float>(out), n, ptr<const int64_t>(rng_state), n_threads);
  else
    flc::normal_noise_f64(ptr<double>(out), n, ptr<const int64_t>(rng_state), n_threads);
}

// (dims, weight_ptrs, bias_ptrs, activations, activation_params): an MLPNetwork from Python.
using NetworkTuple = std::tuple<std::vector<int64_t>, std::vector<uintptr_t>, std::vector<uintptr_t>, std::vector<int>,
                                std::vector<double>>;

flc::MLPNetwork network(const NetworkTuple& t) {
  flc::MLPNetwork net;
  net.dims = std::get<0>(t);
  for (uintptr_t w : std::get<1>(t)) net.weights.push_back(ptr<const void>(w));
  for (uintptr_t b : std::get<2>(t)) net.biases.push_back(ptr<const void>(b));
  net.activations = std::get<3>(t);
  net.activation_params = std::get<4>(t);
  return net;
}

void mlp_chain(uintptr_t z, int64_t batch, const NetworkTuple& energy, double output_sign,
               const std::optional<NetworkTuple>& generator, uintptr_t target, double likelihood_scale,
               int64_t n_steps, double step_size, double noise_scale, int prior_kind, uintptr_t mean,
               uintptr_t inv_var, uintptr_t rng_state, double clip_grad, int method, uintptr_t energies,
               uintptr_t grad_norms, uintptr_t accepted, uintptr_t first_bad, int dtype, int n_threads,
               uintptr_t n_accepted, int matrix_unit) {
  flc::MLPChainArgs a;
  a.z = ptr<void>(z);
  a.batch = batch;
  a.energy = network(energy);
  a.output_sign = output_sign;
  if (generator) a.generator = network(*generator);
  a.target = ptr<const void>(target);
  a.likelihood_scale = likelihood_scale;
  a.n_steps = n_steps;
  a.step_size = step_size;
  a.noise_scale = noise_scale;
  a.prior_kind = prior_kind;
  a.mean = ptr<const void>(mean);
  a.inv_var = ptr<const void>(inv_var);
  a.rng_state = ptr<const int64_t>(rng_state);
  a.clip_grad = clip_grad;
  a.method = method;
  a.energies = ptr<void>(energies);
  a.grad_norms = ptr<void>(grad_norms);
  a.accepted = ptr<uint8_t>(accepted);
  a.n_accepted = ptr<int64_t>(n_accepted);
  a.first_bad = ptr<int64_t>(first_bad);
  a.dtype = dtype;
  a.matrix_unit = matrix_unit;
  a.n_threads = n_threads;
  flc::check_mlp_chain_args(a);  // std::invalid_argument -> ValueError
  py::gil_scoped_release release;
  flc::mlp_chain(a);
}

// {name: "" when it runs here, else why not} for the bfloat16 matrix units (codes.h MatrixUnit).
py::dict matrix_units() {
  py::dict d;
  d["avx512_bf16"] = flc::matrix_unit_status(fastlangevin::kMatrixAvx512Bf16);
  d["amx_bf16"] = flc::matrix_unit_status(fastlangevin::kMatrixAmxBf16);
  return d;
}

py::dict build_info() {
  py::dict d;
  d["backend"] = "cpu";
  d["version"] = FASTLANGEVIN_VERSION;
  d["compiler"] = FASTLANGEVIN_CXX_COMPILER;
  d["flags"] = FASTLANGEVIN_CXX_FLAGS;
  d["cpu_level"] = FASTLANGEVIN_CPU_LEVEL;
  d["simd_width_bits"] = flc::simd_width_bits();
  d["openmp"] = flc::openmp_version() != 0;
  d["openmp_version"] = flc::openmp_version();
  d["max_threads"] = flc::max_threads();
  d["dtypes"] = py::make_tuple("float32", "float64");
  return d;
}

py::dict cpu_features() {
  const flc::CpuFeatures f = flc::cpu_features();
  py::dict d;
  d["level"] = flc::cpu_level_name(f.level);
  d["x86_64_v2"] = f.x86_64_v2;
  d["avx"] = f.avx;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["bmi1"] = f.bmi1;
  d["bmi2"] = f.bmi2;
  d["f16c"] = f.f16c;
  d["lzcnt"] = f.lzcnt;
  d["movbe"] = f.movbe;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512cd"] = f.avx512cd;
  d["avx512dq"] = f.avx512dq;
  d["avx512vl"] = f.avx512vl;
  d["avx512_bf16"] = f.avx512_bf16;
  d["amx_tile"] = f.amx_tile;
  d["amx_bf16"] = f.amx_bf16;
  d["os_avx"] = f.os_avx;
  d["os_avx512"] = f.os_avx512;
  d["os_amx"] = f.os_amx;
  return d;
}

}  // namespace

PYBIND11_MODULE(FASTLANGEVIN_CPU_MODULE, m) {
  m.doc() = "fastlangevin CPU kernels (framework-free; pass tensor.data_ptr() ints of contiguous tensors)";
  m.def("langevin_step", &langevin_step, py::arg("z_ptr"), py::arg("grad_ptr"), py::arg("out_ptr"), py::arg("n"),
        py::arg("D"), py::arg("prior_kind"), py::arg("mean_ptr"), py::arg("inv_var_ptr"), py::arg("rng_state_ptr"),
        py::arg("step_size"), py::arg("noise_scale"), py::arg("dtype"), py::arg("n_threads"),
        "out = z - (step_size/2)(grad + prior_term) + noise_scale * noise, over n contiguous elements.\n"
        "dtype: 0 float32, 1 float64. prior_kind: 0 flat, 1 normal, 2 diagonal (mean/inv_var of length D, element i "
        "uses i % D). rng_state_ptr: int64 [seed, counter], read, not advanced. n_threads <= 0: all.");
  m.def("normal_noise", &normal_noise, py::arg("out_ptr"), py::arg("n"), py::arg("rng_state_ptr"), py::arg("dtype"),
        py::arg("n_threads"), "Writes the first n values of the Philox/Box-Muller stream at rng_state to out.");
  m.def("mlp_chain", &mlp_chain, py::arg("z_ptr"), py::arg("batch"), py::arg("energy"), py::arg("output_sign"),
        py::arg("generator"), py::arg("target_ptr"), py::arg("likelihood_scale"), py::arg("n_steps"),
        py::arg("step_size"), py::arg("noise_scale"), py::arg("prior_kind"), py::arg("mean_ptr"),
        py::arg("inv_var_ptr"), py::arg("rng_state_ptr"), py::arg("clip_grad"), py::arg("method"),
        py::arg("energies_ptr"), py::arg("grad_norms_ptr"), py::arg("accepted_ptr"), py::arg("first_bad_ptr"),
        py::arg("dtype"), py::arg("n_threads"), py::arg("n_accepted_ptr") = 0, py::arg("matrix_unit") = 0,
        "The fused Langevin chain of MLP energies (contract: fastlangevin.ops.mlp_chain), z (batch, D) updated in\n"
        "place. energy, generator: (dims, weight_ptrs, bias_ptrs, activations, activation_params) with weight l\n"
        "(dims[l+1], dims[l]) row-major, bias_ptrs empty or one per layer, activations codes of\n"
        "fastlangevin.ops.codes (one per layer, applied after it). The energy maps D -> 1; generator None, or\n"
        "Dg -> P with Dg <= D, reading z[:, :Dg], with target_ptr (batch, P) and likelihood_scale 1 / (2 sigma^2).\n"
        "method: 0 ULA, 1 MALA. energies_ptr, grad_norms_ptr (n_steps, batch) of dtype, accepted_ptr (uint8) and\n"
        "n_accepted_ptr (batch,) int64 may be 0 (not wanted); first_bad_ptr (batch,) int64 is always written.\n"
        "clip_grad <= 0: no clipping. matrix_unit: 0 vector FMAs in dtype; 1 AVX512-BF16, 2 AMX-BF16: a float32\n"
        "chain (dtype 0) with bfloat16 weights and biases, the products' inputs rounded to bfloat16, accumulated in\n"
        "float32 (see matrix_units()).");
  m.def("matrix_units", &matrix_units,
        "{'avx512_bf16': status, 'amx_bf16': status} of the bfloat16 matrix units: '' when the unit runs here, else\n"
        "why not (not compiled in, not in this CPU, not enabled by the OS, tile data refused). Asks Linux for the AMX\n"
        "tile data permission once per process.");
  m.def("build_info", &build_info, "How this module was built: compiler, flags, CPU level, SIMD width, OpenMP.");
  m.def("cpu_features", &cpu_features,
        "This CPU's instruction sets and the OS's support for their registers (cpuid, xgetbv); 'level': the highest\n"
        "kernel level it runs: 'baseline', 'avx2' (x86-64-v3) or 'avx512' (x86-64-v4).");
  m.attr("PRIOR_FLAT") = (int)fastlangevin::kPriorFlat;
  m.attr("PRIOR_NORMAL") = (int)fastlangevin::kPriorNormal;
  m.attr("PRIOR_DIAGONAL") = (int)fastlangevin::kPriorDiagonal;
}
