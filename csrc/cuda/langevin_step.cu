// Host side of the fused Langevin step on CUDA (the nvcc route): picks the kernel instantiation (dtype, noise on or
// off, vector access where the pointers are aligned) and launches it. The kernels themselves live in
// fastlangevin/langevin_step_kernels.cuh, which the NVRTC route (fastlangevin/ops/nvrtc.py) compiles too.
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "fastlangevin/cuda.h"
#include "fastlangevin/langevin_step_kernels.cuh"

#ifndef FASTLANGEVIN_CUDA_ARCHS
#define FASTLANGEVIN_CUDA_ARCHS "unknown"
#endif

namespace fastlangevin {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

// The grid of launch_blocks for the current device. The SM count is cached per device (these queries are not stream
// work, so they are allowed during graph capture).
std::string grid_size(int64_t n, int* grid) {
  static std::atomic<int> sm_counts[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  int sms = dev < kMaxDevices ? sm_counts[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    if (dev < kMaxDevices) sm_counts[dev].store(sms, std::memory_order_relaxed);
  }
  *grid = launch_blocks(n, sms);
  return "";
}

std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

bool aligned(const void* p, int alignment) { return ((uintptr_t)p % (uintptr_t)alignment) == 0; }

template <typename T>
std::string step_typed(const void* z, const void* grad, void* out, int64_t n, int64_t D, int prior_kind,
                       const void* mean, const void* inv_var, const int64_t* rng_state, double step_size,
                       double noise_scale, cudaStream_t stream) {
  using C = typename ComputeType<T>::type;
  int grid = 0;
  std::string err = grid_size(n, &grid);
  if (!err.empty()) return "langevin_step: " + err;
  const bool vec = aligned(z, kVecAlign<T>) && aligned(grad, kVecAlign<T>) && aligned(out, kVecAlign<T>);
  const bool noise = noise_scale != 0.0;
  const C half_step = (C)(step_size / 2), sigma = (C)noise_scale;
  auto kernel = noise ? (vec ? langevin_step_kernel<T, true, true> : langevin_step_kernel<T, true, false>)
                      : (vec ? langevin_step_kernel<T, false, true> : langevin_step_kernel<T, false, false>);
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(z), static_cast<const T*>(grad), static_cast<T*>(out),
                                        n, D, prior_kind, static_cast<const C*>(mean), static_cast<const C*>(inv_var),
                                        rng_state, half_step, sigma);
  return launch_error("langevin_step kernel launch");
}

template <typename T>
std::string noise_typed(void* out, int64_t n, const int64_t* rng_state, cudaStream_t stream) {
  int grid = 0;
  std::string err = grid_size(n, &grid);
  if (!err.empty()) return "normal_noise: " + err;
  auto kernel = aligned(out, kVecAlign<T>) ? normal_noise_kernel<T, true> : normal_noise_kernel<T, false>;
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<T*>(out), n, rng_state);
  return launch_error("normal_noise kernel launch");
}

}  // namespace

std::string langevin_step(const void* z, const void* grad, void* out, int64_t n, int64_t D, int prior_kind,
                          const void* mean, const void* inv_var, const int64_t* rng_state, double step_size,
                          double noise_scale, int dtype, uintptr_t stream_handle) {
  if (n == 0) return "";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case kFloat32:
      return step_typed<float>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size, noise_scale,
                               stream);
    case kFloat64:
      return step_typed<double>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size, noise_scale,
                                stream);
    case kFloat16:
      return step_typed<__half>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size, noise_scale,
                                stream);
    case kBFloat16:
      return step_typed<__nv_bfloat16>(z, grad, out, n, D, prior_kind, mean, inv_var, rng_state, step_size,
                                       noise_scale, stream);
  }
  return "langevin_step: unknown dtype code " + std::to_string(dtype);
}

std::string normal_noise(void* out, int64_t n, const int64_t* rng_state, int dtype, uintptr_t stream_handle) {
  if (n == 0) return "";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case kFloat32: return noise_typed<float>(out, n, rng_state, stream);
    case kFloat64: return noise_typed<double>(out, n, rng_state, stream);
    case kFloat16: return noise_typed<__half>(out, n, rng_state, stream);
    case kBFloat16: return noise_typed<__nv_bfloat16>(out, n, rng_state, stream);
  }
  return "normal_noise: unknown dtype code " + std::to_string(dtype);
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that it is not reported by the next launch check
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return count > 0 ? "" : "no CUDA device";
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int compiler_version() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }

const char* archs() { return FASTLANGEVIN_CUDA_ARCHS; }

}  // namespace cuda
}  // namespace fastlangevin
