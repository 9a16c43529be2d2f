// The fused Langevin step on the CPU: float32 and float64, threaded over tiles, vectorised by the compiler.
//
// On 2 cores the op is bound by Box-Muller's transcendental functions, not by memory. So the float32 path uses its
// own branch-free logf and sincosf (Cephes polynomials, a few ulp over the ranges Box-Muller feeds them), written as
// plain loops over small arrays that GCC and Clang auto-vectorise; only Philox's 32x32->64-bit multiplies get
// AVX-512/AVX2 intrinsics (the plain loop stays as the fallback). Work is cut into tiles of kTileBlocks Philox
// blocks: Philox into arrays, Box-Muller over arrays, then the update, all in L1. The noise tile and the float32
// functions live in cpu_noise.h and cpu_math.h, shared with the fused MLP chain (mlp_chain.cpp).
//
// The file must be compiled with -ffp-contract=off (CMakeLists.txt does): the update rounds its multiply and add
// separately, like the reference; the polynomials use explicit FMAs where the target has them.
#include "fastlangevin/cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fastlangevin/cpu_noise.h"
#include "fastlangevin/langevin_step.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
namespace {

using simd::kTileBlocks;  // Philox blocks per tile
using simd::tile_noise;
constexpr int kTile = 4 * kTileBlocks;           // elements per tile
constexpr int64_t kParallelThreshold = 1 << 15;  // below this, thread start-up costs more than it saves

// Runs fn(first_tile, last_tile) over [0, n_tiles) on n_threads threads (static partition).
template <typename Fn>
void parallel_tiles(int64_t n_tiles, int n_threads, Fn&& fn) {
  if (n_threads <= 1 || n_tiles <= 1) {
    fn((int64_t)0, n_tiles);
    return;
  }
  const int nt = (int)std::min<int64_t>(n_threads, n_tiles);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int64_t id = omp_get_thread_num(), count = omp_get_num_threads();
    fn(n_tiles * id / count, n_tiles * (id + 1) / count);
  }
#else
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int id = 1; id < nt; ++id) pool.emplace_back([&, id] { fn(n_tiles * id / nt, n_tiles * (id + 1) / nt); });
  fn((int64_t)0, n_tiles / nt);
  for (auto& t : pool) t.join();
#endif
}

int effective_threads(int64_t n, int n_threads) {
  if (n < kParallelThreshold) return 1;
  if (n_threads <= 0) return max_threads();
  return n_threads;
}

template <typename T>
void noise_impl(T* out, int64_t n, const int64_t* rng_state, int n_threads) {
  const uint64_t seed = (uint64_t)rng_state[0], counter = (uint64_t)rng_state[1];
  const int64_t n_tiles = (n + kTile - 1) / kTile;
  parallel_tiles(n_tiles, effective_threads(n, n_threads), [&](int64_t first, int64_t last) {
    alignas(64) T noise[kTile];
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t i0 = tile * kTile;
      const int len = (int)std::min<int64_t>(kTile, n - i0);
      tile_noise((uint64_t)(i0 / 4), (len + 3) / 4, seed, counter, noise);
      std::memcpy(out + i0, noise, sizeof(T) * len);
    }
  });
}

// Copies the per-feature values of elements [i0, i0 + len) (feature = index % D) into dst: contiguous runs for
// wide features, an element loop for narrow ones (D = 1 would otherwise be one memcpy per element).
template <typename T>
void gather_features(const T* src, int64_t D, int64_t i0, int len, T* dst) {
  int64_t f = i0 % D;
  if (D < 32) {
    for (int k = 0; k < len; ++k) {
      dst[k] = src[f];
      f = f + 1 == D ? 0 : f + 1;
    }
    return;
  }
  int k = 0;
  while (k < len) {
    const int run = (int)std::min<int64_t>(len - k, D - f);
    std::memcpy(dst + k, src + f, sizeof(T) * run);
    k += run;
    f = 0;
  }
}

// One tile of the update; `buf` holds the noise on entry (when kNoise) and the result on exit. Templated on the
// prior kind so that each loop body is branch-free and vectorises.
template <int kPrior, bool kNoise, typename T>
FL_FORCEINLINE void tile_update(const T* z, const T* grad, const T* mean, const T* inv_var, T half_step, T sigma,
                                int len, T* buf) {
  for (int i = 0; i < len; ++i) {
    const T m = kPrior == kPriorDiagonal ? mean[i] : T(0);
    const T iv = kPrior == kPriorDiagonal ? inv_var[i] : T(0);
    T v = langevin_update<T>(kPrior, z[i], grad[i], m, iv, half_step);
    if (kNoise) v = langevin_add_noise<T>(v, sigma, buf[i]);
    buf[i] = v;
  }
}

template <int kPrior, bool kNoise, typename T>
void step_impl(const T* z, const T* grad, T* out, int64_t n, int64_t D, const T* mean, const T* inv_var,
               const int64_t* rng_state, T half_step, T sigma, int n_threads) {
  const uint64_t seed = kNoise ? (uint64_t)rng_state[0] : 0, counter = kNoise ? (uint64_t)rng_state[1] : 0;
  const int64_t n_tiles = (n + kTile - 1) / kTile;
  parallel_tiles(n_tiles, effective_threads(n, n_threads), [&](int64_t first, int64_t last) {
    alignas(64) T buf[kTile];
    alignas(64) T tile_mean[kPrior == kPriorDiagonal ? kTile : 1];
    alignas(64) T tile_inv_var[kPrior == kPriorDiagonal ? kTile : 1];
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t i0 = tile * kTile;
      const int len = (int)std::min<int64_t>(kTile, n - i0);
      if (kNoise) tile_noise((uint64_t)(i0 / 4), (len + 3) / 4, seed, counter, buf);
      if (kPrior == kPriorDiagonal) {
        gather_features(mean, D, i0, len, tile_mean);
        gather_features(inv_var, D, i0, len, tile_inv_var);
      }
      // Result into buf (a local array the inputs cannot alias), then copied out: out may be z or grad.
      tile_update<kPrior, kNoise>(z + i0, grad + i0, tile_mean, tile_inv_var, half_step, sigma, len, buf);
      std::memcpy(out + i0, buf, sizeof(T) * len);
    }
  });
}

template <typename T>
void step_dispatch(const T* z, const T* grad, T* out, int64_t n, int64_t D, int prior_kind, const T* mean,
                   const T* inv_var, const int64_t* rng_state, double step_size, double noise_scale,
                   int n_threads) {
  // The reference multiplies by the Python floats step_size / 2 and noise_scale, which torch rounds to T first.
  const T half_step = (T)(step_size / 2), sigma = (T)noise_scale;
  const bool noise = noise_scale != 0.0;
#define FL_STEP(K, N) step_impl<K, N, T>(z, grad, out, n, D, mean, inv_var, rng_state, half_step, sigma, n_threads)
  switch (prior_kind) {
    case kPriorFlat: noise ? FL_STEP(kPriorFlat, true) : FL_STEP(kPriorFlat, false); break;
    case kPriorNormal: noise ? FL_STEP(kPriorNormal, true) : FL_STEP(kPriorNormal, false); break;
    case kPriorDiagonal: noise ? FL_STEP(kPriorDiagonal, true) : FL_STEP(kPriorDiagonal, false); break;
  }
#undef FL_STEP
}

}  // namespace

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)hc : 1;
#endif
}

void check_step_args(int64_t n, int64_t D, int prior_kind, const void* mean, const void* inv_var,
                     const void* rng_state, double noise_scale) {
  if (n < 0) throw std::invalid_argument("langevin_step: n must be >= 0, got " + std::to_string(n));
  if (prior_kind < kPriorFlat || prior_kind > kPriorDiagonal)
    throw std::invalid_argument("langevin_step: prior_kind must be 0 (flat), 1 (normal) or 2 (diagonal), got " +
                                std::to_string(prior_kind));
  if (prior_kind == kPriorDiagonal) {
    if (D <= 0) throw std::invalid_argument("langevin_step: D must be >= 1 for the diagonal prior, got " +
                                            std::to_string(D));
    if (!mean || !inv_var)
      throw std::invalid_argument("langevin_step: the diagonal prior (prior_kind=2) needs mean_ptr and inv_var_ptr");
  }
  if (noise_scale != 0.0 && !rng_state)
    throw std::invalid_argument("langevin_step: noise_scale != 0 needs rng_state_ptr");
}

void langevin_step_f32(const float* z, const float* grad, float* out, int64_t n, int64_t D, int prior_kind,
                       const float* mean, const float* inv_var, const int64_t* rng_state, double step_size,
                       double noise_scale, int n_threads) {
  if (n == 0) return;
  step_dispatch<float>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size, noise_scale, n_threads);
}

void langevin_step_f64(const double* z, const double* grad, double* out, int64_t n, int64_t D, int prior_kind,
                       const double* mean, const double* inv_var, const int64_t* rng_state, double step_size,
                       double noise_scale, int n_threads) {
  if (n == 0) return;
  step_dispatch<double>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size, noise_scale, n_threads);
}

void normal_noise_f32(float* out, int64_t n, const int64_t* rng_state, int n_threads) {
  if (n > 0) noise_impl(out, n, rng_state, n_threads);
}

void normal_noise_f64(double* out, int64_t n, const int64_t* rng_state, int n_threads) {
  if (n > 0) noise_impl(out, n, rng_state, n_threads);
}

int simd_width_bits() {
#if defined(__AVX512F__)
  return 512;  // CMakeLists.txt adds -mprefer-vector-width=512 where AVX-512 is enabled
#elif defined(__AVX__)
  return 256;
#elif defined(__SSE2__) || defined(__ARM_NEON) || defined(__aarch64__)
  return 128;
#else
  return 0;
#endif
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace fastlangevin
