// The bfloat16 matrix units of the CPU backend, as the rest of it sees them. Their kernels live in their own
// translation unit, csrc/cpu/mlp_chain_bf16.cpp, compiled with -mamx-tile -mamx-bf16 -mavx512bf16 on top of the
// AVX-512 level; nothing in it may run before matrix_unit_status (csrc/cpu/matrix_units.cpp, compiled like the
// other kernels) has said that this CPU, its OS and the kernel's permission allow the unit.
#ifndef FASTLANGEVIN_CPU_MATRIX_UNITS_H_
#define FASTLANGEVIN_CPU_MATRIX_UNITS_H_

#include "fastlangevin/mlp_chain.h"

namespace fastlangevin {
namespace cpu {

// Whether the build compiled the kernels of `matrix_unit` (the compiler knew its instructions): CMakeLists.txt's
// FL_BF16_UNIT_* definitions. Defined in csrc/cpu/matrix_units.cpp.
bool matrix_unit_compiled(int matrix_unit);

// The chain with a bfloat16 matrix unit (args.matrix_unit, whose matrix_unit_status is "").
void mlp_chain_bf16(const MLPChainArgs& args);

}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_MATRIX_UNITS_H_
