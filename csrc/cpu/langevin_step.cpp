// The fused Langevin step on the CPU: float32 and float64, threaded over tiles, vectorised by the compiler.
//
// On 2 cores the op is bound by Box-Muller's transcendental functions, not by memory. So the float32 path uses its
// own branch-free logf and sincosf (Cephes polynomials, a few ulp over the ranges Box-Muller feeds them), written as
// plain loops over small arrays that GCC and Clang auto-vectorise; only Philox's 32x32->64-bit multiplies get
// AVX-512/AVX2 intrinsics (the plain loop stays as the fallback). Work is cut into tiles of kTileBlocks Philox
// blocks: Philox into arrays, Box-Muller over arrays, then the update, all in L1.
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
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fastlangevin/langevin_step.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
namespace {

constexpr int kTileBlocks = 64;              // Philox blocks per tile
constexpr int kTile = 4 * kTileBlocks;       // elements per tile
constexpr int64_t kParallelThreshold = 1 << 15;  // below this, thread start-up costs more than it saves

#if defined(__FMA__) || defined(__aarch64__)
FL_FORCEINLINE float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
FL_FORCEINLINE float fmadd(float a, float b, float c) { return a * b + c; }
#endif

FL_FORCEINLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
FL_FORCEINLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Natural log of a positive, normal, finite float (u in [2^-33, 1] here). Cephes logf without branches:
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log x = log1p(m - 1) + e log 2 (log 2 split in two parts).
FL_FORCEINLINE float log_f32(float x) {
  // Integer selects only: a float compare keeps GCC from if-converting the loop without AVX-512 masks.
  const uint32_t ix = bits_of(x);
  const uint32_t mant = ix & 0x007fffffu;
  const uint32_t small = mant < 0x003504f3u ? 1u : 0u;  // m = 0.5 * (1 + mant 2^-23) < sqrt(1/2): use 2m, e - 1
  const int32_t e = (int32_t)(ix >> 23) - 126 - (int32_t)small;
  const float m = float_of(mant | (0x3f000000u + (small << 23))) - 1.0f;  // m in [sqrt(1/2), sqrt(2)), minus 1
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = fmadd(y, m, -1.1514610310e-1f);
  y = fmadd(y, m, 1.1676998740e-1f);
  y = fmadd(y, m, -1.2420140846e-1f);
  y = fmadd(y, m, 1.4249322787e-1f);
  y = fmadd(y, m, -1.6668057665e-1f);
  y = fmadd(y, m, 2.0000714765e-1f);
  y = fmadd(y, m, -2.4999993993e-1f);
  y = fmadd(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = (float)e;
  y = fmadd(fe, -2.12194440e-4f, y);
  y = fmadd(-0.5f, z, y);
  return fmadd(fe, 0.693359375f, m + y);
}

// sin and cos of theta in [0, 2pi] (Cephes sinf/cosf without branches). k = nearest multiple of pi/2, reduced
// argument r = theta - k pi/2 in [-pi/4, pi/4], then the quadrant k mod 4 picks which polynomial goes where and the
// signs. The reduction matters near the zeros (theta the float nearest 3pi/2 leaves r ~ 1e-8): pi/2 is split in
// three floats, the first two of 21 bits so that k * part is exact for k <= 4 and theta - k * P1 is exact; r is then
// within ~1 ulp of its own size (Cephes' split, made for k up to 8192, loses up to ~12 ulp there).
FL_FORCEINLINE void sincos_f32(float theta, float* s_out, float* c_out) {
  const int32_t k = (int32_t)fmadd(theta, 0.636619772367581343f, 0.5f);  // theta >= 0: truncation rounds
  const float fk = (float)k;
  float r = theta - fk * 0x1.921fb0p+0f;
  r = r - fk * 0x1.5110b0p-22f;
  r = r - fk * 0x1.184698p-44f;
  const float z = r * r;
  float sp = -1.9515295891e-4f;
  sp = fmadd(sp, z, 8.3321608736e-3f);
  sp = fmadd(sp, z, -1.6666654611e-1f);
  sp = fmadd(sp * z, r, r);
  float cp = 2.443315711809948e-5f;
  cp = fmadd(cp, z, -1.388731625493765e-3f);
  cp = fmadd(cp, z, 4.166664568298827e-2f);
  cp = fmadd(cp * z, z, fmadd(-0.5f, z, 1.0f));
  // Odd quadrants swap the polynomials (bit masks, not a float select, so that every SIMD ISA if-converts it).
  const uint32_t swap = 0u - ((uint32_t)k & 1u);
  const uint32_t s_sign = ((uint32_t)k & 2u) << 30;        // quadrants 2, 3: sin < 0
  const uint32_t c_sign = ((uint32_t)(k + 1) & 2u) << 30;  // quadrants 1, 2: cos < 0
  const uint32_t sb = bits_of(sp), cb = bits_of(cp);
  *s_out = float_of(((sb & ~swap) | (cb & swap)) ^ s_sign);
  *c_out = float_of(((cb & ~swap) | (sb & swap)) ^ c_sign);
}

// Philox words of blocks block0 .. block0 + n_blocks - 1 in pair order: pair p of the tile is (x0, x1) of block p/2
// for even p and (x2, x3) for odd p, stored as xa[p] (feeds u) and xb[p] (feeds theta).
//
// The plain loop is the definition (and the fallback); GCC vectorises it, but its 32x32->64-bit multiplies come out
// as widen + 64-bit multiply, so with AVX-512 or AVX2 the blocks go 16 or 8 at a time through pmuludq instead (about
// 2x faster, and Philox is half of the float32 noise cost).
void philox_tile_scalar(uint64_t block0, int first, int n_blocks, uint64_t seed, uint64_t counter, uint32_t* xa,
                        uint32_t* xb) {
  // The 64-bit block index as two 32-bit words, so that the loop vectorises in 32-bit lanes.
  const uint32_t j_lo = (uint32_t)block0, j_hi = (uint32_t)(block0 >> 32);
  const uint32_t s_lo = (uint32_t)seed, s_hi = (uint32_t)(seed >> 32);
  const uint32_t c_lo = (uint32_t)counter, c_hi = (uint32_t)(counter >> 32);
  for (int t = first; t < n_blocks; ++t) {
    const uint32_t c0 = j_lo + (uint32_t)t;
    const uint32_t c1 = j_hi + (c0 < j_lo ? 1u : 0u);
    const Philox4 p = philox4x32_10(c0, c1, c_lo, c_hi, s_lo, s_hi);
    xa[2 * t] = p.x0;
    xa[2 * t + 1] = p.x2;
    xb[2 * t] = p.x1;
    xb[2 * t + 1] = p.x3;
  }
}

#if defined(__AVX512F__)
constexpr int kSimdBlocks = 16;
using VecU32 = __m512i;
FL_FORCEINLINE VecU32 vset1(uint32_t x) { return _mm512_set1_epi32((int)x); }
FL_FORCEINLINE VecU32 vxor3(VecU32 a, VecU32 b, VecU32 c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
// hi and lo words of a * m for each 32-bit lane (m broadcast): even lanes from one pmuludq, odd lanes from another,
// merged by masked in-lane shuffles (one op each; _MM_PERM_DDBB moves dwords 1, 3 down, _MM_PERM_CCAA 0, 2 up).
FL_FORCEINLINE void vmulhilo(VecU32 a, VecU32 m, VecU32* hi, VecU32* lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), m);
  *hi = _mm512_mask_shuffle_epi32(po, 0x5555, pe, _MM_PERM_DDBB);
  *lo = _mm512_mask_shuffle_epi32(pe, 0xAAAA, po, _MM_PERM_CCAA);
}
FL_FORCEINLINE VecU32 vcounter(uint32_t base) {
  return _mm512_add_epi32(_mm512_set1_epi32((int)base),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
// dst[2i] = a[i], dst[2i + 1] = b[i] for the 16 lanes.
FL_FORCEINLINE void vstore_interleaved(uint32_t* dst, VecU32 a, VecU32 b) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi32(a, lo, b));
  _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi32(a, hi, b));
}
#elif defined(__AVX2__)
constexpr int kSimdBlocks = 8;
using VecU32 = __m256i;
FL_FORCEINLINE VecU32 vset1(uint32_t x) { return _mm256_set1_epi32((int)x); }
FL_FORCEINLINE VecU32 vxor3(VecU32 a, VecU32 b, VecU32 c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
FL_FORCEINLINE void vmulhilo(VecU32 a, VecU32 m, VecU32* hi, VecU32* lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}
FL_FORCEINLINE VecU32 vcounter(uint32_t base) {
  return _mm256_add_epi32(_mm256_set1_epi32((int)base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FL_FORCEINLINE void vstore_interleaved(uint32_t* dst, VecU32 a, VecU32 b) {
  const __m256i lo = _mm256_unpacklo_epi32(a, b), hi = _mm256_unpackhi_epi32(a, b);  // per 128-bit half
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
}
#else
constexpr int kSimdBlocks = 0;
#endif

void philox_tile(uint64_t block0, int n_blocks, uint64_t seed, uint64_t counter, uint32_t* xa, uint32_t* xb) {
  int done = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Vector path only when the low word of the block index does not wrap inside the tile (so c1 is one constant).
  if (((block0 & 0xFFFFFFFFull) + (uint64_t)n_blocks) <= 0x100000000ull) {
    const uint32_t j_lo = (uint32_t)block0, j_hi = (uint32_t)(block0 >> 32);
    const VecU32 m0 = vset1(kPhiloxM0), m1 = vset1(kPhiloxM1);
    uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];  // round keys
    k0[0] = (uint32_t)seed, k1[0] = (uint32_t)(seed >> 32);
    for (int r = 1; r < kPhiloxRounds; ++r) k0[r] = k0[r - 1] + kPhiloxW0, k1[r] = k1[r - 1] + kPhiloxW1;
    for (; done + kSimdBlocks <= n_blocks; done += kSimdBlocks) {
      VecU32 c0 = vcounter(j_lo + (uint32_t)done), c1 = vset1(j_hi);
      VecU32 c2 = vset1((uint32_t)counter), c3 = vset1((uint32_t)(counter >> 32));
      for (int r = 0; r < kPhiloxRounds; ++r) {
        VecU32 hi0, lo0, hi1, lo1;
        vmulhilo(c0, m0, &hi0, &lo0);
        vmulhilo(c2, m1, &hi1, &lo1);
        c0 = vxor3(hi1, c1, vset1(k0[r]));
        c2 = vxor3(hi0, c3, vset1(k1[r]));
        c1 = lo1;
        c3 = lo0;
      }
      vstore_interleaved(xa + 2 * done, c0, c2);
      vstore_interleaved(xb + 2 * done, c1, c3);
    }
  }
#endif
  philox_tile_scalar(block0, done, n_blocks, seed, counter, xa, xb);
}

// Box-Muller over the tile's pairs; pair p gives elements 2p (cos) and 2p + 1 (sin). `noise` gets 4 * n_blocks
// values.
void tile_noise(uint64_t block0, int n_blocks, uint64_t seed, uint64_t counter, float* noise) {
  alignas(64) uint32_t xa[2 * kTileBlocks], xb[2 * kTileBlocks];
  alignas(64) float nc[2 * kTileBlocks], ns[2 * kTileBlocks];
  philox_tile(block0, n_blocks, seed, counter, xa, xb);
  const int n_pairs = 2 * n_blocks;
  for (int p = 0; p < n_pairs; ++p) {
    const float u = uniform_open0_f32(xa[p]);
    const float theta = kTwoPiF * uniform_closed0_f32(xb[p]);
    const float r = std::sqrt(-2.0f * log_f32(u));
    float s, c;
    sincos_f32(theta, &s, &c);
    nc[p] = r * c;
    ns[p] = r * s;
  }
  for (int p = 0; p < n_pairs; ++p) {
    noise[2 * p] = nc[p];
    noise[2 * p + 1] = ns[p];
  }
}

void tile_noise(uint64_t block0, int n_blocks, uint64_t seed, uint64_t counter, double* noise) {
  alignas(64) uint32_t xa[2 * kTileBlocks], xb[2 * kTileBlocks];
  philox_tile(block0, n_blocks, seed, counter, xa, xb);
  const int n_pairs = 2 * n_blocks;
  for (int p = 0; p < n_pairs; ++p) {
    const double u = uniform_open0_f64(xa[p]);
    const double theta = kTwoPiD * uniform_closed0_f64(xb[p]);
    const double r = std::sqrt(-2.0 * std::log(u));
    noise[2 * p] = r * std::cos(theta);
    noise[2 * p + 1] = r * std::sin(theta);
  }
}

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
