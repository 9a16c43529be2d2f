// CUDA entry points of the fused Langevin step. Framework-free: raw device pointers, sizes and a stream handle
// (a cudaStream_t passed as an integer; 0 is the legacy default stream). Nothing here synchronises or reads device
// memory on the host: rng_state (int64 [seed, counter], device memory) is read inside the kernel, so the launch can
// be captured in a CUDA graph and replayed with a counter advanced on the device.
//
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16 (the 16-bit types compute in float32; mean and inv_var
// are then float32 arrays). Each returns "" on success and the CUDA error text otherwise.
#ifndef FASTLANGEVIN_CUDA_H_
#define FASTLANGEVIN_CUDA_H_

#include <cstdint>
#include <string>

namespace fastlangevin {
namespace cuda {

std::string langevin_step(const void* z, const void* grad, void* out, int64_t n, int64_t D, int prior_kind,
                          const void* mean, const void* inv_var, const int64_t* rng_state, double step_size,
                          double noise_scale, int dtype, uintptr_t stream);

std::string normal_noise(void* out, int64_t n, const int64_t* rng_state, int dtype, uintptr_t stream);

// "" when the runtime reaches at least one device, else why not (e.g. "CUDA driver version is insufficient for CUDA
// runtime version": the runtime is linked in statically, so the driver must support the nvcc it was built with).
std::string runtime_status();
int device_count();      // 0 when runtime_status() is not ""
int runtime_version();  // cudaRuntimeGetVersion of the (statically linked) runtime
int driver_version();   // cudaDriverGetVersion, 0 without a driver
int compiler_version();  // nvcc major * 1000 + minor * 10
const char* archs();     // the CUDA architectures compiled in, e.g. "80;90"

}  // namespace cuda
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CUDA_H_
