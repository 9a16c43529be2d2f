// Whether a bfloat16 matrix unit can run here (mlp_chain.h: matrix_unit_status): compiled in, present in the CPU
// and its register state enabled by the OS (cpu_features(): cpuid and xgetbv), and for AMX the tile data permission
// that Linux grants a process on request (arch_prctl ARCH_REQ_XCOMP_PERM, since 5.16). Compiled like the other
// kernels, not with the bfloat16 flags: it runs before anything knows that they are safe. The bfloat16 kernels are
// compiled for the AVX-512 level (x86-64-v4) plus their own instructions, so the whole level is checked too.
#include <string>

#include "fastlangevin/codes.h"
#include "fastlangevin/cpu_features.h"
#include "fastlangevin/cpu_matrix_units.h"
#include "fastlangevin/mlp_chain.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FL_X86_64 1
#endif
#if defined(FL_X86_64) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#define FL_LINUX_XCOMP 1
#endif

namespace fastlangevin {
namespace cpu {
namespace {

#ifdef FL_X86_64
// What the CPU and OS offer the bfloat16 kernels: "" or why not, per unit (before the AMX permission).
struct Offer {
  std::string avx512_bf16, amx_bf16;
};

Offer cpu_offer() {
  const CpuFeatures f = cpu_features();
  Offer o;
  if (f.level < kLevelAvx512) {
    o.avx512_bf16 = o.amx_bf16 = "this CPU or OS lacks the AVX-512 level (x86-64-v4) the bfloat16 kernels build on";
    return o;
  }
  if (!f.avx512_bf16) o.avx512_bf16 = "this CPU has no AVX512-BF16 (cpuid leaf 7.1 EAX bit 5)";
  if (!(f.amx_bf16 && f.amx_tile))
    o.amx_bf16 = "this CPU has no AMX-BF16 tiles (cpuid leaf 7 EDX bits 22, 24)";
  else if (!f.os_amx)
    o.amx_bf16 = "the OS does not enable the AMX tile state (XCR0 bits 17, 18)";
  else if (!o.avx512_bf16.empty())  // the AMX engine converts X with AVX512-BF16 instructions
    o.amx_bf16 = o.avx512_bf16;
  return o;
}

// "" when this process may use the tile data registers, else why not. Linux >= 5.16 grants them on request;
// an older kernel without the request saves the tile state for every process that XCR0 enables it for.
std::string tile_permission() {
#ifdef FL_LINUX_XCOMP
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0) return "";
  if (errno == EINVAL) return "";  // a kernel from before the request: XCR0 already enables the state
  return "Linux refused the AMX tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM: errno " +
         std::to_string(errno) + ")";
#else
  return "";
#endif
}
#endif  // FL_X86_64

}  // namespace

bool matrix_unit_compiled(int matrix_unit) {
  switch (matrix_unit) {
    case kMatrixVector: return true;
#ifdef FL_BF16_UNIT_AVX512BF16
    case kMatrixAvx512Bf16: return true;
#endif
#ifdef FL_BF16_UNIT_AMX
    case kMatrixAmxBf16: return true;
#endif
    default: return false;
  }
}

std::string matrix_unit_status(int matrix_unit) {
  if (matrix_unit == kMatrixVector) return "";
  if (matrix_unit != kMatrixAvx512Bf16 && matrix_unit != kMatrixAmxBf16)
    return "unknown matrix unit " + std::to_string(matrix_unit);
  const char* name = matrix_unit == kMatrixAmxBf16 ? "AMX-BF16" : "AVX512-BF16";
  if (!matrix_unit_compiled(matrix_unit))
    return std::string("the ") + name + " kernels are not in this module (they are built into the AVX-512 level's " +
           "module only, by a compiler that knows " +
           (matrix_unit == kMatrixAmxBf16 ? "-mamx-tile -mamx-bf16" : "-mavx512bf16") + ", on x86-64)";
#ifdef FL_X86_64
  static const Offer offer = cpu_offer();
  if (matrix_unit == kMatrixAvx512Bf16) return offer.avx512_bf16;
  if (!offer.amx_bf16.empty()) return offer.amx_bf16;
  static const std::string permission = tile_permission();  // asked once per process (thread-safe static)
  return permission;
#else
  return std::string(name) + " needs an x86-64 CPU";
#endif
}

}  // namespace cpu
}  // namespace fastlangevin
