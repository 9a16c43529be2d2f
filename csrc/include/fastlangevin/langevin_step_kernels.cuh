// The CUDA kernels of the fused Langevin step, one source for both routes: nvcc compiles them into
// fastlangevin._C_cuda (csrc/cuda/langevin_step.cu launches them), NVRTC compiles them at first use where no nvcc
// build exists (csrc/cuda/langevin_step_nvrtc.cu, driven by fastlangevin/ops/nvrtc.py). One kernel template for
// float32/float64/float16/bfloat16.
//
// Each thread handles one Philox block (4 consecutive elements: one Philox4x32-10 call feeds them all), with
// 16-byte (8-byte for 16-bit types) vector loads and stores where z, grad and out are aligned, scalar code for the
// last, partial block. Grid-stride loop over blocks. The 16-bit types compute in float32 and round once at the end,
// as the reference does. rng_state (int64 [seed, counter], device memory) is read in the kernel, never advanced.
//
// Under NVRTC this needs the CUDA include folder (cuda_fp16.h, cuda_bf16.h) on -I; no other header.
#ifndef FASTLANGEVIN_LANGEVIN_STEP_KERNELS_CUH_
#define FASTLANGEVIN_LANGEVIN_STEP_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastlangevin/langevin_step.h"
#include "fastlangevin/philox.h"

namespace fastlangevin {
namespace cuda {

// Launch settings of both kernels on both routes: fastlangevin/ops/nvrtc.py reads the `constexpr int k... = N;` lines
// of this block from this file, so keep them in that form. One thread per Philox block; enough blocks to fill every
// SM kBlocksPerSM times over, more would only add scheduling (the kernels loop over the rest): see launch_blocks.
// Vector access (four elements at once) where z, grad and out are aligned to kVecAlignWide bytes (float, double) or
// kVecAlignHalf bytes (float16, bfloat16).
constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 16;
constexpr int kVecAlignWide = 16;
constexpr int kVecAlignHalf = 8;

FL_HOST_DEVICE FL_FORCEINLINE int launch_blocks(int64_t n, int sms) {
  const int64_t needed = ((n + 3) / 4 + kThreads - 1) / kThreads;
  const int64_t cap = (int64_t)sms * kBlocksPerSM;
  return (int)(needed < cap ? needed : cap);
}

template <typename T>
constexpr int kVecAlign = sizeof(T) == 2 ? kVecAlignHalf : kVecAlignWide;

template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

__device__ FL_FORCEINLINE float to_compute(float x) { return x; }
__device__ FL_FORCEINLINE double to_compute(double x) { return x; }
__device__ FL_FORCEINLINE float to_compute(__half x) { return __half2float(x); }
__device__ FL_FORCEINLINE float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ FL_FORCEINLINE T from_compute(typename ComputeType<T>::type x);
template <>
__device__ FL_FORCEINLINE float from_compute<float>(float x) { return x; }
template <>
__device__ FL_FORCEINLINE double from_compute<double>(double x) { return x; }
template <>
__device__ FL_FORCEINLINE __half from_compute<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ FL_FORCEINLINE __nv_bfloat16 from_compute<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Four consecutive elements at p, which is aligned to kVecAlign<T> bytes.
__device__ FL_FORCEINLINE void load4(const float* p, float v[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ FL_FORCEINLINE void load4(const double* p, double v[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
template <typename T2, typename T>
__device__ FL_FORCEINLINE void load4_16bit(const T* p, float v[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  T2 lo, hi;
  memcpy(&lo, &raw.x, 4);
  memcpy(&hi, &raw.y, 4);
  v[0] = to_compute(lo.x), v[1] = to_compute(lo.y), v[2] = to_compute(hi.x), v[3] = to_compute(hi.y);
}
__device__ FL_FORCEINLINE void load4(const __half* p, float v[4]) { load4_16bit<__half2>(p, v); }
__device__ FL_FORCEINLINE void load4(const __nv_bfloat16* p, float v[4]) { load4_16bit<__nv_bfloat162>(p, v); }

__device__ FL_FORCEINLINE void store4(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ FL_FORCEINLINE void store4(double* p, const double v[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
template <typename T>
__device__ FL_FORCEINLINE void store4_16bit(T* p, const float v[4]) {
  T h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = from_compute<T>(v[k]);
  uint2 raw;
  memcpy(&raw, h, 8);
  *reinterpret_cast<uint2*>(p) = raw;
}
__device__ FL_FORCEINLINE void store4(__half* p, const float v[4]) { store4_16bit(p, v); }
__device__ FL_FORCEINLINE void store4(__nv_bfloat16* p, const float v[4]) { store4_16bit(p, v); }

// The four normals of Philox block j.
template <typename C>
__device__ FL_FORCEINLINE void block_noise(uint64_t j, uint64_t seed, uint64_t counter, C noise[4]) {
  const Philox4 p = philox_block(j, seed, counter);
  box_muller(p.x0, p.x1, &noise[0], &noise[1]);
  box_muller(p.x2, p.x3, &noise[2], &noise[3]);
}

template <typename T, bool kNoise, bool kVec>
__global__ void __launch_bounds__(kThreads)
    langevin_step_kernel(const T* z, const T* grad, T* out, int64_t n, int64_t D, int prior_kind,
                         const typename ComputeType<T>::type* mean, const typename ComputeType<T>::type* inv_var,
                         const int64_t* rng_state, typename ComputeType<T>::type half_step,
                         typename ComputeType<T>::type sigma) {
  using C = typename ComputeType<T>::type;
  uint64_t seed = 0, counter = 0;
  if (kNoise) {
    seed = (uint64_t)rng_state[0];
    counter = (uint64_t)rng_state[1];
  }
  const int64_t n_blocks = (n + 3) / 4;
  const bool small_index = n <= 0xFFFFFFFFll;  // 32-bit modulo is much cheaper than 64-bit
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n_blocks;
       j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = 4 * j;
    const bool full = i0 + 4 <= n;
    C zv[4] = {0, 0, 0, 0}, gv[4] = {0, 0, 0, 0};
    if (kVec && full) {
      load4(z + i0, zv);
      load4(grad + i0, gv);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) zv[k] = to_compute(z[i0 + k]), gv[k] = to_compute(grad[i0 + k]);
    }
    C mv[4] = {0, 0, 0, 0}, iv[4] = {0, 0, 0, 0};
    if (prior_kind == kPriorDiagonal) {
      int64_t f = small_index ? (int64_t)((uint32_t)i0 % (uint32_t)D) : i0 % D;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (i0 + k < n) mv[k] = mean[f], iv[k] = inv_var[f];
        f = f + 1 == D ? 0 : f + 1;
      }
    }
    C res[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) res[k] = langevin_update<C>(prior_kind, zv[k], gv[k], mv[k], iv[k], half_step);
    if (kNoise) {
      C noise[4];
      block_noise((uint64_t)j, seed, counter, noise);
#pragma unroll
      for (int k = 0; k < 4; ++k) res[k] = langevin_add_noise<C>(res[k], sigma, noise[k]);
    }
    if (kVec && full) {
      store4(out + i0, res);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) out[i0 + k] = from_compute<T>(res[k]);
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) normal_noise_kernel(T* out, int64_t n, const int64_t* rng_state) {
  using C = typename ComputeType<T>::type;
  const uint64_t seed = (uint64_t)rng_state[0], counter = (uint64_t)rng_state[1];
  const int64_t n_blocks = (n + 3) / 4;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n_blocks;
       j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = 4 * j;
    C noise[4];
    block_noise((uint64_t)j, seed, counter, noise);
    if (kVec && i0 + 4 <= n) {
      store4(out + i0, noise);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) out[i0 + k] = from_compute<T>(noise[k]);
    }
  }
}

}  // namespace cuda
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_LANGEVIN_STEP_KERNELS_CUH_
