// The fully fused Langevin chain of MLP energies on the CPU (contract: fastlangevin/ops/mlp_chain.py): argument
// checks and the choice of the engine of the layer products. The chain itself is cpu_chain.h, instantiated here with
// the vector FMA engine (float32, float64) and in csrc/cpu/mlp_chain_bf16.cpp with the bfloat16 matrix units.
//
// The file is compiled with -ffp-contract=off like the step kernel, so the update rounds like the reference.
#include "fastlangevin/mlp_chain.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu_chain.h"
#include "fastlangevin/cpu_gemm.h"
#include "fastlangevin/cpu_matrix_units.h"

namespace fastlangevin {
namespace cpu {
namespace {

void check_network(const MLPNetwork& net, const std::string& name) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument("mlp_chain: " + name + " " + what); };
  if (net.dims.size() < 2)
    fail("dims must have at least 2 sizes (one layer), got " + std::to_string(net.dims.size()));
  for (size_t i = 0; i < net.dims.size(); ++i)
    if (net.dims[i] < 1 || net.dims[i] > (1 << 20))
      fail("dims[" + std::to_string(i) + "] must be in [1, 2^20], got " + std::to_string(net.dims[i]));
  const size_t L = net.dims.size() - 1;
  auto count = [&](const char* what, size_t n) {
    if (n != L)
      fail(std::string(what) + " must have " + std::to_string(L) + " entries (one per layer), got " +
           std::to_string(n));
  };
  count("weight_ptrs", net.weights.size());
  if (!net.biases.empty()) count("bias_ptrs (when not empty)", net.biases.size());
  count("activations", net.activations.size());
  count("activation_params", net.activation_params.size());
  for (size_t l = 0; l < L; ++l) {
    if (!net.weights[l]) fail("weight_ptrs[" + std::to_string(l) + "] is 0");
    if (!net.biases.empty() && !net.biases[l]) fail("bias_ptrs[" + std::to_string(l) + "] is 0");
    if (net.activations[l] < 0 || net.activations[l] >= kActivationCount)
      fail("activations[" + std::to_string(l) + "] must be a code of fastlangevin.ops.codes (0.." +
           std::to_string(kActivationCount - 1) + "), got " + std::to_string(net.activations[l]));
  }
}

}  // namespace

void check_mlp_chain_args(const MLPChainArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("mlp_chain: " + what); };
  if (a.dtype != kFloat32 && a.dtype != kFloat64)
    fail("dtype must be 0 (float32) or 1 (float64), got " + std::to_string(a.dtype) +
         "; compute float16/bfloat16 in float32 and cast");
  if (a.matrix_unit < 0 || a.matrix_unit >= kMatrixUnitCount)
    fail("matrix_unit must be 0 (vector), 1 (AVX512-BF16) or 2 (AMX-BF16), got " + std::to_string(a.matrix_unit));
  if (a.matrix_unit != kMatrixVector) {
    if (a.dtype != kFloat32)
      fail("a bfloat16 matrix unit runs a float32 chain (dtype 0), got dtype " + std::to_string(a.dtype));
    const std::string why = matrix_unit_status(a.matrix_unit);
    if (!why.empty()) fail("matrix_unit " + std::to_string(a.matrix_unit) + " cannot run here: " + why);
  }
  if (a.batch < 0) fail("batch must be >= 0, got " + std::to_string(a.batch));
  if (a.n_steps < 0) fail("n_steps must be >= 0, got " + std::to_string(a.n_steps));
  check_network(a.energy, "energy");
  if (a.energy.dims.back() != 1)
    fail("the energy's last size must be 1 (a scalar energy), got " + std::to_string(a.energy.dims.back()));
  if (!a.generator.dims.empty()) {
    check_network(a.generator, "generator");
    if (a.generator.dims[0] > a.energy.dims[0])
      fail("the generator reads z[:, :Dg] with Dg = generator dims[0] <= D = " + std::to_string(a.energy.dims[0]) +
           ", got Dg = " + std::to_string(a.generator.dims[0]));
    if (!(a.likelihood_scale > 0) || !std::isfinite(a.likelihood_scale))
      fail("likelihood_scale (1 / (2 sigma^2)) must be finite and > 0 with a generator, got " +
           std::to_string(a.likelihood_scale));
    if (a.batch > 0 && !a.target) fail("a generator needs target_ptr ((batch, P) targets), got 0");
  } else if (a.target) {
    fail("target_ptr given without a generator");
  }
  if (a.output_sign != 1.0 && a.output_sign != -1.0)
    fail("output_sign must be 1 or -1, got " + std::to_string(a.output_sign));
  if (a.method != kMethodUla && a.method != kMethodMala)
    fail("method must be 0 (ULA) or 1 (MALA), got " + std::to_string(a.method));
  if (a.method == kMethodMala && !(a.step_size > 0))
    fail("MALA needs step_size > 0, got " + std::to_string(a.step_size));
  if (a.prior_kind < kPriorFlat || a.prior_kind > kPriorDiagonal)
    fail("prior_kind must be 0 (flat), 1 (normal) or 2 (diagonal), got " + std::to_string(a.prior_kind));
  if (a.prior_kind == kPriorDiagonal && (!a.mean || !a.inv_var))
    fail("the diagonal prior (prior_kind=2) needs mean_ptr and inv_var_ptr");
  if ((a.noise_scale != 0.0 || a.method == kMethodMala) && !a.rng_state)
    fail("noise_scale != 0 and MALA need rng_state_ptr");
  if (a.batch > 0 && a.n_steps > 0 && !a.z) fail("z_ptr is 0");
  if (a.batch > 0 && !a.first_bad) fail("first_bad_ptr ((batch,) int64, always written) is 0");
  if (a.batch > 0 && a.energy.dims[0] > std::numeric_limits<int64_t>::max() / a.batch)
    fail("batch * dims[0] overflows int64");
  if (a.batch > 0 && !a.generator.dims.empty() &&
      a.generator.dims.back() > std::numeric_limits<int64_t>::max() / a.batch)
    fail("batch * P (the target's size) overflows int64");
}

void mlp_chain(const MLPChainArgs& a) {
  if (a.batch > 0 && a.n_steps == 0) {
    std::fill(a.first_bad, a.first_bad + a.batch, int64_t(-1));
    if (a.method == kMethodMala && a.n_accepted) std::fill(a.n_accepted, a.n_accepted + a.batch, int64_t(0));
  }
  if (a.batch == 0 || a.n_steps == 0) return;
  if (a.matrix_unit != kMatrixVector)
    mlp_chain_bf16(a);
  else if (a.dtype == kFloat32)
    chain::run_chain<VectorEngine<float>>(a);
  else
    chain::run_chain<VectorEngine<double>>(a);
}

}  // namespace cpu
}  // namespace fastlangevin
