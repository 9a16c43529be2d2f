"""The integer codes that Python and the kernels share: activations, sampling methods, prior kinds, dtypes, matrix
units.

Declared once, here. The C++/CUDA sources carry the same values in ``csrc/include/fastlangevin/codes.h``
(``tests/test_codes.py`` parses that header and compares); Triton kernels read them as ``tl.constexpr`` through
``fastlangevin.ops.triton.codes``. The ``nn.Module`` side of the activations (which torch module is which code) is
the table ``fastlangevin.energies.ACTIVATIONS``.

A leaf module: it imports nothing, so every layer of the package (kernels, sampler, energies) can use it.
"""

# Activations, applied after a layer: h = act(W x + b). Values and derivatives follow torch's formulas.
RELU = 0
LEAKY_RELU = 1  # param: negative slope
SILU = 2
GELU = 3  # exact (erf), nn.GELU()
GELU_TANH = 4  # nn.GELU(approximate="tanh")
ELU = 5  # param: alpha
SOFTPLUS = 6  # beta 1, threshold 20, as nn.Softplus()
TANH = 7
IDENTITY = 8  # no activation: an energy's output layer, a linear bottleneck between two networks
SIGMOID = 9

ACTIVATIONS = {
    "relu": RELU, "leaky_relu": LEAKY_RELU, "silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "elu": ELU,
    "softplus": SOFTPLUS, "tanh": TANH, "identity": IDENTITY, "sigmoid": SIGMOID,
}

# Langevin transitions: unadjusted, or Metropolis-adjusted (accept/reject per sample).
ULA = 0
MALA = 1
METHODS = {"ula": ULA, "mala": MALA}

# Priors the kernels evaluate themselves (the step's prior term −∇log prior(z)): none, N(0, I), N(mean, diag(var)).
PRIOR_FLAT = 0
PRIOR_NORMAL = 1
PRIOR_DIAGONAL = 2
PRIORS = {"flat": PRIOR_FLAT, "normal": PRIOR_NORMAL, "diagonal": PRIOR_DIAGONAL}

# Element types of the arrays the bindings take (by torch dtype name).
FLOAT32 = 0
FLOAT64 = 1
FLOAT16 = 2
BFLOAT16 = 3
DTYPES = {"float32": FLOAT32, "float64": FLOAT64, "float16": FLOAT16, "bfloat16": BFLOAT16}

# The unit that computes the fused chain's layer products on the CPU: vector FMAs in the chain's dtype, or a bfloat16
# unit on bfloat16 weights with a float32 chain (products' inputs rounded to bfloat16, accumulated in float32).
MATRIX_VECTOR = 0
MATRIX_AVX512_BF16 = 1  # AVX512-BF16 dot products (vdpbf16ps)
MATRIX_AMX_BF16 = 2  # AMX tiles (tdpbf16ps)
MATRIX_UNITS = {"vector": MATRIX_VECTOR, "avx512_bf16": MATRIX_AVX512_BF16, "amx_bf16": MATRIX_AMX_BF16}

TABLES = {"activation": ACTIVATIONS, "method": METHODS, "prior": PRIORS, "dtype": DTYPES,
          "matrix_unit": MATRIX_UNITS}
