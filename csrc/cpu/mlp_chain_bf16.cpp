// The fused chain with bfloat16 matrix units (cpu_bf16.h): AMX tiles and AVX512-BF16 dot products. This file alone
// is compiled with -mavx512bf16 (and -mamx-tile -mamx-bf16) on top of the AVX-512 level (CMakeLists.txt, which also
// defines FL_BF16_UNIT_AVX512BF16 / FL_BF16_UNIT_AMX for the units it compiled), and nothing in it runs before
// matrix_unit_status (csrc/cpu/matrix_units.cpp, built like the other kernels) has allowed the unit. Its inline
// functions get their own ISA namespace, so none of them can stand in for another file's copy at link time.
#define FL_ISA_NAMESPACE isa_bf16_units

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu_matrix_units.h"

#if defined(FL_BF16_UNIT_AVX512BF16)
#if !defined(__AVX512BF16__) || !defined(__AVX512BW__) || (defined(FL_BF16_UNIT_AMX) && !defined(__AMX_BF16__))
#error "CMakeLists.txt defines FL_BF16_UNIT_* only with the flags of those units"
#endif
#include "fastlangevin/cpu_bf16.h"
#include "fastlangevin/cpu_chain.h"
#endif

namespace fastlangevin {
namespace cpu {

void mlp_chain_bf16(const MLPChainArgs& a) {
#ifdef FL_BF16_UNIT_AMX
  if (a.matrix_unit == kMatrixAmxBf16) return chain::run_chain<bf16::AmxEngine>(a);
#endif
#ifdef FL_BF16_UNIT_AVX512BF16
  if (a.matrix_unit == kMatrixAvx512Bf16) return chain::run_chain<bf16::Avx512Bf16Engine>(a);
#endif
  (void)a;  // not reached: check_mlp_chain_args refuses a unit that is not compiled in
}

}  // namespace cpu
}  // namespace fastlangevin
