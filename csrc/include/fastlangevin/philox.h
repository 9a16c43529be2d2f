// Philox4x32-10 + Box-Muller: the one noise stream of fastlangevin, shared by the CPU build, nvcc and NVRTC.
//
// The definition (it must match fastlangevin/ops/philox.py bit for bit):
//   key     (k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)
//   element i at step `counter` lies in block j = i / 4, lane i % 4; the block is one Philox4x32-10 call on
//   counter (j & 0xFFFFFFFF, j >> 32, counter & 0xFFFFFFFF, counter >> 32) giving words x0..x3;
//   u(x) = x * 2^-32 + 2^-33 in (0, 1],  v(x) = x * 2^-32 in [0, 1)  (computed in the compute type: each op rounds);
//   lanes 0, 1 = r cos(theta), r sin(theta) with r = sqrt(-2 log u(x0)), theta = 2pi v(x1); lanes 2, 3 from (x2, x3).
//
// No standard headers beyond <stdint.h> (and none at all under NVRTC), so the file compiles everywhere.
#ifndef FASTLANGEVIN_PHILOX_H_
#define FASTLANGEVIN_PHILOX_H_

#if defined(__CUDACC_RTC__)
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FL_HOST_DEVICE __host__ __device__
#define FL_FORCEINLINE __forceinline__
#else
#define FL_HOST_DEVICE
#if defined(__GNUC__) || defined(__clang__)
#define FL_FORCEINLINE inline __attribute__((always_inline))
#else
#define FL_FORCEINLINE inline
#endif
#endif

namespace fastlangevin {

static constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
static constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
static constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
static constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
static constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

FL_HOST_DEVICE FL_FORCEINLINE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// One Philox4x32-10 block for block index j at step `counter` under key (k0, k1).
FL_HOST_DEVICE FL_FORCEINLINE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                   uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 out = {c0, c1, c2, c3};
  return out;
}

// The block of element block index j (= element index / 4) of the stream (seed, counter).
FL_HOST_DEVICE FL_FORCEINLINE Philox4 philox_block(uint64_t j, uint64_t seed, uint64_t counter) {
  return philox4x32_10((uint32_t)j, (uint32_t)(j >> 32), (uint32_t)counter, (uint32_t)(counter >> 32), (uint32_t)seed,
                       (uint32_t)(seed >> 32));
}

// uint32 -> float rounded to nearest, like (float)x. Off the GPU and without AVX-512 (which converts unsigned
// lanes directly), it is built from two exact signed conversions and one rounding add, which SSE/AVX2/NEON
// vectorise (a plain (float)x of a uint32 keeps GCC's vectoriser out of the loop on SSE2).
FL_HOST_DEVICE FL_FORCEINLINE float u32_to_f32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __uint2float_rn(x);
#elif defined(__AVX512F__) || defined(__CUDACC_RTC__)
  return (float)x;
#else
  return (float)(int32_t)(x >> 16) * 65536.0f + (float)(int32_t)(x & 0xFFFFu);
#endif
}

// Uniforms. The float versions round exactly as torch does in float32: x -> float (nearest), * 2^-32 (exact),
// + 2^-33 (rounds; u = 1 when x rounds up to 2^32).
FL_HOST_DEVICE FL_FORCEINLINE float uniform_open0_f32(uint32_t x) {
  return u32_to_f32(x) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
}
FL_HOST_DEVICE FL_FORCEINLINE float uniform_closed0_f32(uint32_t x) { return u32_to_f32(x) * 2.3283064365386963e-10f; }
FL_HOST_DEVICE FL_FORCEINLINE double uniform_open0_f64(uint32_t x) {
  return (double)x * 2.3283064365386963e-10 + 1.1641532182693481e-10;
}
FL_HOST_DEVICE FL_FORCEINLINE double uniform_closed0_f64(uint32_t x) { return (double)x * 2.3283064365386963e-10; }

// 2pi rounded to the compute type (torch multiplies the float32 tensor by the Python float 2pi cast to float32).
static constexpr float kTwoPiF = 6.28318530717958647692f;
static constexpr double kTwoPiD = 6.28318530717958647692;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// Device Box-Muller with the CUDA math library (full precision: do not build with -use_fast_math).
__device__ FL_FORCEINLINE void box_muller(uint32_t xa, uint32_t xb, float* n_cos, float* n_sin) {
  const float u = uniform_open0_f32(xa);
  const float theta = kTwoPiF * uniform_closed0_f32(xb);
  const float r = sqrtf(-2.0f * logf(u));
  float s, c;
  sincosf(theta, &s, &c);
  *n_cos = r * c;
  *n_sin = r * s;
}
__device__ FL_FORCEINLINE void box_muller(uint32_t xa, uint32_t xb, double* n_cos, double* n_sin) {
  const double u = uniform_open0_f64(xa);
  const double theta = kTwoPiD * uniform_closed0_f64(xb);
  const double r = sqrt(-2.0 * log(u));
  double s, c;
  sincos(theta, &s, &c);
  *n_cos = r * c;
  *n_sin = r * s;
}
#endif

}  // namespace fastlangevin

#endif  // FASTLANGEVIN_PHILOX_H_
