// The fully fused Langevin chain of an MLP energy on the CPU (contract: fastlangevin/ops/mlp_chain.py).
//
// Layout. Samples are cut into tiles of TB = NV * (SIMD lanes) samples; each thread owns whole tiles and runs all
// K steps on one tile before the next, so the tile's state and activations (a few hundred KiB at most) stay in L1/L2
// for the whole chain. Inside a tile every array is feature-major, one row of TB samples per feature: the samples
// sit in the SIMD lanes, so per-sample quantities (energies, gradient norms, clipping scales, the MALA test) are
// plain vector arithmetic across lanes and no layer width needs padding.
//
// Layer products. Forward, a_{l+1} (N x TB) = W_l (N x K) . h_l (K x TB); backward, delta_l (K x TB) =
// W_l^T (K x N) . delta_{l+1} (N x TB). Both are C = P . X with a register-blocked micro-kernel: MR output rows x NV
// vectors of accumulators, one weight broadcast and NV vector loads per k and MR * NV FMAs. The weights are packed
// once per call into MR-row panels for both directions (shared read-only by the threads; ~0.5 MB for 100-200-200-1
// float32, so they stay in each core's L2). The activation and its derivative (forward), the derivative product
// (backward) and, for the last hidden layer, the energy (a dot product with the width-1 output layer) and the first
// delta are applied to each MR x TB block while it is in L1. Gradient norms, clipping, the prior term, the Philox
// noise (the step kernel's generator, cpu_noise.h) and the update then run over the tile's D x TB gradient.
//
// The micro-kernel uses AVX-512 (or AVX2 + FMA) intrinsics with explicit FMAs; everything else is plain loops that
// the compiler vectorises. The file is compiled with -ffp-contract=off like the step kernel, so the update rounds
// like the reference.
#include "fastlangevin/mlp_chain.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fastlangevin/cpu.h"
#include "fastlangevin/cpu_math.h"
#include "fastlangevin/cpu_noise.h"
#include "fastlangevin/langevin_step.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
namespace {

// ---- The vector type of the micro-kernel ----------------------------------------------------------------------

template <typename T>
struct Vec;

#if defined(__AVX512F__)
template <>
struct Vec<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  static FL_FORCEINLINE V zero() { return _mm512_setzero_ps(); }
  static FL_FORCEINLINE V load(const float* p) { return _mm512_load_ps(p); }
  static FL_FORCEINLINE V set1(float x) { return _mm512_set1_ps(x); }
  static FL_FORCEINLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static FL_FORCEINLINE void store(float* p, V v) { _mm512_store_ps(p, v); }
};
template <>
struct Vec<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  static FL_FORCEINLINE V zero() { return _mm512_setzero_pd(); }
  static FL_FORCEINLINE V load(const double* p) { return _mm512_load_pd(p); }
  static FL_FORCEINLINE V set1(double x) { return _mm512_set1_pd(x); }
  static FL_FORCEINLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static FL_FORCEINLINE void store(double* p, V v) { _mm512_store_pd(p, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct Vec<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static FL_FORCEINLINE V zero() { return _mm256_setzero_ps(); }
  static FL_FORCEINLINE V load(const float* p) { return _mm256_load_ps(p); }
  static FL_FORCEINLINE V set1(float x) { return _mm256_set1_ps(x); }
  static FL_FORCEINLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static FL_FORCEINLINE void store(float* p, V v) { _mm256_store_ps(p, v); }
};
template <>
struct Vec<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static FL_FORCEINLINE V zero() { return _mm256_setzero_pd(); }
  static FL_FORCEINLINE V load(const double* p) { return _mm256_load_pd(p); }
  static FL_FORCEINLINE V set1(double x) { return _mm256_set1_pd(x); }
  static FL_FORCEINLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static FL_FORCEINLINE void store(double* p, V v) { _mm256_store_pd(p, v); }
};
#else
// Portable fallback (SSE2, NEON, ...): four lanes in a struct; the compiler vectorises what it can.
template <typename T>
struct Vec {
  struct V {
    T v[4];
  };
  static constexpr int kLanes = 4;
  static FL_FORCEINLINE V zero() { return V{{T(0), T(0), T(0), T(0)}}; }
  static FL_FORCEINLINE V load(const T* p) { return V{{p[0], p[1], p[2], p[3]}}; }
  static FL_FORCEINLINE V set1(T x) { return V{{x, x, x, x}}; }
  static FL_FORCEINLINE V fma(V a, V b, V c) {
    for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static FL_FORCEINLINE void store(T* p, V v) {
    for (int i = 0; i < 4; ++i) p[i] = v.v[i];
  }
};
#endif

constexpr int kAlign = 64;  // bytes: tile rows are whole vectors, so aligned loads are always legal

// Micro-kernel rows MR for NV vectors per tile row: MR * NV accumulators, 24 of the 32 AVX-512 registers (12 of the
// 16 AVX2 ones), which leaves room for the NV loaded vectors and the broadcast weight.
#if defined(__AVX512F__)
constexpr int kMaxAccumulators = 24;
#else
constexpr int kMaxAccumulators = 12;
#endif
template <int NV>
constexpr int rows_per_block() {
  return kMaxAccumulators / NV;
}

// ---- Aligned scratch -----------------------------------------------------------------------------------------

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : n_(n) {
    if (n) p_ = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(kAlign)));
  }
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (p_) ::operator delete[](p_, std::align_val_t(kAlign));
  }
  T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Rounds a count of elements up to whole cache lines, so that every sub-array of a workspace starts aligned.
template <typename T>
size_t whole_lines(size_t n) {
  constexpr size_t per_line = kAlign / sizeof(T);
  return (n + per_line - 1) / per_line * per_line;
}

// dst[b] = src[b * stride] for b < n <= TB (a column of a row-major block into a tile row); lanes from n on are left
// as they are. AVX-512 gathers a vector at a time (the compiler leaves this strided copy scalar).
template <typename T, int TB>
FL_FORCEINLINE void gather_lanes(const T* src, int stride, int n, T* dst) {
#if defined(__AVX512F__)
  constexpr int L = Vec<T>::kLanes;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int b0 = 0; b0 < n; b0 += L) {
    const int left = n - b0;
    const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512i idx = _mm512_mullo_epi32(iota, _mm512_set1_epi32(stride));
    const T* base = src + (int64_t)b0 * stride;
    if constexpr (std::is_same<T, float>::value) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, base, 4);
      _mm512_mask_store_ps(dst + b0, m, v);
    } else {
      const __m512d v = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), (__mmask8)m, _mm512_castsi512_si256(idx), base, 8);
      _mm512_mask_store_pd(dst + b0, (__mmask8)m, v);
    }
  }
#else
  for (int b = 0; b < n; ++b) dst[b] = src[(int64_t)b * stride];
#endif
}

// ---- The micro-kernel and the blocked product ------------------------------------------------------------------

// C[r * TB + j] = sum_k P[k * MR + r] * X[k * TB + j] for r < MR, j < TB = NV * lanes: one panel of MR output rows
// (P: the packed weights of those rows, MR per k) against the whole tile.
template <typename T, int MR, int NV>
void micro_kernel(const T* __restrict P, const T* __restrict X, int K, T* __restrict C) {
  using S = Vec<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes, TB = NV * L;
  V acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  for (int k = 0; k < K; ++k) {
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = S::load(X + k * TB + v * L);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V w = S::set1(P[k * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(w, x[v], acc[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) S::store(C + r * TB + v * L, acc[r][v]);
}

template <typename T>
using KernelFn = void (*)(const T*, const T*, int, T*);

template <typename T, int NV, int... R>
constexpr std::array<KernelFn<T>, sizeof...(R)> kernel_table(std::integer_sequence<int, R...>) {
  return {{&micro_kernel<T, R + 1, NV>...}};
}

// A weight matrix packed for C = P . X: `rows` output rows in panels of `mr` rows (the last one narrower), panel n0
// holding data[n0 * cols + c * h + r] = M(n0 + r, c) with h = min(mr, rows - n0).
template <typename T>
struct Packed {
  const T* data;
  int rows, cols, mr;
};

// Panel height for `rows` output rows and micro-kernels of up to max_mr rows: the largest height in
// [2/3 max_mr, max_mr] that divides rows (200 rows: 10 panels of 20 or 20 of 10, no narrow last panel), else max_mr.
inline int panel_rows(int rows, int max_mr) {
  for (int mr = max_mr; 3 * mr >= 2 * max_mr; --mr)
    if (rows % mr == 0) return mr;
  return max_mr;
}

// C (rows x TB) = P . X (cols x TB); epilogue(n0, h) runs on each finished panel of output rows.
template <typename T, int NV, typename Epilogue>
FL_FORCEINLINE void product(const Packed<T>& p, const T* X, T* C, Epilogue&& epilogue) {
  constexpr int MR = rows_per_block<NV>();
  constexpr int TB = NV * Vec<T>::kLanes;
  static constexpr std::array<KernelFn<T>, MR> kTable = kernel_table<T, NV>(std::make_integer_sequence<int, MR>());
  for (int n0 = 0; n0 < p.rows; n0 += p.mr) {
    const int h = std::min(p.mr, p.rows - n0);
    kTable[h - 1](p.data + (int64_t)n0 * p.cols, X, p.cols, C + (int64_t)n0 * TB);
    epilogue(n0, h);
  }
}

// Packs M (rows x cols, M(r, c) = src[r * rs + c * cs]) into panels of mr rows (see Packed): the panels
// i = part, part + parts, ... of it, so that the threads can share the work.
template <typename T>
struct PackJob {
  const T* src;
  int rows, cols;
  int64_t rs, cs;
  int mr;
  T* dst;

  void run(int part, int parts) const {
    for (int n0 = part * mr; n0 < rows; n0 += parts * mr) {
      const int h = std::min(mr, rows - n0);
      T* panel = dst + (int64_t)n0 * cols;
      if (rs == 1) {  // W^T: the panel's rows are contiguous in each row of W
        for (int c = 0; c < cols; ++c) std::memcpy(panel + c * h, src + n0 + c * cs, sizeof(T) * h);
      } else {
        for (int r = 0; r < h; ++r) {
          const T* row = src + (n0 + r) * rs;
          for (int c = 0; c < cols; ++c) panel[c * h + r] = row[c * cs];
        }
      }
    }
  }
};

// ---- Activations: torch's forward and backward formulas ------------------------------------------------------

FL_FORCEINLINE float exp_t(float x) { return simd::exp_f32(x); }
FL_FORCEINLINE double exp_t(double x) { return std::exp(x); }
FL_FORCEINLINE float tanh_t(float x) { return simd::tanh_f32(x); }
FL_FORCEINLINE double tanh_t(double x) { return std::tanh(x); }
FL_FORCEINLINE float erf_t(float x) { return simd::erf_f32(x); }
FL_FORCEINLINE double erf_t(double x) { return std::erf(x); }
FL_FORCEINLINE float log1p_t(float x) { return simd::log1p_f32(x); }
FL_FORCEINLINE double log1p_t(double x) { return std::log1p(x); }

// c ? x : y. For float as bit masks: with a plain select GCC threads the comparison through the exp and log1p
// of softplus (their input is clamped on the same condition) and no longer vectorises the loop.
FL_FORCEINLINE float select_t(bool c, float x, float y) {
  const uint32_t m = 0u - (uint32_t)c;
  return simd::float_of((simd::bits_of(x) & m) | (simd::bits_of(y) & ~m));
}
FL_FORCEINLINE double select_t(bool c, double x, double y) { return c ? x : y; }

// h = act(a) and d = act'(a) (the factor torch's backward multiplies the incoming gradient by).
template <int ACT, typename T>
FL_FORCEINLINE void activation(T a, T param, T& h, T& d) {
  if constexpr (ACT == kActRelu) {
    h = a > T(0) ? a : T(0);
    d = a > T(0) ? T(1) : T(0);
  } else if constexpr (ACT == kActLeakyRelu) {
    h = a > T(0) ? a : a * param;
    d = a > T(0) ? T(1) : param;
  } else if constexpr (ACT == kActSilu) {
    const T e = exp_t(-a);
    const T s = T(1) / (T(1) + e);
    h = a / (T(1) + e);
    d = s * (T(1) + a * (T(1) - s));
  } else if constexpr (ACT == kActGelu) {
    const T cdf = T(0.5) * (T(1) + erf_t(a * T(0.70710678118654752440)));  // M_SQRT1_2
    h = a * cdf;
    d = cdf + a * (exp_t(T(-0.5) * a * a) * T(0.3989422804014327));  // M_2_SQRTPI * M_SQRT1_2 / 2
  } else if constexpr (ACT == kActGeluTanh) {
    constexpr T kBeta = T(0.7978845608028654);  // M_SQRT2 * M_2_SQRTPI / 2
    constexpr T kKappa = T(0.044715);
    const T a_sq = a * a;
    const T t = tanh_t(kBeta * (a + kKappa * (a_sq * a)));
    h = T(0.5) * a * (T(1) + t);
    d = T(0.5) * (T(1) + t) + (T(0.5) * a) * (T(1) - t * t) * (kBeta * (T(1) + T(3) * kKappa * a_sq));
  } else if constexpr (ACT == kActElu) {
    // Both sides computed, then selected: a branch-free body the compiler vectorises.
    const T neg = a > T(0) ? T(0) : a;  // keeps exp in range where its result is not used
    const T en = exp_t(neg);
    T em1;  // e^a - 1: float32 reuses its exp (within the float32 tolerance), float64 takes expm1 for accuracy
    if constexpr (std::is_same<T, float>::value)
      em1 = en - T(1);
    else
      em1 = std::expm1(neg);
    const T hn = em1 * param, dn = param * en;
    h = a > T(0) ? a : hn;
    d = a > T(0) ? T(1) : dn;
  } else if constexpr (ACT == kActSoftplus) {
    const bool linear = a > T(20);
    const T e = exp_t(std::min(a, T(20)));
    h = select_t(linear, a, log1p_t(e));
    d = select_t(linear, T(1), e / (e + T(1)));
  } else {  // tanh
    h = tanh_t(a);
    d = T(1) - h * h;
  }
}

// ---- The network, the problem and the per-thread workspace -----------------------------------------------------

template <typename T>
struct Net {
  int n_layers = 0;
  std::vector<int> dims;
  std::vector<Packed<T>> forward;   // layers 0..L-2: W_l in panels of output rows (dims[l+1] x dims[l])
  std::vector<Packed<T>> backward;  // layers 0..L-2: W_l^T in panels (dims[l] x dims[l+1])
  std::vector<const T*> bias;       // layers 0..L-1 (zeros when the network has none)
  std::vector<PackJob<T>> packing;  // what fills forward and backward (run by the threads of the chain)
  const T* w_last = nullptr;        // the output layer's weight row (dims[L-1],)
  T b_last = 0, sign = 1, param = 0;
  Buffer<T> storage;
};

// The chain's settings, in the compute type T, and its inputs and outputs.
template <typename T>
struct Problem {
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

// One thread's arrays for one tile (rows of TB samples), all cache-line aligned.
template <typename T>
struct Work {
  Buffer<T> storage;
  T *z, *g, *zp, *gp, *noise, *delta_last;  // D x TB (delta_last: dims[L-1] x TB); zp, gp: MALA's proposal
  T* noise_rows;            // the tile's noise in stream order: nb * D values from an offset < 4, whole blocks
  std::vector<T*> h, dact;  // indexed by layer l = 1..L-2 (h[l]: input of layer l, later delta_l)
  static constexpr int kLaneArrays = 10;  // per-sample arrays of TB values:
  T *e, *norm, *ep, *normp, *sum, *scale, *up, *upp, *fwd, *bwd;
  int32_t* take;
  Buffer<int32_t> take_storage;

  Work(const Net<T>& net, int TB, bool mala) {
    const int L = net.n_layers, D = net.dims[0];
    const size_t rows_d = whole_lines<T>((size_t)D * TB), lane = whole_lines<T>(TB);
    size_t total = rows_d * (mala ? 5 : 3) + whole_lines<T>((size_t)D * TB + 8) + lane * kLaneArrays;
    total += whole_lines<T>((size_t)net.dims[L - 1] * TB);
    for (int l = 1; l <= L - 2; ++l) total += 2 * whole_lines<T>((size_t)net.dims[l] * TB);
    storage = Buffer<T>(total);
    std::memset(storage.data(), 0, total * sizeof(T));
    T* p = storage.data();
    auto take_rows = [&](size_t n) {
      T* q = p;
      p += n;
      return q;
    };
    z = take_rows(rows_d);
    g = take_rows(rows_d);
    noise = take_rows(rows_d);
    zp = mala ? take_rows(rows_d) : nullptr;
    gp = mala ? take_rows(rows_d) : nullptr;
    noise_rows = take_rows(whole_lines<T>((size_t)D * TB + 8));
    delta_last = take_rows(whole_lines<T>((size_t)net.dims[L - 1] * TB));
    h.assign(std::max(L - 1, 1), nullptr);
    dact.assign(std::max(L - 1, 1), nullptr);
    for (int l = 1; l <= L - 2; ++l) {
      h[l] = take_rows(whole_lines<T>((size_t)net.dims[l] * TB));
      dact[l] = take_rows(whole_lines<T>((size_t)net.dims[l] * TB));
    }
    for (T** q : {&e, &norm, &ep, &normp, &sum, &scale, &up, &upp, &fwd, &bwd}) *q = take_rows(lane);
    take_storage = Buffer<int32_t>(whole_lines<int32_t>(TB));
    take = take_storage.data();
  }
};

// log u of MALA's acceptance uniform for `sample` at `counter` (philox.acceptance_uniforms: word x0 of the block at
// counter (sample, counter's low word, counter's high word | 2^31), u = x0 2^-32 + 2^-33 in T).
template <typename T>
T log_acceptance_uniform(uint64_t seed, uint64_t counter, uint64_t sample) {
  const uint32_t x0 = philox4x32_10((uint32_t)sample, (uint32_t)(sample >> 32), (uint32_t)counter,
                                    (uint32_t)(counter >> 32) | 0x80000000u, (uint32_t)seed, (uint32_t)(seed >> 32))
                          .x0;
  if constexpr (std::is_same<T, float>::value)
    return std::log(uniform_open0_f32(x0));
  else
    return std::log(uniform_open0_f64(x0));
}

// ---- One tile ------------------------------------------------------------------------------------------------

template <typename T, int NV, int ACT>
struct Tile {
  static constexpr int TB = NV * Vec<T>::kLanes;

  // At z (D x TB): the energies E and unclipped gradient norms (one per lane) and the clipped gradient g (D x TB).
  // on_rows(d0, d1) runs on each finished block of gradient rows [d0, d1) while it is in L1 (after its squares went
  // into the norms; before clipping, so only where there is none): ULA's update is fused there.
  template <typename OnRows>
  static void evaluate(const Net<T>& net, const Problem<T>& pb, Work<T>& w, const T* z, T* g, T* E, T* norm,
                       OnRows&& on_rows) {
    const int L = net.n_layers, D = pb.D;
    const T param = net.param, sign = net.sign;
    T* __restrict e_acc = w.sum;
    T* __restrict ss = w.scale;  // squared norms
    for (int b = 0; b < TB; ++b) e_acc[b] = ss[b] = T(0);
    auto gradient_rows = [&](int d0, int d1) {
      for (int d = d0; d < d1; ++d) {
        const T* __restrict gr = g + (int64_t)d * TB;
        for (int b = 0; b < TB; ++b) ss[b] += gr[b] * gr[b];
      }
      on_rows(d0, d1);
    };
    if (L == 1) {  // E = sign * (w . z + b): a constant gradient
      for (int d = 0; d < D; ++d) {
        const T wd = net.w_last[d], gd = sign * wd;
        const T* __restrict zr = z + (int64_t)d * TB;
        T* __restrict gr = g + (int64_t)d * TB;
        for (int b = 0; b < TB; ++b) {
          e_acc[b] += wd * zr[b];
          gr[b] = gd;
        }
      }
      gradient_rows(0, D);
    } else {
      const T* x = z;
      for (int l = 0; l + 1 < L; ++l) {
        const T* bias = net.bias[l];
        if (l + 2 < L) {  // a hidden layer feeding another one: h_{l+1} = act(a), keep act'(a)
          T* out = w.h[l + 1];
          T* dd = w.dact[l + 1];
          product<T, NV>(net.forward[l], x, out, [&](int n0, int mr) {
            for (int r = n0; r < n0 + mr; ++r) {
              T* __restrict hr = out + (int64_t)r * TB;
              T* __restrict dr = dd + (int64_t)r * TB;
              const T br = bias[r];
              for (int b = 0; b < TB; ++b) {
                T hv, dv;
                activation<ACT, T>(hr[b] + br, param, hv, dv);
                hr[b] = hv;
                dr[b] = dv;
              }
            }
          });
          x = out;
        } else {  // the last hidden layer: E += w_last . act(a), delta = sign * w_last * act'(a)
          T* out = w.delta_last;
          product<T, NV>(net.forward[l], x, out, [&](int n0, int mr) {
            for (int r = n0; r < n0 + mr; ++r) {
              T* __restrict dr = out + (int64_t)r * TB;
              const T br = bias[r], wr = net.w_last[r], gw = sign * wr;
              for (int b = 0; b < TB; ++b) {
                T hv, dv;
                activation<ACT, T>(dr[b] + br, param, hv, dv);
                e_acc[b] += wr * hv;
                dr[b] = gw * dv;
              }
            }
          });
        }
      }
      const T* delta = w.delta_last;
      for (int l = L - 2; l >= 1; --l) {  // delta_l = (W_l^T delta_{l+1}) * act'(a_l), written over h_l
        T* out = w.h[l];
        const T* dd = w.dact[l];
        product<T, NV>(net.backward[l], delta, out, [&](int n0, int mr) {
          T* __restrict o = out + (int64_t)n0 * TB;
          const T* __restrict dv = dd + (int64_t)n0 * TB;
          for (int i = 0; i < mr * TB; ++i) o[i] *= dv[i];
        });
        delta = out;
      }
      product<T, NV>(net.backward[0], delta, g, [&](int n0, int h) { gradient_rows(n0, n0 + h); });
    }
    const T b_last = net.b_last;
    for (int b = 0; b < TB; ++b) E[b] = sign * (e_acc[b] + b_last);

    // ||g|| per sample, then clipping: g *= min(1, clip / (||g|| + 1e-12)) (NaN stays NaN, like torch.clamp)
    for (int b = 0; b < TB; ++b) norm[b] = std::sqrt(ss[b]);
    if (pb.clip > T(0)) {
      T* __restrict s = w.scale;
      for (int b = 0; b < TB; ++b) {
        const T c = pb.clip / (norm[b] + T(1e-12));
        s[b] = c > T(1) ? T(1) : c;
      }
      for (int d = 0; d < D; ++d) {
        T* __restrict gr = g + (int64_t)d * TB;
        for (int b = 0; b < TB; ++b) gr[b] = gr[b] * s[b];
      }
    }
  }

  // The step noise of the tile's samples [s0, s0 + nb) at `counter`, transposed into w.noise (D x TB; the lanes
  // past nb stay 0). Elements s0 * D .. (s0 + nb) * D - 1 of the stream are contiguous: whole Philox blocks are drawn
  // from the one containing element s0 * D.
  static void draw_noise(const Problem<T>& pb, Work<T>& w, int64_t s0, int nb, uint64_t counter) {
    const int D = pb.D;
    const int64_t e0 = s0 * D, j0 = e0 / 4;
    const int offset = (int)(e0 - 4 * j0);
    const int64_t n_blocks = (offset + (int64_t)nb * D + 3) / 4;
    T* rows = w.noise_rows;
    for (int64_t j = 0; j < n_blocks; j += simd::kTileBlocks)
      simd::tile_noise((uint64_t)(j0 + j), (int)std::min<int64_t>(simd::kTileBlocks, n_blocks - j), pb.seed, counter,
                       rows + 4 * j);
    const T* src = rows + offset;
    for (int d = 0; d < D; ++d) gather_lanes<T, TB>(src + d, D, nb, w.noise + (int64_t)d * TB);
  }

  // out = z - (eps/2)(g + prior_term(z)) [+ sigma * noise] on rows [d0, d1), as langevin_step_reference rounds it.
  template <int kPrior, bool kNoise>
  static void update(const Problem<T>& pb, const T* z, const T* g, const T* noise, T* out, int d0, int d1) {
    const T half = pb.half_step, sigma = pb.sigma;
    for (int d = d0; d < d1; ++d) {
      const T m = kPrior == kPriorDiagonal ? pb.mean[d] : T(0);
      const T iv = kPrior == kPriorDiagonal ? pb.inv_var[d] : T(0);
      const T* zr = z + (int64_t)d * TB;
      const T* __restrict gr = g + (int64_t)d * TB;
      const T* __restrict nr = noise + (int64_t)d * TB;
      T* orow = out + (int64_t)d * TB;
      for (int b = 0; b < TB; ++b) {
        T v = langevin_update<T>(kPrior, zr[b], gr[b], m, iv, half);
        if (kNoise) v = langevin_add_noise<T>(v, sigma, nr[b]);
        orow[b] = v;
      }
    }
  }

  static void step(const Problem<T>& pb, const T* z, const T* g, const T* noise, T* out, int d0, int d1) {
    switch (pb.prior_kind * 2 + (pb.noise ? 1 : 0)) {
      case kPriorFlat * 2: update<kPriorFlat, false>(pb, z, g, noise, out, d0, d1); break;
      case kPriorFlat * 2 + 1: update<kPriorFlat, true>(pb, z, g, noise, out, d0, d1); break;
      case kPriorNormal * 2: update<kPriorNormal, false>(pb, z, g, noise, out, d0, d1); break;
      case kPriorNormal * 2 + 1: update<kPriorNormal, true>(pb, z, g, noise, out, d0, d1); break;
      case kPriorDiagonal * 2: update<kPriorDiagonal, false>(pb, z, g, noise, out, d0, d1); break;
      default: update<kPriorDiagonal, true>(pb, z, g, noise, out, d0, d1); break;
    }
  }

  // MALA's per-sample sums (sampler._mala_accept): prior energies U_prior(z), U_prior(z'), and the squared norms
  // of the forward (z -> z') and backward (z' -> z) proposal residuals.
  template <int kPrior>
  static void mala_sums(const Problem<T>& pb, Work<T>& w) {
    const T half = pb.half_step;
    T* __restrict up = w.up;
    T* __restrict upp = w.upp;
    T* __restrict fw = w.fwd;
    T* __restrict bw = w.bwd;
    for (int b = 0; b < TB; ++b) up[b] = upp[b] = fw[b] = bw[b] = T(0);
    for (int d = 0; d < pb.D; ++d) {
      const T m = kPrior == kPriorDiagonal ? pb.mean[d] : T(0);
      const T iv = kPrior == kPriorDiagonal ? pb.inv_var[d] : T(0);
      const int64_t o = (int64_t)d * TB;
      const T* __restrict z = w.z + o;
      const T* __restrict zp = w.zp + o;
      const T* __restrict g = w.g + o;
      const T* __restrict gp = w.gp + o;
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

  static void record(const Problem<T>& pb, int64_t k, int64_t s0, int nb, const T* E, const T* norm) {
    if (pb.energies) std::memcpy(pb.energies + k * pb.batch + s0, E, sizeof(T) * nb);
    if (pb.grad_norms) std::memcpy(pb.grad_norms + k * pb.batch + s0, norm, sizeof(T) * nb);
  }

  // One MALA step from the state (w.z, w.g, w.e, w.norm): proposal, its energy and gradient, the Metropolis test,
  // and the accepted values kept per sample.
  static void mala_step(const Net<T>& net, const Problem<T>& pb, Work<T>& w, int64_t k, int64_t s0, int nb) {
    const uint64_t counter = pb.counter + (uint64_t)k;
    if (pb.noise) draw_noise(pb, w, s0, nb, counter);
    step(pb, w.z, w.g, w.noise, w.zp, 0, pb.D);
    evaluate(net, pb, w, w.zp, w.gp, w.ep, w.normp, [](int, int) {});
    switch (pb.prior_kind) {
      case kPriorFlat: mala_sums<kPriorFlat>(pb, w); break;
      case kPriorNormal: mala_sums<kPriorNormal>(pb, w); break;
      default: mala_sums<kPriorDiagonal>(pb, w); break;
    }
    int32_t* __restrict take = w.take;
    for (int b = 0; b < TB; ++b) {
      take[b] = 0;
      if (b < nb) {  // accept where log u < log alpha (a NaN log alpha rejects)
        const T log_alpha = (w.e[b] + w.up[b]) - (w.ep[b] + w.upp[b]) - (w.bwd[b] - w.fwd[b]) / pb.two_eps;
        take[b] = log_acceptance_uniform<T>(pb.seed, counter, (uint64_t)(s0 + b)) < log_alpha ? 1 : 0;
        if (pb.accepted) pb.accepted[k * pb.batch + s0 + b] = (uint8_t)take[b];
      }
    }
    for (int d = 0; d < pb.D; ++d) {
      const int64_t o = (int64_t)d * TB;
      T* __restrict z = w.z + o;
      T* __restrict g = w.g + o;
      const T* __restrict zp = w.zp + o;
      const T* __restrict gp = w.gp + o;
      for (int b = 0; b < TB; ++b) {
        z[b] = take[b] ? zp[b] : z[b];
        g[b] = take[b] ? gp[b] : g[b];
      }
    }
    for (int b = 0; b < TB; ++b) {
      w.e[b] = take[b] ? w.ep[b] : w.e[b];
      w.norm[b] = take[b] ? w.normp[b] : w.norm[b];
    }
  }

  // All K steps of the samples [s0, s0 + nb) (nb <= TB).
  static void run(const Net<T>& net, const Problem<T>& pb, Work<T>& w, int64_t s0, int nb) {
    const int D = pb.D;
    // z^T into the tile; lanes past nb are 0 (they are computed on but never written out)
    std::memset(w.z, 0, sizeof(T) * (size_t)D * TB);
    std::memset(w.noise, 0, sizeof(T) * (size_t)D * TB);
    for (int b = 0; b < nb; ++b) {
      const T* __restrict src = pb.z_in + (s0 + b) * D;
      for (int d = 0; d < D; ++d) w.z[(int64_t)d * TB + b] = src[d];
    }
    if (pb.method == kMethodUla) {
      for (int64_t k = 0; k < pb.n_steps; ++k) {
        if (pb.noise) draw_noise(pb, w, s0, nb, pb.counter + (uint64_t)k);
        if (pb.clip > T(0)) {  // the update needs the whole gradient's norm first
          evaluate(net, pb, w, w.z, w.g, w.e, w.norm, [](int, int) {});
          step(pb, w.z, w.g, w.noise, w.z, 0, D);
        } else {  // z is not read after the first layer: update it as the gradient rows come out of the kernel
          evaluate(net, pb, w, w.z, w.g, w.e, w.norm,
                   [&](int d0, int d1) { step(pb, w.z, w.g, w.noise, w.z, d0, d1); });
        }
        record(pb, k, s0, nb, w.e, w.norm);
      }
    } else {
      evaluate(net, pb, w, w.z, w.g, w.e, w.norm, [](int, int) {});
      for (int64_t k = 0; k < pb.n_steps; ++k) {
        record(pb, k, s0, nb, w.e, w.norm);
        mala_step(net, pb, w, k, s0, nb);
      }
    }
    for (int b = 0; b < nb; ++b) {
      T* __restrict dst = pb.z_out + (s0 + b) * D;
      for (int d = 0; d < D; ++d) dst[d] = w.z[(int64_t)d * TB + b];
    }
  }
};

// ---- Driver --------------------------------------------------------------------------------------------------

template <typename T, int NV, int ACT>
void run_tiles(const Net<T>& net, const Problem<T>& pb, int n_threads) {
  constexpr int TB = Tile<T, NV, ACT>::TB;
  const int64_t n_tiles = (pb.batch + TB - 1) / TB;
  const int nt = (int)std::min<int64_t>(std::max(n_threads, 1), n_tiles);
  std::vector<Work<T>> works;  // allocated here: nothing inside the parallel region can throw
  works.reserve(nt);
  for (int i = 0; i < nt; ++i) works.emplace_back(net, TB, pb.method == kMethodMala);
  // Tiles are handed out one at a time (all cost the same; on a shared machine a thread whose core is busy then
  // simply takes fewer).
  std::atomic<int64_t> next_tile{0};
  auto tiles = [&](int id) {
    for (int64_t t = next_tile.fetch_add(1, std::memory_order_relaxed); t < n_tiles;
         t = next_tile.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t s0 = t * TB;
      Tile<T, NV, ACT>::run(net, pb, works[id], s0, (int)std::min<int64_t>(TB, pb.batch - s0));
    }
  };
  // Each thread packs its share of the weight panels and waits for the others before running tiles.
  if (nt == 1) {
    for (const PackJob<T>& job : net.packing) job.run(0, 1);
    tiles(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), count = omp_get_num_threads();
    for (const PackJob<T>& job : net.packing) job.run(id, count);
#pragma omp barrier
    tiles(id);
  }
#else
  for (const PackJob<T>& job : net.packing) job.run(0, 1);
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int id = 1; id < nt; ++id) pool.emplace_back([&, id] { tiles(id); });
  tiles(0);
  for (auto& t : pool) t.join();
#endif
}

template <typename T, int NV>
void dispatch_activation(const Net<T>& net, const Problem<T>& pb, int act, int n_threads) {
  switch (act) {
    case kActRelu: run_tiles<T, NV, kActRelu>(net, pb, n_threads); break;
    case kActLeakyRelu: run_tiles<T, NV, kActLeakyRelu>(net, pb, n_threads); break;
    case kActSilu: run_tiles<T, NV, kActSilu>(net, pb, n_threads); break;
    case kActGelu: run_tiles<T, NV, kActGelu>(net, pb, n_threads); break;
    case kActGeluTanh: run_tiles<T, NV, kActGeluTanh>(net, pb, n_threads); break;
    case kActElu: run_tiles<T, NV, kActElu>(net, pb, n_threads); break;
    case kActSoftplus: run_tiles<T, NV, kActSoftplus>(net, pb, n_threads); break;
    default: run_tiles<T, NV, kActTanh>(net, pb, n_threads); break;
  }
}

// Vectors per tile: two (32 float32 samples with AVX-512: the tile's activations, 200 x 32 x 4 bytes per layer, stay
// in L1 while each weight panel streams from L2; the micro-kernel runs at the FMA peak), or one when a thread's
// share of the batch fits in one vector (small batches then still use every thread).
constexpr int kTileVectors = 2;

int vectors_per_tile(int64_t batch, int lanes, int n_threads) {
  const int64_t per_thread = (batch + n_threads - 1) / n_threads;
  return per_thread <= lanes ? 1 : kTileVectors;
}

template <typename T>
void chain_typed(const MLPChainArgs& a) {
  const int L = (int)a.dims.size() - 1;
  int n_threads = a.n_threads > 0 ? a.n_threads : max_threads();
  const int nv = vectors_per_tile(a.batch, Vec<T>::kLanes, n_threads);
  const int MR = nv == 1 ? rows_per_block<1>() : rows_per_block<kTileVectors>();

  Net<T> net;
  net.n_layers = L;
  net.dims.assign(a.dims.begin(), a.dims.end());
  net.sign = (T)a.output_sign;
  net.param = (T)a.activation_param;
  size_t total = 0;
  for (int l = 0; l + 1 < L; ++l) total += 2 * whole_lines<T>((size_t)a.dims[l] * a.dims[l + 1]);
  for (int l = 0; l < L; ++l) total += whole_lines<T>((size_t)a.dims[l + 1]);  // zero biases when there are none
  net.storage = Buffer<T>(total);
  T* p = net.storage.data();
  for (int l = 0; l + 1 < L; ++l) {
    const T* W = static_cast<const T*>(a.weights[l]);
    const int n_out = (int)a.dims[l + 1], n_in = (int)a.dims[l];
    const int mr_out = panel_rows(n_out, MR), mr_in = panel_rows(n_in, MR);
    net.packing.push_back({W, n_out, n_in, n_in, 1, mr_out, p});
    net.forward.push_back({p, n_out, n_in, mr_out});
    p += whole_lines<T>((size_t)n_out * n_in);
    net.packing.push_back({W, n_in, n_out, 1, n_in, mr_in, p});
    net.backward.push_back({p, n_in, n_out, mr_in});
    p += whole_lines<T>((size_t)n_out * n_in);
  }
  for (int l = 0; l < L; ++l) {
    if (a.biases.empty()) {
      std::fill(p, p + a.dims[l + 1], T(0));
      net.bias.push_back(p);
      p += whole_lines<T>((size_t)a.dims[l + 1]);
    } else {
      net.bias.push_back(static_cast<const T*>(a.biases[l]));
    }
  }
  net.w_last = static_cast<const T*>(a.weights[L - 1]);
  net.b_last = net.bias[L - 1][0];

  Problem<T> pb;
  pb.z_in = static_cast<const T*>(a.z);
  pb.z_out = static_cast<T*>(a.z);
  pb.batch = a.batch;
  pb.D = (int)a.dims[0];
  pb.n_steps = a.n_steps;
  pb.method = a.method;
  pb.prior_kind = a.prior_kind;
  pb.noise = a.noise_scale != 0.0;
  // The reference multiplies by the Python floats step_size / 2 and noise_scale and divides by 2 * step_size,
  // which torch rounds to T first.
  pb.half_step = (T)(a.step_size / 2);
  pb.sigma = (T)a.noise_scale;
  pb.two_eps = (T)(2 * a.step_size);
  pb.clip = (T)(a.clip_grad > 0 ? a.clip_grad : 0.0);
  pb.mean = static_cast<const T*>(a.mean);
  pb.inv_var = static_cast<const T*>(a.inv_var);
  pb.seed = a.rng_state ? (uint64_t)a.rng_state[0] : 0;
  pb.counter = a.rng_state ? (uint64_t)a.rng_state[1] : 0;
  pb.energies = static_cast<T*>(a.energies);
  pb.grad_norms = static_cast<T*>(a.grad_norms);
  pb.accepted = a.method == kMethodMala ? a.accepted : nullptr;

  if (nv == 1)
    dispatch_activation<T, 1>(net, pb, a.activation, n_threads);
  else
    dispatch_activation<T, kTileVectors>(net, pb, a.activation, n_threads);
}

}  // namespace

void check_mlp_chain_args(const MLPChainArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("mlp_chain: " + what); };
  if (a.dtype != kFloat32 && a.dtype != kFloat64)
    fail("dtype must be 0 (float32) or 1 (float64), got " + std::to_string(a.dtype) +
         "; compute float16/bfloat16 in float32 and cast");
  if (a.batch < 0) fail("batch must be >= 0, got " + std::to_string(a.batch));
  if (a.n_steps < 0) fail("n_steps must be >= 0, got " + std::to_string(a.n_steps));
  if (a.dims.size() < 2) fail("dims must be (D, H_1, ..., 1) with at least 2 sizes, got " +
                              std::to_string(a.dims.size()));
  for (size_t i = 0; i < a.dims.size(); ++i)
    if (a.dims[i] < 1 || a.dims[i] > (1 << 20))
      fail("dims[" + std::to_string(i) + "] must be in [1, 2^20], got " + std::to_string(a.dims[i]));
  if (a.dims.back() != 1) fail("the last size of dims must be 1 (a scalar energy), got " +
                               std::to_string(a.dims.back()));
  const size_t L = a.dims.size() - 1;
  if (a.weights.size() != L)
    fail("weight_ptrs must have " + std::to_string(L) + " entries (one per layer), got " +
         std::to_string(a.weights.size()));
  if (!a.biases.empty() && a.biases.size() != L)
    fail("bias_ptrs must be empty or have " + std::to_string(L) + " entries, got " + std::to_string(a.biases.size()));
  for (size_t l = 0; l < L; ++l) {
    if (!a.weights[l]) fail("weight_ptrs[" + std::to_string(l) + "] is 0");
    if (!a.biases.empty() && !a.biases[l]) fail("bias_ptrs[" + std::to_string(l) + "] is 0");
  }
  if (a.activation < kActRelu || a.activation > kActTanh)
    fail("activation must be a code of fastlangevin.energies.ACTIVATIONS (0..7), got " +
         std::to_string(a.activation));
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
  if (a.batch > 0 && a.dims[0] > std::numeric_limits<int64_t>::max() / a.batch)
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
