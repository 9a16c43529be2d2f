// The instruction-set-specific part of the CPU kernels, kept in one small header: the vector type of the GEMM
// micro-kernel (cpu_gemm.h), the register budget that sizes it, and a strided gather into tile rows.
//
// Everything ISA-dependent in the CPU headers lives in the inline namespace FL_ISA_NAMESPACE, named after the
// instruction set the including file is compiled for (the pattern of Google Highway's HWY_NAMESPACE). Translation
// units built for different instruction sets (a baseline, an AVX2 and an AVX-512 copy of a kernel, selected at run
// time) then get differently mangled inline functions, so the linker can never hand one of them another's code. A
// translation unit compiled with more than its level's instruction sets defines FL_ISA_NAMESPACE itself, first.
#ifndef FASTLANGEVIN_CPU_SIMD_H_
#define FASTLANGEVIN_CPU_SIMD_H_

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fastlangevin/philox.h"  // FL_FORCEINLINE

#if defined(FL_ISA_NAMESPACE)
// named by the translation unit itself (one with extra instruction sets, e.g. csrc/cpu/mlp_chain_bf16.cpp)
#elif defined(__AVX512F__)
#define FL_ISA_NAMESPACE isa_avx512
#elif defined(__AVX2__)
#define FL_ISA_NAMESPACE isa_avx2
#else
#define FL_ISA_NAMESPACE isa_baseline
#endif

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {

// Vec<T>: the widest vector the build may use, with the five operations the micro-kernel needs. Loads and stores
// are aligned (tile rows are whole vectors, see kAlign); fma is an explicit fused multiply-add (the CPU kernels are
// compiled with -ffp-contract=off, so a * b + c would not become one).
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

// Accumulator registers the micro-kernel may hold: 24 of the 32 AVX-512 registers (12 of the 16 AVX2 ones), which
// leaves room for the loaded vectors and the broadcast weight.
#if defined(__AVX512F__)
constexpr int kMaxAccumulators = 24;
#else
constexpr int kMaxAccumulators = 12;
#endif

// dst[b] = src[b * stride] for b < n (a column of a row-major block into a tile row); dst[n..] are left as they are.
// AVX-512 gathers a vector at a time (the compiler leaves this strided copy scalar).
template <typename T>
FL_FORCEINLINE void gather_lanes(const T* src, int stride, int n, T* dst) {
#if defined(__AVX512F__)
  constexpr int L = Vec<T>::kLanes;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i idx = _mm512_mullo_epi32(iota, _mm512_set1_epi32(stride));
  for (int b0 = 0; b0 < n; b0 += L) {
    const int left = n - b0;
    const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const T* base = src + (int64_t)b0 * stride;
    if constexpr (std::is_same<T, float>::value) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, base, 4);
      _mm512_mask_store_ps(dst + b0, m, v);
    } else {
      const __m512d v =
          _mm512_mask_i32gather_pd(_mm512_setzero_pd(), (__mmask8)m, _mm512_castsi512_si256(idx), base, 8);
      _mm512_mask_store_pd(dst + b0, (__mmask8)m, v);
    }
  }
#else
  for (int b = 0; b < n; ++b) dst[b] = src[(int64_t)b * stride];
#endif
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_SIMD_H_
