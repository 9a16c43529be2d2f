// A register-blocked matrix product for feature-major tiles, C (rows x TB) = P . X (cols x TB), where the TB
// columns are a tile of samples (TB = NV vectors) and P a weight matrix packed into panels of MR rows. Not specific
// to any network: the fused MLP chain (csrc/cpu/mlp_chain.cpp) uses it for every layer, forward (W) and backward
// (W^T).
//
// The micro-kernel holds MR x NV vector accumulators in registers (kMaxAccumulators of cpu_simd.h); per k it loads
// NV vectors of X, broadcasts MR weights and issues MR * NV FMAs. A panel's weights are contiguous (MR per k), so
// they stream from L2 while X stays in L1. `product` hands each finished panel of output rows to an epilogue while it
// is still in L1 (activations, residuals, gradient norms: whatever the caller fuses there).
//
// Include only from translation units compiled with -ffp-contract=off (see cpu_math.h).
#ifndef FASTLANGEVIN_CPU_GEMM_H_
#define FASTLANGEVIN_CPU_GEMM_H_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "fastlangevin/cpu_simd.h"

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {

constexpr int kAlign = 64;  // bytes: every tile row starts on a cache line, so aligned vector loads are legal

// An owned, cache-line-aligned array (uninitialised).
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t n) : n_(n) {
    if (n) p_ = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(kAlign)));
  }
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() {
    if (p_) ::operator delete[](p_, std::align_val_t(kAlign));
  }
  T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// n elements rounded up to whole cache lines, so that consecutive sub-arrays of one buffer all start aligned.
template <typename T>
constexpr size_t whole_lines(size_t n) {
  constexpr size_t per_line = kAlign / sizeof(T);
  return (n + per_line - 1) / per_line * per_line;
}

// Output rows per micro-kernel call for a tile of NV vectors.
template <int NV>
constexpr int rows_per_block() {
  return kMaxAccumulators / NV;
}

// C[r * TB + j] = sum_k P[k * MR + r] * X[k * TB + j] for r < MR, j < TB = NV * lanes: one panel of MR output rows
// (P: the packed weights of those rows, MR per k) against the whole tile.
template <typename T, int MR, int NV>
void micro_kernel(const T* __restrict P, const T* __restrict X, int K, T* __restrict C) {
  using S = Vec<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes, TB = NV * L;
  V acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  for (int k = 0; k < K; ++k) {
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = S::load(X + k * TB + v * L);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V w = S::set1(P[k * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(w, x[v], acc[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) S::store(C + r * TB + v * L, acc[r][v]);
}

template <typename T>
using MicroKernel = void (*)(const T*, const T*, int, T*);

// micro_kernel<T, h, NV> for h = 1..MR: a narrow last panel gets a kernel of its own height.
template <typename T, int NV, int... R>
constexpr std::array<MicroKernel<T>, sizeof...(R)> micro_kernels(std::integer_sequence<int, R...>) {
  return {{&micro_kernel<T, R + 1, NV>...}};
}

// A matrix M (rows x cols) packed for C = P . X: panels of `mr` rows (the last one may be narrower); the panel at
// row n0 holds data[n0 * cols + c * h + r] = M(n0 + r, c), h = min(mr, rows - n0).
template <typename T>
struct Packed {
  const T* data;
  int rows, cols, mr;
};

// Panel height for `rows` output rows and micro-kernels of up to max_mr rows: the largest height in
// [2/3 max_mr, max_mr] that divides rows (200 rows: 10 panels of 20 or 20 of 10, no narrow last panel), else max_mr.
inline int panel_rows(int rows, int max_mr) {
  for (int mr = max_mr; 3 * mr >= 2 * max_mr; --mr)
    if (rows % mr == 0) return mr;
  return max_mr;
}

// Packs M (M(r, c) = src[r * rs + c * cs]) into `dst` as Packed describes: the panels i = part, part + parts, ...,
// so that the threads of a call can share the work.
template <typename T>
struct PackJob {
  const T* src;
  int rows, cols;
  int64_t rs, cs;
  int mr;
  T* dst;

  void run(int part, int parts) const {
    for (int n0 = part * mr; n0 < rows; n0 += parts * mr) {
      const int h = std::min(mr, rows - n0);
      T* panel = dst + (int64_t)n0 * cols;
      if (rs == 1) {  // M = W^T: the panel's rows are contiguous in each row of W
        for (int c = 0; c < cols; ++c) std::memcpy(panel + c * h, src + n0 + c * cs, sizeof(T) * h);
      } else {
        for (int r = 0; r < h; ++r) {
          const T* row = src + (n0 + r) * rs;
          for (int c = 0; c < cols; ++c) panel[c * h + r] = row[c * cs];
        }
      }
    }
  }
};

// C (p.rows x TB) = P . X (p.cols x TB); epilogue(n0, h) runs on each finished panel of rows [n0, n0 + h).
template <typename T, int NV, typename Epilogue>
FL_FORCEINLINE void product(const Packed<T>& p, const T* X, T* C, Epilogue&& epilogue) {
  constexpr int MR = rows_per_block<NV>();
  constexpr int TB = NV * Vec<T>::kLanes;
  static constexpr std::array<MicroKernel<T>, MR> kKernels =
      micro_kernels<T, NV>(std::make_integer_sequence<int, MR>());
  for (int n0 = 0; n0 < p.rows; n0 += p.mr) {
    const int h = std::min(p.mr, p.rows - n0);
    kKernels[h - 1](p.data + (int64_t)n0 * p.cols, X, p.cols, C + (int64_t)n0 * TB);
    epilogue(n0, h);
  }
}

// The engine of the fused chain's products (cpu_chain.h) in float32 or float64: the weights packed in the compute
// type, the FMA micro-kernels above. It needs no workspace and no per-thread set-up.
template <typename Tp>
struct VectorEngine {
  using T = Tp;
  using Weight = Tp;
  using Elem = Tp;
  using Panels = Packed<Tp>;
  using PackJob = ::fastlangevin::cpu::PackJob<Tp>;
  struct Scratch {
    Scratch(int /*max_cols*/, int /*TB*/) {}
  };
  struct ThreadScope {};

  static size_t panel_size(int rows, int cols) { return (size_t)rows * cols; }

  // M (rows x cols, M(r, c) = src[r * rs + c * cs]) packed into dst by a job added to `jobs`.
  template <int NV>
  static Panels plan(const T* src, int rows, int cols, int64_t rs, int64_t cs, T* dst, std::vector<PackJob>& jobs) {
    const int mr = panel_rows(rows, rows_per_block<NV>());
    jobs.push_back({src, rows, cols, rs, cs, mr, dst});
    return {dst, rows, cols, mr};
  }

  template <int NV, typename Epilogue>
  static FL_FORCEINLINE void product(const Panels& p, const T* X, T* C, Scratch&, Epilogue&& epilogue) {
    ::fastlangevin::cpu::product<T, NV>(p, X, C, epilogue);
  }
};

}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_GEMM_H_
