// The activations of the fused MLP chain on the CPU (codes: codes.h): the value h = act(a) and the derivative
// act'(a), the factor by which torch's backward multiplies the incoming gradient, both with torch's formulas.
// Branch-free bodies, so that the loops calling them vectorise; float32 uses the functions of cpu_math.h.
//
// Include only from translation units compiled with -ffp-contract=off (see cpu_math.h).
#ifndef FASTLANGEVIN_CPU_ACTIVATIONS_H_
#define FASTLANGEVIN_CPU_ACTIVATIONS_H_

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu_math.h"
#include "fastlangevin/cpu_simd.h"

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {

// h = act(a) and d = act'(a) for the activation code ACT; param: leaky ReLU's negative slope, ELU's alpha.
template <int ACT, typename T>
FL_FORCEINLINE void activation(T a, T param, T& h, T& d) {
  using simd::erf_t;
  using simd::exp_t;
  using simd::log1p_t;
  using simd::select_t;
  using simd::tanh_t;
  if constexpr (ACT == kActRelu) {
    h = a < T(0) ? T(0) : a;  // NaN stays NaN, as torch.relu
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
  } else if constexpr (ACT == kActTanh) {
    h = tanh_t(a);
    d = T(1) - h * h;
  } else if constexpr (ACT == kActIdentity) {
    h = a;
    d = T(1);
  } else {
    static_assert(ACT == kActSigmoid, "unknown activation code");
    h = T(1) / (T(1) + exp_t(-a));  // exp overflows to inf for a < -88 (float32): h = 0, as torch gives
    d = (T(1) - h) * h;
  }
}

// Calls fn(std::integral_constant<int, ACT>()) for the run-time code `act` (checked by the caller), so that each
// activation gets its own vectorised loop.
template <typename Fn>
FL_FORCEINLINE void with_activation(int act, Fn&& fn) {
  switch (act) {
    case kActRelu: fn(std::integral_constant<int, kActRelu>()); break;
    case kActLeakyRelu: fn(std::integral_constant<int, kActLeakyRelu>()); break;
    case kActSilu: fn(std::integral_constant<int, kActSilu>()); break;
    case kActGelu: fn(std::integral_constant<int, kActGelu>()); break;
    case kActGeluTanh: fn(std::integral_constant<int, kActGeluTanh>()); break;
    case kActElu: fn(std::integral_constant<int, kActElu>()); break;
    case kActSoftplus: fn(std::integral_constant<int, kActSoftplus>()); break;
    case kActTanh: fn(std::integral_constant<int, kActTanh>()); break;
    case kActIdentity: fn(std::integral_constant<int, kActIdentity>()); break;
    default: fn(std::integral_constant<int, kActSigmoid>()); break;
  }
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_ACTIVATIONS_H_
