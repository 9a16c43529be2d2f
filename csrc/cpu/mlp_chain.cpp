// The fully fused Langevin chain of an MLP energy on the CPU (contract: fastlangevin/ops/mlp_chain.py).
//
// Layout. Samples are cut into tiles of TB = NV * (SIMD lanes) samples; each thread owns whole tiles and runs all
// K steps on one tile before the next, so the tile's state and activations stay in L1/L2 for the whole chain.
// Inside a tile every array is feature-major, one row of TB samples per feature: the samples sit in the SIMD lanes,
// so per-sample quantities (energies, gradient norms, clipping scales, the MALA test) are plain vector arithmetic
// across lanes and no layer width needs padding.
//
// Layer products (cpu_gemm.h). Forward, a_l (n_out x TB) = W_l (n_out x n_in) . x_l (n_in x TB); backward,
// W_l^T . delta_l. The weights are packed once per call into panels for both directions, shared read-only by the
// threads. The activation and its slope (forward), the slope product (backward) and, for the last hidden layer, the
// scalar output layer (a dot product) and the first delta run on each panel of rows while it is in L1. Gradient
// norms, clipping, the prior term, the Philox noise (the step kernel's generator, cpu_noise.h) and the update then
// run over the tile's D x TB gradient.
//
// Notation of one evaluation of the network at x_0 = z: a_l = W_l x_l + b_l, x_{l+1} = act_l(a_l),
// slope_l = act_l'(a_l), delta_l = dE/da_l; delta_l = (W_{l+1}^T delta_{l+1}) * slope_l and grad E = W_0^T delta_0.
//
// The file is compiled with -ffp-contract=off like the step kernel, so the update rounds like the reference.
#include "fastlangevin/mlp_chain.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu.h"
#include "fastlangevin/cpu_activations.h"
#include "fastlangevin/cpu_gemm.h"
#include "fastlangevin/cpu_noise.h"
#include "fastlangevin/cpu_simd.h"
#include "fastlangevin/langevin_step.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
namespace {

// ---- The networks, packed once per call -----------------------------------------------------------------------

template <typename T>
struct Layer {
  int n_in = 0, n_out = 0;
  Packed<T> forward{};   // W (n_out x n_in) in panels of output rows
  Packed<T> backward{};  // W^T (n_in x n_out) in panels of input rows
  const T* weight = nullptr;  // W, row-major (the scalar output layer reads it directly, unpacked)
  const T* bias = nullptr;    // (n_out,): zeros where the network has no biases
  int activation = kActIdentity;
  T param = 0;
};

// Everything one call evaluates: the energy network (its last layer has one output and is not packed), and the
// storage and jobs behind the packed panels.
template <typename T>
struct Model {
  std::vector<Layer<T>> energy;
  T sign = 1;
  AlignedBuffer<T> storage;         // packed panels, zero biases
  std::vector<PackJob<T>> packing;  // what fills the panels (run by the threads of the chain, see run_tiles)
};

// Hands out consecutive cache-line-aligned arrays of one buffer; with base == nullptr it only counts, so that one
// layout function both sizes and carves a buffer.
template <typename T>
struct Carver {
  T* base = nullptr;
  size_t used = 0;
  T* take(size_t n) {
    T* p = base ? base + used : nullptr;
    used += whole_lines<T>(n);
    return p;
  }
};

// Lays out the layers of `spec` in `carve`'s buffer: forward and backward panels for every layer except a scalar
// output layer, zero biases where there are none. Fills `layers` and `jobs` when carving (not when counting).
template <typename T>
void layout_network(const MLPNetwork& spec, bool scalar_output, int max_mr, Carver<T>& carve,
                    std::vector<Layer<T>>& layers, std::vector<PackJob<T>>& jobs) {
  const int L = (int)spec.dims.size() - 1;
  const bool counting = carve.base == nullptr;
  if (!counting) layers.assign(L, Layer<T>());
  for (int l = 0; l < L; ++l) {
    const int n_in = (int)spec.dims[l], n_out = (int)spec.dims[l + 1];
    const T* W = static_cast<const T*>(spec.weights[l]);
    const bool packed = !(scalar_output && l == L - 1);
    T* forward = packed ? carve.take((size_t)n_out * n_in) : nullptr;
    T* backward = packed ? carve.take((size_t)n_out * n_in) : nullptr;
    T* zero_bias = spec.biases.empty() ? carve.take(n_out) : nullptr;
    if (counting) continue;
    Layer<T>& layer = layers[l];
    layer.n_in = n_in;
    layer.n_out = n_out;
    layer.weight = W;
    layer.activation = spec.activations[l];
    layer.param = (T)spec.activation_params[l];
    if (zero_bias) std::fill(zero_bias, zero_bias + n_out, T(0));
    layer.bias = zero_bias ? zero_bias : static_cast<const T*>(spec.biases[l]);
    if (packed) {
      const int mr_out = panel_rows(n_out, max_mr), mr_in = panel_rows(n_in, max_mr);
      jobs.push_back({W, n_out, n_in, n_in, 1, mr_out, forward});
      layer.forward = {forward, n_out, n_in, mr_out};
      jobs.push_back({W, n_in, n_out, 1, n_in, mr_in, backward});
      layer.backward = {backward, n_in, n_out, mr_in};
    }
  }
}

template <typename T>
void build_model(const MLPChainArgs& a, int max_mr, Model<T>& m) {
  Carver<T> count;
  layout_network(a.energy, true, max_mr, count, m.energy, m.packing);
  m.storage = AlignedBuffer<T>(count.used);
  Carver<T> carve{m.storage.data()};
  layout_network(a.energy, true, max_mr, carve, m.energy, m.packing);
  m.sign = (T)a.output_sign;
}

// ---- The chain's settings ---------------------------------------------------------------------------------------

template <typename T>
struct Settings {
  const T* z_in;
  T* z_out;
  int64_t batch;
  int D;
  int64_t n_steps;
  int method, prior_kind;
  bool noise;
  T half_step, sigma, two_eps, clip;
  const T* mean;
  const T* inv_var;
  uint64_t seed, counter;
  T* energies;
  T* grad_norms;
  uint8_t* accepted;
};

// ---- One thread's workspace for one tile ----------------------------------------------------------------------

// A point of the chain: z (D x TB), the clipped gradient at z, and per sample E(z) and the unclipped ||grad E(z)||.
template <typename T>
struct State {
  T *z, *grad, *energy, *norm;
};

// The tile arrays of the energy network's layers. For the product layers l = 0..L-2: delta[l] (n_out x TB); for
// the hidden layers before the last, l = 0..L-3: output[l] = x_{l+1} (the next layer's input) and slope[l]
// (nullptr for identity layers). The last hidden layer keeps neither: its epilogue turns them into delta[L-2] and
// the scalar output at once.
template <typename T>
struct NetworkTile {
  std::vector<T*> output, slope, delta;

  void layout(const std::vector<Layer<T>>& layers, int TB, Carver<T>& carve) {
    const int L = (int)layers.size();
    output.assign(std::max(L - 1, 0), nullptr);
    slope.assign(std::max(L - 1, 0), nullptr);
    delta.assign(std::max(L - 1, 0), nullptr);
    for (int l = 0; l + 1 < L; ++l) {
      const size_t rows = (size_t)layers[l].n_out * TB;
      delta[l] = carve.take(rows);
      if (l + 2 < L) {
        output[l] = carve.take(rows);
        if (layers[l].activation != kActIdentity) slope[l] = carve.take(rows);
      }
    }
  }
};

// All arrays are cache-line aligned rows of TB values; one meaning each.
template <typename T>
struct Work {
  State<T> current, proposal;  // proposal: MALA's z' (unused by ULA)
  T* noise;                    // D x TB: the step's noise, transposed
  T* noise_stream;             // the tile's noise in stream order: nb * D values from an offset < 4, whole blocks
  NetworkTile<T> energy_net;
  // Per sample (TB values each):
  T* output_sum;    // W_{L-1} x_{L-1} of the scalar output layer, accumulated over the panels of the layer before
  T* output_scale;  // dE/da_{L-1} = output_sign * act_{L-1}'(a_{L-1})
  T* sq_norm;       // ||grad E||^2, accumulated over gradient rows
  T* clip_scale;    // min(1, clip / (||grad E|| + 1e-12))
  T *prior_energy, *proposal_prior_energy;       // MALA: U_prior(z), U_prior(z')
  T *forward_residual, *backward_residual;       // MALA: squared norms of the proposal residuals
  int32_t* take;                                 // MALA: 1 where the proposal is accepted
  AlignedBuffer<T> storage;
  AlignedBuffer<int32_t> take_storage;

  Work(const Model<T>& m, int D, int TB, bool mala) {
    Carver<T> count;
    layout(m, D, TB, mala, count);
    storage = AlignedBuffer<T>(count.used);
    std::memset(storage.data(), 0, count.used * sizeof(T));
    Carver<T> carve{storage.data()};
    layout(m, D, TB, mala, carve);
    take_storage = AlignedBuffer<int32_t>(whole_lines<int32_t>(TB));
    take = take_storage.data();
  }

 private:
  void layout(const Model<T>& m, int D, int TB, bool mala, Carver<T>& carve) {
    const size_t rows = (size_t)D * TB;
    for (State<T>* s : {&current, &proposal}) {
      const bool used = s == &current || mala;
      s->z = used ? carve.take(rows) : nullptr;
      s->grad = used ? carve.take(rows) : nullptr;
      s->energy = used ? carve.take(TB) : nullptr;
      s->norm = used ? carve.take(TB) : nullptr;
    }
    noise = carve.take(rows);
    noise_stream = carve.take(rows + 8);
    energy_net.layout(m.energy, TB, carve);
    for (T** lane : {&output_sum, &output_scale, &sq_norm, &clip_scale, &prior_energy, &proposal_prior_energy,
                     &forward_residual, &backward_residual})
      *lane = carve.take(TB);
  }
};

// log u of MALA's acceptance uniform for `sample` at `counter` (philox.acceptance_uniforms: word x0 of the block at
// counter (sample, counter's low word, counter's high word | 2^31), u = x0 2^-32 + 2^-33 in T).
template <typename T>
T log_acceptance_uniform(uint64_t seed, uint64_t counter, uint64_t sample) {
  const uint32_t x0 = philox4x32_10((uint32_t)sample, (uint32_t)(sample >> 32), (uint32_t)counter,
                                    (uint32_t)(counter >> 32) | 0x80000000u, (uint32_t)seed, (uint32_t)(seed >> 32))
                          .x0;
  return std::log(simd::uniform_open0<T>(x0));
}

// ---- One tile ------------------------------------------------------------------------------------------------

template <typename T, int NV>
class TileChain {
 public:
  static constexpr int TB = NV * Vec<T>::kLanes;

  TileChain(const Model<T>& m, const Settings<T>& s, Work<T>& w) : m_(m), s_(s), w_(w) {}

  // All K steps of the samples [s0, s0 + nb) (nb <= TB).
  void run(int64_t s0, int nb) {
    const int D = s_.D;
    State<T>& st = w_.current;
    // z^T into the tile; lanes past nb are 0 (they are computed on but never written out)
    std::memset(st.z, 0, sizeof(T) * (size_t)D * TB);
    std::memset(w_.noise, 0, sizeof(T) * (size_t)D * TB);
    for (int b = 0; b < nb; ++b) {
      const T* __restrict src = s_.z_in + (s0 + b) * D;
      for (int d = 0; d < D; ++d) st.z[(int64_t)d * TB + b] = src[d];
    }
    if (s_.method == kMethodUla) {
      for (int64_t k = 0; k < s_.n_steps; ++k) {
        if (s_.noise) draw_noise(s0, nb, s_.counter + (uint64_t)k);
        if (s_.clip > T(0)) {  // the update needs the whole gradient's norm first
          evaluate(st, [](int, int) {});
          step(st.z, st.grad, st.z, 0, D);
        } else {  // z is not read after the first layer: update it as the gradient rows come out of the kernel
          evaluate(st, [&](int d0, int d1) { step(st.z, st.grad, st.z, d0, d1); });
        }
        record(k, s0, nb);
      }
    } else {
      evaluate(st, [](int, int) {});
      for (int64_t k = 0; k < s_.n_steps; ++k) {
        record(k, s0, nb);
        mala_step(k, s0, nb);
      }
    }
    for (int b = 0; b < nb; ++b) {
      T* __restrict dst = s_.z_out + (s0 + b) * D;
      for (int d = 0; d < D; ++d) dst[d] = st.z[(int64_t)d * TB + b];
    }
  }

 private:
  const Model<T>& m_;
  const Settings<T>& s_;
  Work<T>& w_;

  static void clear(T* lane) {
    for (int b = 0; b < TB; ++b) lane[b] = T(0);
  }

  // ---- Evaluation: E, grad E and its norm at a state, in named stages ----

  // Fills at.energy, at.norm and at.grad (clipped). on_rows(d0, d1) runs on each finished block of gradient rows
  // [d0, d1) while it is in L1 (after its squares went into the norms; before clipping, so only where there is
  // none): ULA's update is fused there.
  template <typename OnRows>
  void evaluate(const State<T>& at, OnRows&& on_rows) {
    clear(w_.sq_norm);
    auto gradient_rows = [&](int d0, int d1) {
      T* __restrict ss = w_.sq_norm;
      for (int d = d0; d < d1; ++d) {
        const T* __restrict g = at.grad + (int64_t)d * TB;
        for (int b = 0; b < TB; ++b) ss[b] += g[b] * g[b];
      }
      on_rows(d0, d1);
    };
    if (m_.energy.size() == 1) {
      linear_energy(at);
      gradient_rows(0, s_.D);
    } else {
      energy_forward(at.z);
      energy_output(at.energy);
      energy_backward(at.grad, gradient_rows);
    }
    norm_and_clip(at);
  }

  // A one-layer energy E = sign * act(w . z + b): its gradient is w times a per-sample factor.
  void linear_energy(const State<T>& at) {
    const Layer<T>& out = m_.energy[0];
    T* __restrict sum = w_.output_sum;
    clear(sum);
    for (int d = 0; d < s_.D; ++d) {
      const T wd = out.weight[d];
      const T* __restrict z = at.z + (int64_t)d * TB;
      for (int b = 0; b < TB; ++b) sum[b] += wd * z[b];
    }
    energy_output(at.energy);
    const T* __restrict scale = w_.output_scale;
    for (int d = 0; d < s_.D; ++d) {
      const T wd = out.weight[d];
      T* __restrict g = at.grad + (int64_t)d * TB;
      for (int b = 0; b < TB; ++b) g[b] = scale[b] * wd;
    }
  }

  // Hidden layers x_{l+1} = act_l(W_l x_l + b_l) (keeping slope_l), then the last hidden layer fused with the scalar
  // output layer: output_sum = W_{L-1} act_{L-2}(a_{L-2}) and delta[L-2] = W_{L-1}^T * slope_{L-2}, times the
  // output sign where the output layer is linear (energy_output applies dE/da_{L-1} otherwise).
  void energy_forward(const T* z) {
    const std::vector<Layer<T>>& net = m_.energy;
    const NetworkTile<T>& tile = w_.energy_net;
    const int L = (int)net.size();
    const T* x = z;
    for (int l = 0; l + 2 < L; ++l) {
      hidden_layer(net[l], x, tile.output[l], tile.slope[l]);
      x = tile.output[l];
    }
    const Layer<T>& last = net[L - 2];
    const Layer<T>& out = net[L - 1];
    const T sign = out.activation == kActIdentity ? m_.sign : T(1);
    T* __restrict sum = w_.output_sum;
    clear(sum);
    T* delta = tile.delta[L - 2];
    with_activation(last.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      product<T, NV>(last.forward, x, delta, [&](int n0, int h) {
        for (int r = n0; r < n0 + h; ++r) {
          T* __restrict dr = delta + (int64_t)r * TB;
          const T br = last.bias[r], wr = out.weight[r], gw = sign * wr;
          for (int b = 0; b < TB; ++b) {
            T hv, dv;
            activation<ACT, T>(dr[b] + br, last.param, hv, dv);
            sum[b] += wr * hv;
            dr[b] = gw * dv;
          }
        }
      });
    });
  }

  // x_{l+1} = act(W x + b) into `out`, act'(.) into `slope` (not kept for identity layers).
  void hidden_layer(const Layer<T>& layer, const T* x, T* out, T* slope) {
    with_activation(layer.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      product<T, NV>(layer.forward, x, out, [&](int n0, int h) {
        for (int r = n0; r < n0 + h; ++r) {
          T* __restrict hr = out + (int64_t)r * TB;
          T* __restrict sr = ACT != kActIdentity ? slope + (int64_t)r * TB : nullptr;
          const T br = layer.bias[r];
          for (int b = 0; b < TB; ++b) {
            T hv, dv;
            activation<ACT, T>(hr[b] + br, layer.param, hv, dv);
            hr[b] = hv;
            if constexpr (ACT != kActIdentity) sr[b] = dv;
          }
        }
      });
    });
  }

  // E = sign * act_{L-1}(a_{L-1}) from output_sum, and output_scale = dE/da_{L-1}; where the output layer is not
  // linear, the last hidden layer's delta gets that factor now (energy_forward could not know it yet).
  void energy_output(T* energy) {
    const std::vector<Layer<T>>& net = m_.energy;
    const Layer<T>& out = net.back();
    const T b_out = out.bias[0], sign = m_.sign;
    const T* __restrict sum = w_.output_sum;
    T* __restrict scale = w_.output_scale;
    with_activation(out.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      for (int b = 0; b < TB; ++b) {
        T hv, dv;
        activation<ACT, T>(sum[b] + b_out, out.param, hv, dv);
        energy[b] = sign * hv;
        scale[b] = sign * dv;
      }
    });
    if (out.activation == kActIdentity || net.size() == 1) return;
    const int L = (int)net.size();
    T* delta = w_.energy_net.delta[L - 2];
    for (int r = 0; r < net[L - 2].n_out; ++r) {
      T* __restrict dr = delta + (int64_t)r * TB;
      for (int b = 0; b < TB; ++b) dr[b] *= scale[b];
    }
  }

  // delta_{l-1} = (W_l^T delta_l) * slope_{l-1} down to delta_0, then grad = W_0^T delta_0, each block of gradient
  // rows handed to gradient_rows.
  template <typename OnRows>
  void energy_backward(T* grad, OnRows&& gradient_rows) {
    const std::vector<Layer<T>>& net = m_.energy;
    const NetworkTile<T>& tile = w_.energy_net;
    const int L = (int)net.size();
    const T* delta = tile.delta[L - 2];
    for (int l = L - 2; l >= 1; --l) {
      T* out = tile.delta[l - 1];
      const T* slope = tile.slope[l - 1];
      product<T, NV>(net[l].backward, delta, out, [&](int n0, int h) {
        if (!slope) return;  // an identity layer
        T* __restrict o = out + (int64_t)n0 * TB;
        const T* __restrict sl = slope + (int64_t)n0 * TB;
        for (int i = 0; i < h * TB; ++i) o[i] *= sl[i];
      });
      delta = out;
    }
    product<T, NV>(net[0].backward, delta, grad, [&](int n0, int h) { gradient_rows(n0, n0 + h); });
  }

  // norm = ||grad E|| per sample, then clipping: grad *= min(1, clip / (norm + 1e-12)) (NaN stays NaN, like
  // torch.clamp).
  void norm_and_clip(const State<T>& at) {
    const T* __restrict ss = w_.sq_norm;
    T* __restrict norm = at.norm;
    for (int b = 0; b < TB; ++b) norm[b] = std::sqrt(ss[b]);
    if (!(s_.clip > T(0))) return;
    T* __restrict scale = w_.clip_scale;
    for (int b = 0; b < TB; ++b) {
      const T c = s_.clip / (norm[b] + T(1e-12));
      scale[b] = c > T(1) ? T(1) : c;
    }
    for (int d = 0; d < s_.D; ++d) {
      T* __restrict g = at.grad + (int64_t)d * TB;
      for (int b = 0; b < TB; ++b) g[b] = g[b] * scale[b];
    }
  }

  // ---- Noise, update, MALA ----

  // The step noise of the tile's samples [s0, s0 + nb) at `counter`, transposed into w.noise (D x TB; the lanes
  // past nb stay 0). Elements s0 * D .. (s0 + nb) * D - 1 of the stream are contiguous: whole Philox blocks are drawn
  // from the one containing element s0 * D.
  void draw_noise(int64_t s0, int nb, uint64_t counter) {
    const int D = s_.D;
    const int64_t e0 = s0 * D, j0 = e0 / 4;
    const int offset = (int)(e0 - 4 * j0);
    const int64_t n_blocks = (offset + (int64_t)nb * D + 3) / 4;
    T* stream = w_.noise_stream;
    for (int64_t j = 0; j < n_blocks; j += simd::kTileBlocks)
      simd::tile_noise((uint64_t)(j0 + j), (int)std::min<int64_t>(simd::kTileBlocks, n_blocks - j), s_.seed,
                       counter, stream + 4 * j);
    for (int d = 0; d < D; ++d) gather_lanes<T>(stream + offset + d, D, nb, w_.noise + (int64_t)d * TB);
  }

  // out = z - (eps/2)(g + prior_term(z)) [+ sigma * noise] on rows [d0, d1), as langevin_step_reference rounds it.
  template <int kPrior, bool kNoise>
  void update(const T* z, const T* g, T* out, int d0, int d1) {
    const T half = s_.half_step, sigma = s_.sigma;
    for (int d = d0; d < d1; ++d) {
      const T m = kPrior == kPriorDiagonal ? s_.mean[d] : T(0);
      const T iv = kPrior == kPriorDiagonal ? s_.inv_var[d] : T(0);
      const T* zr = z + (int64_t)d * TB;
      const T* __restrict gr = g + (int64_t)d * TB;
      const T* __restrict nr = w_.noise + (int64_t)d * TB;
      T* orow = out + (int64_t)d * TB;
      for (int b = 0; b < TB; ++b) {
        T v = langevin_update<T>(kPrior, zr[b], gr[b], m, iv, half);
        if (kNoise) v = langevin_add_noise<T>(v, sigma, nr[b]);
        orow[b] = v;
      }
    }
  }

  void step(const T* z, const T* g, T* out, int d0, int d1) {
    switch (s_.prior_kind * 2 + (s_.noise ? 1 : 0)) {
      case kPriorFlat * 2: update<kPriorFlat, false>(z, g, out, d0, d1); break;
      case kPriorFlat * 2 + 1: update<kPriorFlat, true>(z, g, out, d0, d1); break;
      case kPriorNormal * 2: update<kPriorNormal, false>(z, g, out, d0, d1); break;
      case kPriorNormal * 2 + 1: update<kPriorNormal, true>(z, g, out, d0, d1); break;
      case kPriorDiagonal * 2: update<kPriorDiagonal, false>(z, g, out, d0, d1); break;
      default: update<kPriorDiagonal, true>(z, g, out, d0, d1); break;
    }
  }

  // MALA's per-sample sums (sampler._mala_accept): prior energies U_prior(z), U_prior(z'), and the squared norms
  // of the forward (z -> z') and backward (z' -> z) proposal residuals.
  template <int kPrior>
  void mala_sums() {
    const T half = s_.half_step;
    T* __restrict up = w_.prior_energy;
    T* __restrict upp = w_.proposal_prior_energy;
    T* __restrict fw = w_.forward_residual;
    T* __restrict bw = w_.backward_residual;
    for (int b = 0; b < TB; ++b) up[b] = upp[b] = fw[b] = bw[b] = T(0);
    for (int d = 0; d < s_.D; ++d) {
      const T m = kPrior == kPriorDiagonal ? s_.mean[d] : T(0);
      const T iv = kPrior == kPriorDiagonal ? s_.inv_var[d] : T(0);
      const int64_t o = (int64_t)d * TB;
      const T* __restrict z = w_.current.z + o;
      const T* __restrict zp = w_.proposal.z + o;
      const T* __restrict g = w_.current.grad + o;
      const T* __restrict gp = w_.proposal.grad + o;
      for (int b = 0; b < TB; ++b) {
        T diff = T(0), pg = T(0), diffp = T(0), pgp = T(0);
        if (kPrior == kPriorNormal) {
          diff = pg = z[b];
          diffp = pgp = zp[b];
        } else if (kPrior == kPriorDiagonal) {
          diff = z[b] - m;
          pg = iv * diff;
          diffp = zp[b] - m;
          pgp = iv * diffp;
        }
        up[b] += diff * pg;
        upp[b] += diffp * pgp;
        const T f = (zp[b] - z[b]) + half * (g[b] + pg);
        const T r = (z[b] - zp[b]) + half * (gp[b] + pgp);
        fw[b] += f * f;
        bw[b] += r * r;
      }
    }
    for (int b = 0; b < TB; ++b) {
      up[b] = T(0.5) * up[b];
      upp[b] = T(0.5) * upp[b];
    }
  }

  void record(int64_t k, int64_t s0, int nb) {
    if (s_.energies) std::memcpy(s_.energies + k * s_.batch + s0, w_.current.energy, sizeof(T) * nb);
    if (s_.grad_norms) std::memcpy(s_.grad_norms + k * s_.batch + s0, w_.current.norm, sizeof(T) * nb);
  }

  // One MALA step from the current state: proposal, its energy and gradient, the Metropolis test, and the
  // accepted values kept per sample.
  void mala_step(int64_t k, int64_t s0, int nb) {
    State<T>& cur = w_.current;
    const State<T>& prop = w_.proposal;
    const uint64_t counter = s_.counter + (uint64_t)k;
    if (s_.noise) draw_noise(s0, nb, counter);
    step(cur.z, cur.grad, prop.z, 0, s_.D);
    evaluate(prop, [](int, int) {});
    switch (s_.prior_kind) {
      case kPriorFlat: mala_sums<kPriorFlat>(); break;
      case kPriorNormal: mala_sums<kPriorNormal>(); break;
      default: mala_sums<kPriorDiagonal>(); break;
    }
    int32_t* __restrict take = w_.take;
    for (int b = 0; b < TB; ++b) {
      take[b] = 0;
      if (b < nb) {  // accept where log u < log alpha (a NaN log alpha rejects)
        const T log_alpha = (cur.energy[b] + w_.prior_energy[b]) - (prop.energy[b] + w_.proposal_prior_energy[b]) -
                            (w_.backward_residual[b] - w_.forward_residual[b]) / s_.two_eps;
        take[b] = log_acceptance_uniform<T>(s_.seed, counter, (uint64_t)(s0 + b)) < log_alpha ? 1 : 0;
        if (s_.accepted) s_.accepted[k * s_.batch + s0 + b] = (uint8_t)take[b];
      }
    }
    for (int d = 0; d < s_.D; ++d) {
      const int64_t o = (int64_t)d * TB;
      T* __restrict z = cur.z + o;
      T* __restrict g = cur.grad + o;
      const T* __restrict zp = prop.z + o;
      const T* __restrict gp = prop.grad + o;
      for (int b = 0; b < TB; ++b) {
        z[b] = take[b] ? zp[b] : z[b];
        g[b] = take[b] ? gp[b] : g[b];
      }
    }
    for (int b = 0; b < TB; ++b) {
      cur.energy[b] = take[b] ? prop.energy[b] : cur.energy[b];
      cur.norm[b] = take[b] ? prop.norm[b] : cur.norm[b];
    }
  }
};

// ---- Driver --------------------------------------------------------------------------------------------------

template <typename T, int NV>
void run_tiles(const Model<T>& m, const Settings<T>& s, int n_threads) {
  constexpr int TB = TileChain<T, NV>::TB;
  const int64_t n_tiles = (s.batch + TB - 1) / TB;
  const int nt = (int)std::min<int64_t>(std::max(n_threads, 1), n_tiles);
  std::vector<Work<T>> works;  // allocated here: nothing inside the parallel region can throw
  works.reserve(nt);
  for (int i = 0; i < nt; ++i) works.emplace_back(m, s.D, TB, s.method == kMethodMala);
  // Tiles are handed out one at a time (all cost the same; on a shared machine a thread whose core is busy then
  // simply takes fewer).
  std::atomic<int64_t> next_tile{0};
  auto tiles = [&](int id) {
    TileChain<T, NV> chain(m, s, works[id]);
    for (int64_t t = next_tile.fetch_add(1, std::memory_order_relaxed); t < n_tiles;
         t = next_tile.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t s0 = t * TB;
      chain.run(s0, (int)std::min<int64_t>(TB, s.batch - s0));
    }
  };
  // Each thread packs its share of the weight panels and waits for the others before running tiles.
  if (nt == 1) {
    for (const PackJob<T>& job : m.packing) job.run(0, 1);
    tiles(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), count = omp_get_num_threads();
    for (const PackJob<T>& job : m.packing) job.run(id, count);
#pragma omp barrier
    tiles(id);
  }
#else
  for (const PackJob<T>& job : m.packing) job.run(0, 1);
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int id = 1; id < nt; ++id) pool.emplace_back([&, id] { tiles(id); });
  tiles(0);
  for (auto& t : pool) t.join();
#endif
}

// Vectors per tile: two (32 float32 samples with AVX-512: a layer's activations, 200 x 32 x 4 bytes, stay in L1
// while each weight panel streams from L2; the micro-kernel runs at the FMA peak), or one when a thread's share of
// the batch fits in one vector (small batches then still use every thread).
constexpr int kTileVectors = 2;

int vectors_per_tile(int64_t batch, int lanes, int n_threads) {
  const int64_t per_thread = (batch + n_threads - 1) / n_threads;
  return per_thread <= lanes ? 1 : kTileVectors;
}

template <typename T>
void chain_typed(const MLPChainArgs& a) {
  const int n_threads = a.n_threads > 0 ? a.n_threads : max_threads();
  const int nv = vectors_per_tile(a.batch, Vec<T>::kLanes, n_threads);
  Model<T> m;
  build_model<T>(a, nv == 1 ? rows_per_block<1>() : rows_per_block<kTileVectors>(), m);

  Settings<T> s;
  s.z_in = static_cast<const T*>(a.z);
  s.z_out = static_cast<T*>(a.z);
  s.batch = a.batch;
  s.D = (int)a.energy.dims[0];
  s.n_steps = a.n_steps;
  s.method = a.method;
  s.prior_kind = a.prior_kind;
  s.noise = a.noise_scale != 0.0;
  // The reference multiplies by the Python floats step_size / 2 and noise_scale and divides by 2 * step_size,
  // which torch rounds to T first.
  s.half_step = (T)(a.step_size / 2);
  s.sigma = (T)a.noise_scale;
  s.two_eps = (T)(2 * a.step_size);
  s.clip = (T)(a.clip_grad > 0 ? a.clip_grad : 0.0);
  s.mean = static_cast<const T*>(a.mean);
  s.inv_var = static_cast<const T*>(a.inv_var);
  s.seed = a.rng_state ? (uint64_t)a.rng_state[0] : 0;
  s.counter = a.rng_state ? (uint64_t)a.rng_state[1] : 0;
  s.energies = static_cast<T*>(a.energies);
  s.grad_norms = static_cast<T*>(a.grad_norms);
  s.accepted = a.method == kMethodMala ? a.accepted : nullptr;

  if (nv == 1)
    run_tiles<T, 1>(m, s, n_threads);
  else
    run_tiles<T, kTileVectors>(m, s, n_threads);
}

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
  if (a.batch < 0) fail("batch must be >= 0, got " + std::to_string(a.batch));
  if (a.n_steps < 0) fail("n_steps must be >= 0, got " + std::to_string(a.n_steps));
  check_network(a.energy, "energy");
  if (a.energy.dims.back() != 1)
    fail("the energy's last size must be 1 (a scalar energy), got " + std::to_string(a.energy.dims.back()));
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
  if (a.batch > 0 && a.energy.dims[0] > std::numeric_limits<int64_t>::max() / a.batch)
    fail("batch * dims[0] overflows int64");
}

void mlp_chain(const MLPChainArgs& a) {
  if (a.batch == 0 || a.n_steps == 0) return;
  if (a.dtype == kFloat32)
    chain_typed<float>(a);
  else
    chain_typed<double>(a);
}

}  // namespace cpu
}  // namespace fastlangevin
