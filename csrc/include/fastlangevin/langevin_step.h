// The per-element Langevin update, shared by the CPU build, nvcc and NVRTC.
//
//   out = z - (eps/2) * (grad + prior_term) + sigma * noise
//
// prior_term: kPriorFlat 0, kPriorNormal z, kPriorDiagonal inv_var[f] * (z - mean[f]) with f = i % D.
// The operations and their order follow fastlangevin/ops/langevin_step_reference.py so that results agree to
// rounding: drift = grad + prior_term; out = z - half_step * drift; out = out + sigma * noise. C is the compute type
// (double for double, float otherwise); half_step and sigma are already rounded to C by the caller.
#ifndef FASTLANGEVIN_LANGEVIN_STEP_H_
#define FASTLANGEVIN_LANGEVIN_STEP_H_

#include "fastlangevin/codes.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {

// Round-to-nearest arithmetic that the compiler may not fuse into an FMA.
#if defined(__CUDA_ARCH__)
__device__ FL_FORCEINLINE float fl_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ FL_FORCEINLINE float fl_add(float a, float b) { return __fadd_rn(a, b); }
__device__ FL_FORCEINLINE float fl_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ FL_FORCEINLINE double fl_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ FL_FORCEINLINE double fl_add(double a, double b) { return __dadd_rn(a, b); }
__device__ FL_FORCEINLINE double fl_sub(double a, double b) { return __dsub_rn(a, b); }
#else
template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C fl_mul(C a, C b) { return a * b; }
template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C fl_add(C a, C b) { return a + b; }
template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C fl_sub(C a, C b) { return a - b; }
#endif

template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C langevin_drift(int prior_kind, C z, C grad, C mean, C inv_var) {
  if (prior_kind == kPriorNormal) return fl_add(grad, z);
  if (prior_kind == kPriorDiagonal) return fl_add(grad, fl_mul(inv_var, fl_sub(z, mean)));
  return grad;
}

// Noise-free part of the update. The multiply and the subtract round separately, as in the reference (two torch
// ops): never contracted to an FMA (the _rn intrinsics on the device; the CPU build uses -ffp-contract=off).
template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C langevin_update(int prior_kind, C z, C grad, C mean, C inv_var, C half_step) {
  const C drift = langevin_drift<C>(prior_kind, z, grad, mean, inv_var);
  return fl_sub(z, fl_mul(half_step, drift));
}

template <typename C>
FL_HOST_DEVICE FL_FORCEINLINE C langevin_add_noise(C value, C sigma, C noise) {
  return fl_add(value, fl_mul(sigma, noise));
}

}  // namespace fastlangevin

#endif  // FASTLANGEVIN_LANGEVIN_STEP_H_
