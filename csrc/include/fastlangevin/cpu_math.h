// Branch-free float32 elementary functions for the CPU kernels, written so that GCC and Clang auto-vectorise the
// plain loops that call them (integer selects and bit tricks instead of float branches, no libm calls).
//
// log_f32 and sincos_f32 feed Box-Muller (the noise of every CPU kernel); exp_f32, tanh_f32, erf_f32 and log1p_f32
// feed the activations of the fused MLP chain. Each is within a few ulp of the correctly rounded result over the
// range its callers use (noted per function). The *_t overloads at the end pick them for float and <cmath> for
// double, so that code templated on the compute type calls one name.
//
// Include only from translation units compiled with -ffp-contract=off (CMakeLists.txt sets it for csrc/cpu): the
// polynomials use explicit FMAs where the target has them and must not get others.
#ifndef FASTLANGEVIN_CPU_MATH_H_
#define FASTLANGEVIN_CPU_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastlangevin/cpu_simd.h"  // FL_ISA_NAMESPACE
#include "fastlangevin/philox.h"    // FL_FORCEINLINE

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {
namespace simd {

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

// Natural log of a positive, normal, finite float (u in [2^-33, 1] for Box-Muller; [1, 2^29] for log1p_f32). Cephes
// logf without branches: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log x = log1p(m - 1) + e log 2 (log 2 split in
// two parts).
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

// e^x for any float: Cephes expf without branches. n = nearest integer to x / log 2 (the 1.5 * 2^23 trick rounds
// to nearest without a rounding instruction), r = x - n log 2 in [-log2/2, log2/2] (log 2 in two parts), e^r by a
// degree-6 polynomial, times 2^n applied as two powers of two so that n in [-150, 128] needs no special case
// (results below 2^-126 come out subnormal or 0, like expf). x > 88.72 gives +inf; NaN gives NaN.
FL_FORCEINLINE float exp_f32(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // NaN passes through both compares
  const float shifted = fmadd(xc, 1.44269504088896341f, 12582912.0f);  // 1.5 * 2^23 + x / log 2, rounded
  const int32_t n = (int32_t)(bits_of(shifted) - bits_of(12582912.0f));
  const float fn = shifted - 12582912.0f;
  float r = fmadd(fn, -0.693359375f, xc);
  r = fmadd(fn, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  p = fmadd(p, r * r, r) + 1.0f;
  const int32_t n1 = n >> 1, n2 = n - n1;  // each in [-75, 64]: 2^n1, 2^n2 are normal floats
  // Beyond log(FLT_MAX) ~ 88.72 the product overflows to +inf by itself (no select: a constant inf on one path
  // lets GCC thread jumps through a following log_f32 and then it no longer vectorises the loop).
  return p * float_of((uint32_t)(n1 + 127) << 23) * float_of((uint32_t)(n2 + 127) << 23);
}

// tanh(x), odd: Cephes tanhf's polynomial for |x| < 0.625 (relative error ~1 ulp near 0), else
// 1 - 2 / (e^{2|x|} + 1) (absolute error ~1 ulp of 1); |x| is capped at 10, where tanh rounds to 1 in float32.
FL_FORCEINLINE float tanh_f32(float x) {
  const uint32_t sign = bits_of(x) & 0x80000000u;
  float ax = float_of(bits_of(x) & 0x7fffffffu);
  ax = ax > 10.0f ? 10.0f : ax;
  const float z = ax * ax;
  float p = -5.70498872745e-3f;
  p = fmadd(p, z, 2.06390887954e-2f);
  p = fmadd(p, z, -5.37397155531e-2f);
  p = fmadd(p, z, 1.33314422036e-1f);
  p = fmadd(p, z, -3.33332819422e-1f);
  const float small = fmadd(p * z, ax, ax);
  const float large = 1.0f - 2.0f / (exp_f32(2.0f * ax) + 1.0f);
  const float t = ax < 0.625f ? small : large;
  return float_of(bits_of(t) | sign);
}

// erf(x): x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf rounds to +-1 in float32 beyond), the rational
// approximation of Eigen's generic_fast_erf_float; absolute error a few 1e-8 (relative a few ulp near 0).
FL_FORCEINLINE float erf_f32(float x) {
  const float xc = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float z = xc * xc;
  float p = -2.72614225801306e-10f;
  p = fmadd(p, z, 2.77068142495902e-08f);
  p = fmadd(p, z, -2.10102402082508e-06f);
  p = fmadd(p, z, -5.69250639462346e-05f);
  p = fmadd(p, z, -7.34990630326855e-04f);
  p = fmadd(p, z, -2.95459980854025e-03f);
  p = fmadd(p, z, -1.60960333262415e-02f);
  float q = -1.45660718464996e-05f;
  q = fmadd(q, z, -2.13374055278905e-04f);
  q = fmadd(q, z, -1.68282697438203e-03f);
  q = fmadd(q, z, -7.37332916720468e-03f);
  q = fmadd(q, z, -1.42647390514189e-02f);
  return xc * p / q;
}

// log(1 + x) for x >= 0 (softplus feeds it e^a): log(u) * x / (u - 1) with u = 1 + x rounded, which cancels the
// rounding of u (Goldberg's trick); x itself where u rounds to 1.
FL_FORCEINLINE float log1p_f32(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;  // >= 0
  // Bit masks, not float selects: GCC keeps a branch around the division otherwise.
  const uint32_t tiny = bits_of(d) == 0u ? 0xffffffffu : 0u;
  const float y = log_f32(u) * (x / float_of(bits_of(d) | (tiny & bits_of(1.0f))));
  return float_of((bits_of(y) & ~tiny) | (bits_of(x) & tiny));
}

// ---- One name per function for code templated on the compute type -------------------------------------------

FL_FORCEINLINE float exp_t(float x) { return exp_f32(x); }
FL_FORCEINLINE double exp_t(double x) { return std::exp(x); }
FL_FORCEINLINE float tanh_t(float x) { return tanh_f32(x); }
FL_FORCEINLINE double tanh_t(double x) { return std::tanh(x); }
FL_FORCEINLINE float erf_t(float x) { return erf_f32(x); }
FL_FORCEINLINE double erf_t(double x) { return std::erf(x); }
FL_FORCEINLINE float log1p_t(float x) { return log1p_f32(x); }  // x >= 0
FL_FORCEINLINE double log1p_t(double x) { return std::log1p(x); }
FL_FORCEINLINE float log_t(float x) { return log_f32(x); }  // x positive, normal, finite
FL_FORCEINLINE double log_t(double x) { return std::log(x); }
FL_FORCEINLINE void sincos_t(float theta, float* s, float* c) { sincos_f32(theta, s, c); }  // theta in [0, 2pi]
FL_FORCEINLINE void sincos_t(double theta, double* s, double* c) {
  *s = std::sin(theta);
  *c = std::cos(theta);
}

// c ? x : y. For float as bit masks: with a plain select GCC threads the comparison through the exp and log1p of
// softplus (their input is clamped on the same condition) and no longer vectorises the loop.
FL_FORCEINLINE float select_t(bool c, float x, float y) {
  const uint32_t m = 0u - (uint32_t)c;
  return float_of((bits_of(x) & m) | (bits_of(y) & ~m));
}
FL_FORCEINLINE double select_t(bool c, double x, double y) { return c ? x : y; }

}  // namespace simd
}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_MATH_H_
