// The Philox4x32-10 + Box-Muller noise of fastlangevin.ops.philox for the CPU kernels, a tile of Philox blocks at a
// time: Philox into arrays (AVX-512 or AVX2 intrinsics for its 32x32->64-bit multiplies, a plain loop elsewhere),
// then Box-Muller over the arrays with the auto-vectorised log_f32 / sincos_f32 of cpu_math.h (float32) or <cmath>
// (float64), one template for both. Shared by the step kernel (csrc/cpu/langevin_step.cpp) and the fused MLP chain
// (csrc/cpu/mlp_chain.cpp).
//
// Include only from translation units compiled with -ffp-contract=off (see cpu_math.h).
#ifndef FASTLANGEVIN_CPU_NOISE_H_
#define FASTLANGEVIN_CPU_NOISE_H_

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fastlangevin/cpu_math.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {
namespace simd {

constexpr int kTileBlocks = 64;  // Philox blocks per call of tile_noise (n_blocks <= kTileBlocks)

// Philox words of blocks block0 .. block0 + n_blocks - 1 in pair order: pair p of the tile is (x0, x1) of block p/2
// for even p and (x2, x3) for odd p, stored as xa[p] (feeds u) and xb[p] (feeds theta).
//
// The plain loop is the definition (and the fallback); GCC vectorises it, but its 32x32->64-bit multiplies come out
// as widen + 64-bit multiply, so with AVX-512 or AVX2 the blocks go 16 or 8 at a time through pmuludq instead (about
// 2x faster, and Philox is half of the float32 noise cost).
inline void philox_tile_scalar(uint64_t block0, int first, int n_blocks, uint64_t seed, uint64_t counter,
                               uint32_t* xa, uint32_t* xb) {
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

inline void philox_tile(uint64_t block0, int n_blocks, uint64_t seed, uint64_t counter, uint32_t* xa, uint32_t* xb) {
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

// The uniforms and 2pi of philox.h in the compute type T.
template <typename T>
FL_FORCEINLINE T uniform_open0(uint32_t x) {
  if constexpr (std::is_same<T, float>::value)
    return uniform_open0_f32(x);
  else
    return uniform_open0_f64(x);
}
template <typename T>
FL_FORCEINLINE T uniform_closed0(uint32_t x) {
  if constexpr (std::is_same<T, float>::value)
    return uniform_closed0_f32(x);
  else
    return uniform_closed0_f64(x);
}
template <typename T>
constexpr T kTwoPi = std::is_same<T, float>::value ? (T)kTwoPiF : (T)kTwoPiD;

// Box-Muller over the tile's pairs; pair p gives elements 2p (cos) and 2p + 1 (sin). `noise` gets 4 * n_blocks
// values. The cos and sin halves go to separate arrays first: a loop that stores them interleaved does not
// vectorise.
template <typename T>
inline void tile_noise(uint64_t block0, int n_blocks, uint64_t seed, uint64_t counter, T* noise) {
  alignas(64) uint32_t xa[2 * kTileBlocks], xb[2 * kTileBlocks];
  alignas(64) T nc[2 * kTileBlocks], ns[2 * kTileBlocks];
  philox_tile(block0, n_blocks, seed, counter, xa, xb);
  const int n_pairs = 2 * n_blocks;
  for (int p = 0; p < n_pairs; ++p) {
    const T u = uniform_open0<T>(xa[p]);
    const T theta = kTwoPi<T> * uniform_closed0<T>(xb[p]);
    const T r = std::sqrt(T(-2) * log_t(u));
    T s, c;
    sincos_t(theta, &s, &c);
    nc[p] = r * c;
    ns[p] = r * s;
  }
  for (int p = 0; p < n_pairs; ++p) {
    noise[2 * p] = nc[p];
    noise[2 * p + 1] = ns[p];
  }
}

}  // namespace simd
}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_NOISE_H_
