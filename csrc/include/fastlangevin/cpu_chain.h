// The fully fused Langevin chain of MLP energies on the CPU, templated on the engine of its matrix products, so that
// translation units compiled for different instruction sets instantiate the same chain: csrc/cpu/mlp_chain.cpp with
// the vector FMA engine (float32/float64, cpu_gemm.h) and csrc/cpu/mlp_chain_bf16.cpp with the bfloat16 engines (AMX
// tiles, AVX512-BF16 dot products; cpu_bf16.h). Contract: fastlangevin/ops/mlp_chain.py; entry: mlp_chain.h.
//
// Layout. Samples are cut into tiles of TB = NV * (SIMD lanes) samples; each thread owns whole tiles and runs all
// K steps on one tile before the next, so the tile's state and activations stay in L1/L2 for the whole chain.
// Inside a tile every array is feature-major, one row of TB samples per feature: the samples sit in the SIMD lanes,
// so per-sample quantities (energies, gradient norms, clipping scales, the MALA test) are plain vector arithmetic
// across lanes and no layer width needs padding.
//
// Layer products (the Engine). Forward, a_l (n_out x TB) = W_l (n_out x n_in) . x_l (n_in x TB); backward,
// W_l^T . delta_l. The weights are packed once per call into panels for both directions, shared read-only by the
// threads. Every product hands each block of output rows to an epilogue while it is in L1: the activation and its
// slope (hidden layers), the slope product (backward), and in each network's top product layer the energy term
// itself. For the energy network that is the last hidden layer fused with the scalar output layer (a dot product
// per sample) and its delta; for the generator, the output layer fused with the residual against the tile's target,
// the likelihood sum and its delta. Gradient norms, clipping, the prior term, the Philox noise (the step kernel's
// generator, cpu_noise.h) and the update then run over the tile's D x TB gradient. Everything outside the products
// is computed in the compute type T whatever the engine: with a bfloat16 engine only the products' operands are
// bfloat16 (the engine rounds its input rows when it starts a product) and they accumulate in float32.
//
// Notation of one evaluation of a network at x_0: a_l = W_l x_l + b_l, x_{l+1} = act_l(a_l), slope_l = act_l'(a_l),
// delta_l = dE/da_l; delta_l = (W_{l+1}^T delta_{l+1}) * slope_l and dE/dx_0 = W_0^T delta_0. The generator reads
// x_0 = the first Dg rows of the tile's z (feature-major, so that is a prefix of the array) and its dE/dx_0 is added
// to the first Dg rows of the energy network's gradient.
//
// An Engine provides: T (compute type), Weight (element type of the weights and biases given), Elem (of the packed
// panels), Panels, PackJob (run(part, parts) packs its share), Scratch (per thread, Scratch(max_cols, TB)),
// ThreadScope (per thread while it runs tiles: the AMX tile configuration), panel_size(rows, cols),
// plan<NV>(src, rows, cols, rs, cs, dst, jobs) -> Panels, and product<NV>(panels, X, C, scratch, epilogue(n0, h)).
//
// Include only from translation units compiled with -ffp-contract=off, so the update rounds like the reference.
#ifndef FASTLANGEVIN_CPU_CHAIN_H_
#define FASTLANGEVIN_CPU_CHAIN_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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
#include "fastlangevin/mlp_chain.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {
namespace chain {

// ---- The networks, packed once per call -----------------------------------------------------------------------

template <class Engine>
struct Layer {
  using T = typename Engine::T;
  int n_in = 0, n_out = 0;
  typename Engine::Panels forward{};   // W (n_out x n_in) packed for products with output rows n_out
  typename Engine::Panels backward{};  // W^T (n_in x n_out)
  const T* weight = nullptr;  // W of a scalar output layer (read directly, unpacked), in T
  const T* bias = nullptr;    // (n_out,) in T: zeros where the network has no biases
  int activation = kActIdentity;
  T param = 0;
};

// Everything one call evaluates: the energy network (its last layer has one output and is not packed), the
// generator network of the likelihood term (empty without one), and the storage and jobs behind the packed panels.
template <class Engine>
struct Model {
  using T = typename Engine::T;
  std::vector<Layer<Engine>> energy, generator;
  T sign = 1;
  T likelihood_scale = 0, two_likelihood_scale = 0;  // lambda and 2 lambda: E += lambda ||x - G||^2
  int max_cols = 0;                                   // the longest inner dimension of a product (Scratch size)
  AlignedBuffer<typename Engine::Elem> panels;        // packed panels
  AlignedBuffer<T> storage;                           // zero biases; biases and output weights converted to T
  std::vector<typename Engine::PackJob> packing;      // what fills the panels (run by the chain's threads, run_tiles)

  bool has_generator() const { return !generator.empty(); }
  int generator_inputs() const { return has_generator() ? generator.front().n_in : 0; }   // Dg
  int generator_outputs() const { return has_generator() ? generator.back().n_out : 0; }  // P
};

// Hands out consecutive cache-line-aligned arrays of one buffer, or (a counting carver) only adds up their sizes,
// so that one layout function both sizes and carves a buffer.
template <typename T>
struct Carver {
  static Carver counting() { return Carver(); }
  static Carver over(const AlignedBuffer<T>& buffer) { return Carver(buffer.data()); }

  bool counts() const { return counting_; }
  size_t used() const { return used_; }
  T* take(size_t n) {
    T* p = counting_ ? nullptr : base_ + used_;
    used_ += whole_lines<T>(n);
    return p;
  }

 private:
  Carver() = default;
  explicit Carver(T* base) : base_(base), counting_(false) {}
  T* base_ = nullptr;
  bool counting_ = true;
  size_t used_ = 0;
};

// n values of the given weights in the compute type: the given array itself where they are of that type, else a
// converted copy in `carve`'s buffer (nullptr while counting).
template <class Engine>
const typename Engine::T* in_compute_type(const void* src, size_t n, Carver<typename Engine::T>& carve) {
  using T = typename Engine::T;
  using W = typename Engine::Weight;
  if constexpr (std::is_same<W, T>::value) {
    return static_cast<const T*>(src);
  } else {
    T* dst = carve.take(n);
    if (!carve.counts())
      for (size_t i = 0; i < n; ++i) dst[i] = Engine::to_compute(static_cast<const W*>(src)[i]);
    return dst;
  }
}

// Lays out the layers of `spec`: forward and backward panels in `panels` for every layer except a scalar output
// layer; in `values`, zero biases where there are none and whatever must be converted to the compute type. Fills
// `m`'s layers and jobs when carving (not when counting).
template <class Engine, int NV>
void layout_network(const MLPNetwork& spec, bool scalar_output, Carver<typename Engine::Elem>& panels,
                    Carver<typename Engine::T>& values, std::vector<Layer<Engine>>& layers, Model<Engine>& m) {
  using T = typename Engine::T;
  using Elem = typename Engine::Elem;
  using W = typename Engine::Weight;
  const int L = (int)spec.dims.size() - 1;
  const bool counting = panels.counts();
  if (!counting) layers.assign(L, Layer<Engine>());
  for (int l = 0; l < L; ++l) {
    const int n_in = (int)spec.dims[l], n_out = (int)spec.dims[l + 1];
    const bool packed = !(scalar_output && l == L - 1);
    Elem* forward = packed ? panels.take(Engine::panel_size(n_out, n_in)) : nullptr;
    Elem* backward = packed ? panels.take(Engine::panel_size(n_in, n_out)) : nullptr;
    const T* weight = packed ? nullptr : in_compute_type<Engine>(spec.weights[l], (size_t)n_in, values);
    const bool no_bias = spec.biases.empty();
    T* zero_bias = no_bias ? values.take(n_out) : nullptr;
    const T* bias = no_bias ? zero_bias : in_compute_type<Engine>(spec.biases[l], (size_t)n_out, values);
    if (packed) m.max_cols = std::max(m.max_cols, std::max(n_in, n_out));
    if (counting) continue;
    Layer<Engine>& layer = layers[l];
    layer.n_in = n_in;
    layer.n_out = n_out;
    layer.weight = weight;
    layer.activation = spec.activations[l];
    layer.param = (T)spec.activation_params[l];
    if (no_bias) std::fill(zero_bias, zero_bias + n_out, T(0));
    layer.bias = bias;
    if (packed) {
      const W* w = static_cast<const W*>(spec.weights[l]);
      layer.forward = Engine::template plan<NV>(w, n_out, n_in, n_in, 1, forward, m.packing);
      layer.backward = Engine::template plan<NV>(w, n_in, n_out, 1, n_in, backward, m.packing);
    }
  }
}

template <class Engine, int NV>
void build_model(const MLPChainArgs& a, Model<Engine>& m) {
  using T = typename Engine::T;
  using Elem = typename Engine::Elem;
  const bool generator = !a.generator.dims.empty();
  Carver<Elem> count_panels = Carver<Elem>::counting();
  Carver<T> count_values = Carver<T>::counting();
  layout_network<Engine, NV>(a.energy, true, count_panels, count_values, m.energy, m);
  if (generator) layout_network<Engine, NV>(a.generator, false, count_panels, count_values, m.generator, m);
  m.panels = AlignedBuffer<Elem>(count_panels.used());
  m.storage = AlignedBuffer<T>(count_values.used());
  Carver<Elem> panels = Carver<Elem>::over(m.panels);
  Carver<T> values = Carver<T>::over(m.storage);
  layout_network<Engine, NV>(a.energy, true, panels, values, m.energy, m);
  if (generator) layout_network<Engine, NV>(a.generator, false, panels, values, m.generator, m);
  m.sign = (T)a.output_sign;
  m.likelihood_scale = generator ? (T)a.likelihood_scale : T(0);
  m.two_likelihood_scale = generator ? (T)(2 * a.likelihood_scale) : T(0);
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
  const T* target;  // (batch, P) with a generator
  T* energies;
  T* grad_norms;
  uint8_t* accepted;
  int64_t* n_accepted;
  int64_t* first_bad;
};

// ---- One thread's workspace for one tile ----------------------------------------------------------------------

// A point of the chain: z (D x TB), the clipped gradient at z, and per sample E(z) and the unclipped ||grad E(z)||.
template <typename T>
struct State {
  T *z, *grad, *energy, *norm;
};

// The tile arrays of one network's product layers l = 0..top, where `top` is the layer whose epilogue computes the
// network's energy term (the energy network's last hidden layer, L - 2, fused with the scalar output layer; the
// generator's output layer, L - 1, fused with the residual): delta[l] (n_out x TB) for each; output[l] = x_{l+1}
// (the next layer's input) and slope[l] (nullptr for identity layers) below the top only, since the top layer's
// epilogue turns its output and slope into the energy term and delta[top] at once.
template <typename T>
struct NetworkTile {
  int top = -1;
  std::vector<T*> output, slope, delta;

  template <class Engine>
  void layout(const std::vector<Layer<Engine>>& layers, int top_layer, int TB, Carver<T>& carve) {
    top = top_layer;
    const size_t n = (size_t)std::max(top + 1, 0);
    output.assign(n, nullptr);
    slope.assign(n, nullptr);
    delta.assign(n, nullptr);
    for (int l = 0; l <= top; ++l) {
      const size_t rows = (size_t)layers[l].n_out * TB;
      delta[l] = carve.take(rows);
      if (l < top) {
        output[l] = carve.take(rows);
        if (layers[l].activation != kActIdentity) slope[l] = carve.take(rows);
      }
    }
  }
};

// All arrays are cache-line aligned rows of TB values; one meaning each.
template <class Engine>
struct Work {
  using T = typename Engine::T;
  State<T> current, proposal;  // proposal: MALA's z' (unused by ULA)
  T* noise;                    // D x TB: the step's noise, transposed
  T* noise_stream;             // the tile's noise in stream order: nb * D values from an offset < 4, whole blocks
  NetworkTile<T> energy_net, generator_net;
  T* target;          // P x TB: the tile's likelihood targets (with a generator)
  T* generator_grad;  // Dg x TB: the likelihood term's gradient (with a generator)
  // Per sample (TB values each):
  T* output_sum;    // W_{L-1} x_{L-1} of the scalar output layer, accumulated over the panels of the layer before
  T* output_scale;  // dE/da_{L-1} = output_sign * act_{L-1}'(a_{L-1})
  T* residual_sum;  // ||x - G(z)||^2, accumulated over the generator's output panels
  T* sq_norm;       // ||grad E||^2, accumulated over gradient rows
  T* clip_scale;    // min(1, clip / (||grad E|| + 1e-12))
  T *prior_energy, *proposal_prior_energy;       // MALA: U_prior(z), U_prior(z')
  T *forward_residual, *backward_residual;       // MALA: squared norms of the proposal residuals
  int32_t* take;                                 // MALA: 1 where the proposal is accepted
  typename Engine::Scratch gemm;               // the products' own workspace
  AlignedBuffer<T> storage;
  AlignedBuffer<int32_t> take_storage;

  Work(const Model<Engine>& m, int D, int TB, bool mala) : gemm(m.max_cols, TB) {
    Carver<T> count = Carver<T>::counting();
    layout(m, D, TB, mala, count);
    storage = AlignedBuffer<T>(count.used());
    std::memset(storage.data(), 0, count.used() * sizeof(T));
    Carver<T> carve = Carver<T>::over(storage);
    layout(m, D, TB, mala, carve);
    take_storage = AlignedBuffer<int32_t>(whole_lines<int32_t>(TB));
    take = take_storage.data();
  }

 private:
  void layout(const Model<Engine>& m, int D, int TB, bool mala, Carver<T>& carve) {
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
    energy_net.layout(m.energy, (int)m.energy.size() - 2, TB, carve);
    generator_net.layout(m.generator, (int)m.generator.size() - 1, TB, carve);
    target = m.has_generator() ? carve.take((size_t)m.generator_outputs() * TB) : nullptr;
    generator_grad = m.has_generator() ? carve.take((size_t)m.generator_inputs() * TB) : nullptr;
    for (T** lane : {&output_sum, &output_scale, &residual_sum, &sq_norm, &clip_scale, &prior_energy,
                     &proposal_prior_energy, &forward_residual, &backward_residual})
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

template <class Engine, int NV>
class TileChain {
 public:
  using T = typename Engine::T;
  static constexpr int TB = NV * Vec<T>::kLanes;

  TileChain(const Model<Engine>& m, const Settings<T>& s, Work<Engine>& w) : m_(m), s_(s), w_(w) {}

  // All K steps of the samples [s0, s0 + nb) (nb <= TB).
  void run(int64_t s0, int nb) {
    load(s0, nb);
    State<T>& st = w_.current;
    if (s_.method == kMethodUla) {
      for (int64_t k = 0; k < s_.n_steps; ++k) {
        if (s_.noise) draw_noise(s0, nb, s_.counter + (uint64_t)k);
        if (s_.clip > T(0)) {  // the update needs the whole gradient's norm first
          evaluate(st, [](int, int) {});
          step(st.z, st.grad, st.z, 0, s_.D);
        } else {  // z is not read after the first layers: update it as the gradient rows come out of the kernel
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
    store(s0, nb);
  }

 private:
  const Model<Engine>& m_;
  const Settings<T>& s_;
  Work<Engine>& w_;

  static void clear(T* lane) {
    for (int b = 0; b < TB; ++b) lane[b] = T(0);
  }

  // z^T (and the likelihood targets) into the tile; lanes past nb are 0 (computed on, never written out). The
  // per-sample outputs start at "none yet".
  void load(int64_t s0, int nb) {
    const int D = s_.D;
    T* z = w_.current.z;
    std::memset(z, 0, sizeof(T) * (size_t)D * TB);
    std::memset(w_.noise, 0, sizeof(T) * (size_t)D * TB);
    for (int d = 0; d < D; ++d) gather_lanes<T>(s_.z_in + s0 * D + d, D, nb, z + (int64_t)d * TB);
    if (m_.has_generator()) {
      const int P = m_.generator_outputs();
      std::memset(w_.target, 0, sizeof(T) * (size_t)P * TB);
      for (int p = 0; p < P; ++p) gather_lanes<T>(s_.target + s0 * P + p, P, nb, w_.target + (int64_t)p * TB);
    }
    for (int b = 0; b < nb; ++b) s_.first_bad[s0 + b] = -1;
    if (s_.n_accepted)
      for (int b = 0; b < nb; ++b) s_.n_accepted[s0 + b] = 0;
  }

  void store(int64_t s0, int nb) {
    const int D = s_.D;
    for (int b = 0; b < nb; ++b) {
      T* __restrict dst = s_.z_out + (s0 + b) * D;
      for (int d = 0; d < D; ++d) dst[d] = w_.current.z[(int64_t)d * TB + b];
    }
  }

  // ---- Evaluation: E, grad E and its norm at a state, in named stages ----

  // Fills at.energy, at.norm and at.grad (clipped). on_rows(d0, d1) runs on each finished block of gradient rows
  // [d0, d1) while it is in L1 (after its squares went into the norms; before clipping, so only where there is
  // none): ULA's update is fused there. Both networks read z before the first gradient row is finished.
  template <typename OnRows>
  void evaluate(const State<T>& at, OnRows&& on_rows) {
    if (m_.has_generator()) likelihood_term(at.z);
    clear(w_.sq_norm);
    const int Dg = m_.generator_inputs();
    auto gradient_rows = [&](int d0, int d1) {
      T* __restrict ss = w_.sq_norm;
      for (int d = d0; d < d1; ++d) {
        T* __restrict g = at.grad + (int64_t)d * TB;
        if (d < Dg) {
          const T* __restrict gg = w_.generator_grad + (int64_t)d * TB;
          for (int b = 0; b < TB; ++b) g[b] += gg[b];
        }
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
      backward(m_.energy, w_.energy_net, at.grad, gradient_rows);
    }
    norm_and_clip(at);
  }

  // A one-layer energy E = sign * act(w . z + b) (+ the likelihood term): the network's gradient is w times a
  // per-sample factor.
  void linear_energy(const State<T>& at) {
    const Layer<Engine>& out = m_.energy[0];
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

  // The hidden layers below the top layer of `net` from x_0: x_{l+1} = act_l(W_l x_l + b_l), keeping slope_l.
  // Returns the top layer's input.
  const T* forward_below_top(const std::vector<Layer<Engine>>& net, const NetworkTile<T>& tile, const T* x0) {
    const T* x = x0;
    for (int l = 0; l < tile.top; ++l) {
      hidden_layer(net[l], x, tile.output[l], tile.slope[l]);
      x = tile.output[l];
    }
    return x;
  }

  // x_{l+1} = act(W x + b) into `out`, act'(.) into `slope` (not kept for identity layers).
  void hidden_layer(const Layer<Engine>& layer, const T* x, T* out, T* slope) {
    with_activation(layer.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      Engine::template product<NV>(layer.forward, x, out, w_.gemm, [&](int n0, int h) {
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

  // The energy network's hidden layers, then its last hidden layer (the top) fused with the scalar output layer:
  // output_sum = W_{L-1} act_{L-2}(a_{L-2}) and delta[L-2] = W_{L-1}^T * slope_{L-2}, times the output sign where
  // the output layer is linear (energy_output applies dE/da_{L-1} otherwise).
  void energy_forward(const T* z) {
    const std::vector<Layer<Engine>>& net = m_.energy;
    const NetworkTile<T>& tile = w_.energy_net;
    const T* x = forward_below_top(net, tile, z);
    const Layer<Engine>& last = net[tile.top];
    const Layer<Engine>& out = net.back();
    const T sign = out.activation == kActIdentity ? m_.sign : T(1);
    T* __restrict sum = w_.output_sum;
    clear(sum);
    T* delta = tile.delta[tile.top];
    with_activation(last.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      Engine::template product<NV>(last.forward, x, delta, w_.gemm, [&](int n0, int h) {
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

  // E = sign * act_{L-1}(a_{L-1}) from output_sum (plus the likelihood term), and output_scale = dE/da_{L-1};
  // where the output layer is not linear, the top layer's delta gets that factor now (energy_forward could not know
  // it yet).
  void energy_output(T* energy) {
    const std::vector<Layer<Engine>>& net = m_.energy;
    const Layer<Engine>& out = net.back();
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
    if (m_.has_generator()) {
      const T lambda = m_.likelihood_scale;
      const T* __restrict rs = w_.residual_sum;
      for (int b = 0; b < TB; ++b) energy[b] = energy[b] + lambda * rs[b];
    }
    if (out.activation == kActIdentity || net.size() == 1) return;
    const int top = w_.energy_net.top;
    T* delta = w_.energy_net.delta[top];
    for (int r = 0; r < net[top].n_out; ++r) {
      T* __restrict dr = delta + (int64_t)r * TB;
      for (int b = 0; b < TB; ++b) dr[b] *= scale[b];
    }
  }

  // The likelihood term lambda ||x - G(z[:Dg])||^2: the generator's hidden layers, then its output layer (the top)
  // fused with the residual r = G - x: residual_sum = ||r||^2 and delta[top] = 2 lambda r * slope; then its gradient
  // into generator_grad (added to the energy network's gradient rows by evaluate).
  void likelihood_term(const T* z) {
    const std::vector<Layer<Engine>>& net = m_.generator;
    const NetworkTile<T>& tile = w_.generator_net;
    const T* x = forward_below_top(net, tile, z);
    const Layer<Engine>& out = net[tile.top];
    const T two_lambda = m_.two_likelihood_scale;
    T* __restrict sum = w_.residual_sum;
    clear(sum);
    T* delta = tile.delta[tile.top];
    with_activation(out.activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      Engine::template product<NV>(out.forward, x, delta, w_.gemm, [&](int n0, int h) {
        for (int p = n0; p < n0 + h; ++p) {
          T* __restrict dr = delta + (int64_t)p * TB;
          const T* __restrict xr = w_.target + (int64_t)p * TB;
          const T bp = out.bias[p];
          for (int b = 0; b < TB; ++b) {
            T hv, dv;
            activation<ACT, T>(dr[b] + bp, out.param, hv, dv);
            const T r = hv - xr[b];
            sum[b] += r * r;
            dr[b] = (two_lambda * r) * dv;
          }
        }
      });
    });
    backward(net, tile, w_.generator_grad, [](int, int) {});
  }

  // From the top layer's delta: delta_{l-1} = (W_l^T delta_l) * slope_{l-1} down to delta_0, then
  // grad = W_0^T delta_0, each finished block of gradient rows [d0, d1) handed to on_rows.
  template <typename OnRows>
  void backward(const std::vector<Layer<Engine>>& net, const NetworkTile<T>& tile, T* grad, OnRows&& on_rows) {
    const T* delta = tile.delta[tile.top];
    for (int l = tile.top; l >= 1; --l) {
      T* out = tile.delta[l - 1];
      const T* slope = tile.slope[l - 1];
      Engine::template product<NV>(net[l].backward, delta, out, w_.gemm, [&](int n0, int h) {
        if (!slope) return;  // an identity layer
        T* __restrict o = out + (int64_t)n0 * TB;
        const T* __restrict sl = slope + (int64_t)n0 * TB;
        for (int i = 0; i < h * TB; ++i) o[i] *= sl[i];
      });
      delta = out;
    }
    Engine::template product<NV>(net[0].backward, delta, grad, w_.gemm, [&](int n0, int h) { on_rows(n0, n0 + h); });
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

  // ---- Noise, update, MALA, outputs ----

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

  // The current state's outputs at step k: first_bad where E or its gradient is not finite for the first time;
  // energies and gradient norms when wanted.
  void record(int64_t k, int64_t s0, int nb) {
    const T* e = w_.current.energy;
    const T* norm = w_.current.norm;
    for (int b = 0; b < nb; ++b)
      if (!(std::isfinite(e[b]) && std::isfinite(norm[b])) && s_.first_bad[s0 + b] < 0) s_.first_bad[s0 + b] = k;
    if (s_.energies) std::memcpy(s_.energies + k * s_.batch + s0, e, sizeof(T) * nb);
    if (s_.grad_norms) std::memcpy(s_.grad_norms + k * s_.batch + s0, norm, sizeof(T) * nb);
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
      if (b < nb) {  // accept where log u < log alpha and E(z') is finite (a NaN log alpha rejects)
        const T log_alpha = (cur.energy[b] + w_.prior_energy[b]) - (prop.energy[b] + w_.proposal_prior_energy[b]) -
                            (w_.backward_residual[b] - w_.forward_residual[b]) / s_.two_eps;
        take[b] = std::isfinite(prop.energy[b]) &&
                  log_acceptance_uniform<T>(s_.seed, counter, (uint64_t)(s0 + b)) < log_alpha;
        if (s_.accepted) s_.accepted[k * s_.batch + s0 + b] = (uint8_t)take[b];
        if (s_.n_accepted) s_.n_accepted[s0 + b] += take[b];
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

template <class Engine, int NV>
void run_tiles(const Model<Engine>& m, const Settings<typename Engine::T>& s, int n_threads) {
  constexpr int TB = TileChain<Engine, NV>::TB;
  const int64_t n_tiles = (s.batch + TB - 1) / TB;
  const int nt = (int)std::min<int64_t>(std::max(n_threads, 1), n_tiles);
  std::vector<Work<Engine>> works;  // allocated here: nothing inside the parallel region can throw
  works.reserve(nt);
  for (int i = 0; i < nt; ++i) works.emplace_back(m, s.D, TB, s.method == kMethodMala);
  // Tiles are handed out one at a time (all cost the same; on a shared machine a thread whose core is busy then
  // simply takes fewer).
  std::atomic<int64_t> next_tile{0};
  auto tiles = [&](int id) {
    const typename Engine::ThreadScope scope;
    TileChain<Engine, NV> chain(m, s, works[id]);
    for (int64_t t = next_tile.fetch_add(1, std::memory_order_relaxed); t < n_tiles;
         t = next_tile.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t s0 = t * TB;
      chain.run(s0, (int)std::min<int64_t>(TB, s.batch - s0));
    }
  };
  // Each thread packs its share of the weight panels and waits for the others before running tiles.
  if (nt == 1) {
    for (const auto& job : m.packing) job.run(0, 1);
    tiles(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), count = omp_get_num_threads();
    for (const auto& job : m.packing) job.run(id, count);
#pragma omp barrier
    tiles(id);
  }
#else
  for (const auto& job : m.packing) job.run(0, 1);
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

inline int vectors_per_tile(int64_t batch, int lanes, int n_threads) {
  const int64_t per_thread = (batch + n_threads - 1) / n_threads;
  return per_thread <= lanes ? 1 : kTileVectors;
}

template <class Engine, int NV>
void run_chain_tiles(const MLPChainArgs& a, int n_threads) {
  using T = typename Engine::T;
  Model<Engine> m;
  build_model<Engine, NV>(a, m);

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
  s.target = static_cast<const T*>(a.target);
  s.energies = static_cast<T*>(a.energies);
  s.grad_norms = static_cast<T*>(a.grad_norms);
  s.accepted = a.method == kMethodMala ? a.accepted : nullptr;
  s.n_accepted = a.method == kMethodMala ? a.n_accepted : nullptr;
  s.first_bad = a.first_bad;
  run_tiles<Engine, NV>(m, s, n_threads);
}

// The chain of checked arguments (check_mlp_chain_args) on `Engine`.
template <class Engine>
void run_chain(const MLPChainArgs& a) {
  const int n_threads = a.n_threads > 0 ? a.n_threads : max_threads();
  if (vectors_per_tile(a.batch, Vec<typename Engine::T>::kLanes, n_threads) == 1)
    run_chain_tiles<Engine, 1>(a, n_threads);
  else
    run_chain_tiles<Engine, kTileVectors>(a, n_threads);
}

}  // namespace chain
}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_CHAIN_H_
