// The translation unit of the NVRTC route: fastlangevin/ops/nvrtc.py compiles this file at first use (csrc/include
// and the CUDA include folder on -I) and takes the kernels by their template names (NVRTC name expressions). The
// device code is the nvcc route's, from the shared header: nothing else may be added here.
#include "fastlangevin/langevin_step_kernels.cuh"
