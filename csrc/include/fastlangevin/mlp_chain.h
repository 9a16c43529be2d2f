// CPU entry point of the fully fused Langevin chain of MLP energies (contract: fastlangevin.ops.mlp_chain).
// Framework-free: raw pointers to contiguous arrays of the compute dtype, sizes and scalars.
//
// Total energy E(z) = output_sign * energy(z) + likelihood_scale * ||target_b - generator(z[:, :Dg])||^2, the second
// term only with a generator (Dg = its dims[0] <= D, target (batch, P) with P its last size). A network of L layers:
// weight (dims[l+1], dims[l]) row-major, optional bias (dims[l+1],), h_{l+1} = act_l(W_l h_l + b_l); the energy
// network ends in one output. All n_steps steps (forward, analytic input gradient of both terms, clipping of the
// total gradient, prior, Philox noise at counter rng_state[1] + k, update; for MALA also the proposal's energy and
// gradient and the Metropolis test) run in one call, z (batch, dims[0]) updated in place.
#ifndef FASTLANGEVIN_MLP_CHAIN_H_
#define FASTLANGEVIN_MLP_CHAIN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "fastlangevin/codes.h"

namespace fastlangevin {
namespace cpu {

// An MLP as the kernels take it: L = dims.size() - 1 layers.
struct MLPNetwork {
  std::vector<int64_t> dims;               // (d_0, ..., d_L)
  std::vector<const void*> weights;        // L pointers, W_l (dims[l+1], dims[l]) row-major
  std::vector<const void*> biases;         // empty (no biases) or L pointers, b_l (dims[l+1],)
  std::vector<int> activations;            // L codes (codes.h): h_{l+1} = act_l(W_l h_l + b_l)
  std::vector<double> activation_params;   // L parameters: leaky ReLU's slope, ELU's alpha (ignored otherwise)
};

struct MLPChainArgs {
  void* z = nullptr;  // (batch, dims[0]), updated in place
  int64_t batch = 0;
  MLPNetwork energy;                  // dims (D, ..., 1)
  double output_sign = 1.0;           // +1 or -1
  MLPNetwork generator;               // dims (Dg, ..., P) with Dg <= D; empty dims: no likelihood term
  const void* target = nullptr;       // (batch, P): x_b of the likelihood term (with a generator)
  double likelihood_scale = 0.0;      // 1 / (2 sigma^2) of the likelihood term, > 0 (with a generator)
  int64_t n_steps = 0;
  double step_size = 0.0;             // epsilon
  double noise_scale = 0.0;           // sigma (MALA: sqrt(epsilon))
  int prior_kind = kPriorNormal;      // the diagonal prior reads mean and inv_var (dims[0])
  const void* mean = nullptr;
  const void* inv_var = nullptr;
  const int64_t* rng_state = nullptr;  // [seed, counter]: read, never advanced
  double clip_grad = 0.0;              // > 0: each sample's ||grad E|| is bounded by it
  int method = kMethodUla;
  void* energies = nullptr;    // (n_steps, batch): E of the state before step k; nullptr: not wanted
  void* grad_norms = nullptr;  // (n_steps, batch): its unclipped ||grad E||; nullptr: not wanted
  uint8_t* accepted = nullptr;  // (n_steps, batch), MALA only; nullptr: not wanted
  int64_t* n_accepted = nullptr;  // (batch,), MALA only: accepted proposals per sample; nullptr: not wanted
  // (batch,), always written: the first step k at which E(z_k) or its gradient was not finite, -1 when none
  // (a MALA proposal whose energy is not finite is rejected and does not count).
  int64_t* first_bad = nullptr;
  int dtype = kFloat32;         // kFloat32 or kFloat64: z and every array above
  // Which unit computes the layer products (codes.h). kMatrixVector: weights and biases in `dtype`. The bfloat16
  // units (matrix_unit_status says whether this CPU has them): a float32 chain, weights and biases bfloat16.
  int matrix_unit = kMatrixVector;
  int n_threads = 0;            // <= 0: all
};

// "" when `matrix_unit` (a MatrixUnit code) can run here, else why not: not compiled in, not in this CPU, not
// enabled by the OS, or (AMX) tile data refused by the kernel. The first call for AMX asks Linux for the tile data
// permission (arch_prctl ARCH_REQ_XCOMP_PERM), once per process; thread-safe.
std::string matrix_unit_status(int matrix_unit);

// Throws std::invalid_argument naming the bad argument, the expected and the actual value.
void check_mlp_chain_args(const MLPChainArgs& args);

// Runs the chain (call check_mlp_chain_args first). Thread-safe; takes no locks.
void mlp_chain(const MLPChainArgs& args);

}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_MLP_CHAIN_H_
