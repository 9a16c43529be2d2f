// Every integer code the kernels and their bindings share with Python: the one C++ copy of the table in
// fastlangevin/ops/codes.py (tests/test_codes.py parses this file and checks it against that module).
//
// No includes, so the file compiles in every build: the CPU kernels, nvcc and NVRTC.
#ifndef FASTLANGEVIN_CODES_H_
#define FASTLANGEVIN_CODES_H_

namespace fastlangevin {

// Activations of the fused MLP chain, applied after a layer: h = act(W x + b). Values and derivatives follow torch's
// forward and backward formulas (csrc/include/fastlangevin/cpu_activations.h).
enum Activation {
  kActRelu = 0,
  kActLeakyRelu = 1,  // param: negative slope
  kActSilu = 2,
  kActGelu = 3,      // exact (erf)
  kActGeluTanh = 4,  // tanh approximation
  kActElu = 5,       // param: alpha
  kActSoftplus = 6,  // beta 1, threshold 20
  kActTanh = 7,
  kActIdentity = 8,  // a linear layer (an energy's output, a linear bottleneck)
  kActSigmoid = 9,
};
constexpr int kActivationCount = 10;

// Langevin transitions of the fused chain.
enum Method { kMethodUla = 0, kMethodMala = 1 };

// Priors the kernels evaluate themselves: flat (none), N(0, I), N(mean, diag(1 / inv_var)).
enum PriorKind { kPriorFlat = 0, kPriorNormal = 1, kPriorDiagonal = 2 };

// Element types of the bindings' arrays.
enum DtypeCode { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The unit that computes the fused chain's layer products. kMatrixVector: vector FMAs in the chain's dtype, on
// weights of that dtype. The bfloat16 units take bfloat16 weights and biases with a float32 chain: the products'
// operands are bfloat16 and accumulate in float32 (AVX512-BF16 dot products, or AMX tiles).
enum MatrixUnit { kMatrixVector = 0, kMatrixAvx512Bf16 = 1, kMatrixAmxBf16 = 2 };
constexpr int kMatrixUnitCount = 3;

}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CODES_H_
