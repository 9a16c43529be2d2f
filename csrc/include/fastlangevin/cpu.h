// CPU entry points of the fused Langevin step. Framework-free: raw pointers to contiguous arrays and sizes.
//
// z, grad, out: n elements (out may be z or grad; any other overlap is undefined). mean, inv_var: D elements
// (read only for prior_kind 2; element i uses feature i % D). rng_state: int64 [seed, counter] (read only when
// noise_scale != 0; never advanced here). n_threads <= 0 means all of them; below 2^15 elements one thread is used.
#ifndef FASTLANGEVIN_CPU_H_
#define FASTLANGEVIN_CPU_H_

#include <cstdint>

namespace fastlangevin {
namespace cpu {

// Throws std::invalid_argument naming the bad argument.
void check_step_args(int64_t n, int64_t D, int prior_kind, const void* mean, const void* inv_var,
                     const void* rng_state, double noise_scale);

void langevin_step_f32(const float* z, const float* grad, float* out, int64_t n, int64_t D, int prior_kind,
                       const float* mean, const float* inv_var, const int64_t* rng_state, double step_size,
                       double noise_scale, int n_threads);
void langevin_step_f64(const double* z, const double* grad, double* out, int64_t n, int64_t D, int prior_kind,
                       const double* mean, const double* inv_var, const int64_t* rng_state, double step_size,
                       double noise_scale, int n_threads);

// The raw stream (fastlangevin.ops.philox.normal_noise) for the first n elements.
void normal_noise_f32(float* out, int64_t n, const int64_t* rng_state, int n_threads);
void normal_noise_f64(double* out, int64_t n, const int64_t* rng_state, int n_threads);

int max_threads();
int simd_width_bits();  // widest vectors the compiler was allowed to use for this file
int openmp_version();   // _OPENMP of the build, 0 without OpenMP

}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_H_
