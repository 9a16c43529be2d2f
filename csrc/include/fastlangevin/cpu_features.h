// Run-time dispatch of the CPU kernels: the levels, how each is built, how one is chosen, and how to add one.
//
// Levels, lowest first, each a superset of the one before:
//   baseline  module _C         the compiler's default target: -march=x86-64 (SSE2) on x86-64; any CPU elsewhere
//   avx2      module _C_avx2    -march=x86-64-v3: AVX, AVX2, FMA, BMI1, BMI2, F16C, LZCNT, MOVBE (+ x86-64-v2:
//                               SSE3..SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF)
//   avx512    module _C_avx512  -march=x86-64-v4: x86-64-v3 + AVX-512 F, BW, CD, DQ, VL; 512-bit vectors preferred
//
// Build (CMakeLists.txt, "CPU backend"): the kernel sources csrc/cpu/*.cpp are compiled once per level with that
// level's flags, each into its own Python module with the same binding (csrc/python/bind_cpu.cpp, module name and
// level passed as FASTLANGEVIN_CPU_MODULE / FASTLANGEVIN_CPU_LEVEL). Separate modules keep the levels apart with no
// symbol juggling: nothing compiled for AVX-512 is reachable from a module a lesser CPU loads, and the ISA-dependent
// inline code is namespaced by level anyway (cpu_simd.h: FL_ISA_NAMESPACE). The binding and this detection
// (csrc/cpu/cpu_features.cpp) are compiled for the baseline: they run before anything knows what is safe.
// FASTLANGEVIN_NATIVE=1 builds one _C with -march=native instead (level "native"; this machine only, no dispatch).
//
// Choice (fastlangevin/_ext.py, cpu_build(), once per process): load _C, ask it cpu_features() below (cpuid for the
// instruction sets, xgetbv for the OS saving their registers: a CPU with AVX-512 under an OS or hypervisor that does
// not enable the ZMM state must not run it), take the highest level the CPU runs, cap it at FASTLANGEVIN_CPU_LEVEL
// if set, and load that level's module (a level that was not built falls back to the next lower one).
// fl.backend_info() names the module, the level and why; build_info()["cpu"]["cpu_level"] is the level a module
// was compiled for. tests/test_cpu_dispatch.py runs the kernel tests at every level this machine runs and the whole
// build under qemu-x86_64 -cpu Haswell (no AVX-512).
//
// Adding a level (e.g. one for AVX512-BF16/AMX): a CpuLevel value and its name below, its test in cpu_features()
// (the whole -march level, not just the headline extension: the compiler may use any instruction of it), an entry
// FL_LEVEL_<module> in CMakeLists.txt and the module in FL_CPU_LEVEL_MODULES, the module in setup.py's
// CPU_LEVEL_MODULES and fastlangevin/_ext.py's CPU_LEVELS (tests/test_cpu_dispatch.py checks that they agree).
// A translation unit that needs instructions above its module's level only where the CPU has them (a kernel
// variant picked inside one module) compiles with extra flags, defines its own FL_ISA_NAMESPACE, and is called only
// after checking the features it needs: the bfloat16 matrix units, csrc/cpu/mlp_chain_bf16.cpp, are compiled
// (x86-64-v4 + AVX512-BF16 + AMX) into the AVX-512 module only (its std template copies could be linked for the
// whole module; the other modules get the file without the units), and run only after matrix_unit_status
// (csrc/cpu/matrix_units.cpp: level avx512 and avx512_bf16, or amx_bf16, amx_tile and os_amx, from cpu_features()
// here, plus Linux's per-process AMX permission, arch_prctl(ARCH_REQ_XCOMP_PERM)) allowed them.
#ifndef FASTLANGEVIN_CPU_FEATURES_H_
#define FASTLANGEVIN_CPU_FEATURES_H_

namespace fastlangevin {
namespace cpu {

enum CpuLevel { kLevelBaseline = 0, kLevelAvx2 = 1, kLevelAvx512 = 2 };

inline const char* cpu_level_name(int level) {
  return level == kLevelAvx512 ? "avx512" : level == kLevelAvx2 ? "avx2" : "baseline";
}

struct CpuFeatures {
  bool x86_64_v2 = false;  // SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF
  bool avx = false, avx2 = false, fma = false, bmi1 = false, bmi2 = false, f16c = false, lzcnt = false,
       movbe = false;
  bool avx512f = false, avx512bw = false, avx512cd = false, avx512dq = false, avx512vl = false;
  bool avx512_bf16 = false, amx_tile = false, amx_bf16 = false;  // the bfloat16 matrix units (no level of their own)
  bool os_avx = false;     // XCR0 enables the SSE and AVX (YMM) state
  bool os_avx512 = false;  // ... and the AVX-512 opmask and ZMM states
  bool os_amx = false;     // XCR0 enables the AMX tile config and tile data states (Linux still asks a permission)
  int level = kLevelBaseline;  // the highest CpuLevel this CPU has and this OS enables
};

// Read on each call (cpuid and xgetbv, well under a microsecond); on other architectures everything is false and
// the level is baseline.
CpuFeatures cpu_features();

}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_FEATURES_H_
