// CPU feature detection for the run-time dispatch (cpu_features.h). Compiled for the baseline target, like the
// binding: it runs before anything knows which instructions are safe.
#include "fastlangevin/cpu_features.h"

#include <cstdint>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FL_X86_CPUID 1
#endif

namespace fastlangevin {
namespace cpu {

#ifdef FL_X86_CPUID
namespace {

struct Regs {
  uint32_t a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(uint32_t leaf, uint32_t subleaf) {
  Regs r;
  if (!__get_cpuid_count(leaf, subleaf, &r.a, &r.b, &r.c, &r.d)) r = Regs{};  // leaf above the maximum
  return r;
}

bool bit(uint32_t reg, int i) { return (reg >> i) & 1u; }

// XCR0, the register states the OS saves on a context switch (only valid when CPUID.1:ECX.OSXSAVE is set).
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

}  // namespace

CpuFeatures cpu_features() {
  CpuFeatures f;
  const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0), l7s1 = cpuid(7, 1), e1 = cpuid(0x80000001u, 0);
  f.x86_64_v2 = bit(l1.c, 0) && bit(l1.c, 9) && bit(l1.c, 13) && bit(l1.c, 19) && bit(l1.c, 20) && bit(l1.c, 23) &&
                bit(e1.c, 0);
  f.fma = bit(l1.c, 12);
  f.movbe = bit(l1.c, 22);
  f.avx = bit(l1.c, 28);
  f.f16c = bit(l1.c, 29);
  f.bmi1 = bit(l7.b, 3);
  f.avx2 = bit(l7.b, 5);
  f.bmi2 = bit(l7.b, 8);
  f.avx512f = bit(l7.b, 16);
  f.avx512dq = bit(l7.b, 17);
  f.avx512cd = bit(l7.b, 28);
  f.avx512bw = bit(l7.b, 30);
  f.avx512vl = bit(l7.b, 31);
  f.avx512_bf16 = bit(l7s1.a, 5);
  f.amx_bf16 = bit(l7.d, 22);
  f.amx_tile = bit(l7.d, 24);
  f.lzcnt = bit(e1.c, 5);
  if (bit(l1.c, 27)) {  // OSXSAVE: xgetbv is allowed
    const uint64_t xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;             // SSE (bit 1) and AVX (bit 2) state
    f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7)
    f.os_amx = (xcr0 & 0x60000) == 0x60000;           // XTILECFG (17), XTILEDATA (18)
  }
  const bool v3 = f.x86_64_v2 && f.avx && f.avx2 && f.fma && f.bmi1 && f.bmi2 && f.f16c && f.lzcnt && f.movbe &&
                  f.os_avx;
  const bool v4 = v3 && f.avx512f && f.avx512bw && f.avx512cd && f.avx512dq && f.avx512vl && f.os_avx512;
  f.level = v4 ? kLevelAvx512 : v3 ? kLevelAvx2 : kLevelBaseline;
  return f;
}

#else

CpuFeatures cpu_features() { return CpuFeatures{}; }

#endif

}  // namespace cpu
}  // namespace fastlangevin
