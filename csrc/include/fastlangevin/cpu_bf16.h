// The bfloat16 engines of the fused chain's layer products (the Engine of cpu_chain.h): C (rows x TB, float32) =
// P (rows x cols, bfloat16 weights) . X (cols x TB), with X rounded to bfloat16 and the products accumulated in
// float32. Everything around the products (activations, the energy, the gradient's norm, prior, noise, update)
// stays float32.
//
//   AmxEngine        AMX tiles: _tile_dpbf16ps on 16 x 32 weight blocks and 32-row x 16-sample blocks of X.
//   Avx512Bf16Engine AVX512-BF16: _mm512_dpbf16_ps, the register-blocked micro-kernel of cpu_gemm.h with a pair of
//                    bfloat16 weights broadcast per step instead of one float.
//
// Where bfloat16 rounding happens. The weights arrive bfloat16 (the caller rounded them once, e.g. torch.autocast)
// and are packed once per chain. The activations and deltas that feed a product are float32 tile rows; the product
// rounds them to bfloat16 (to nearest even, _mm512_cvtne2ps_pbh) into a VNNI-paired copy as it starts: pair row p of
// X holds, per sample n, the two bfloat16 values X(2p, n) and X(2p + 1, n) in one 32-bit word, which is both the
// B operand layout of _tile_dpbf16ps (K/2 rows of 16 samples x 2) and the operand of _mm512_dpbf16_ps. Pair rows
// past cols are zero, so the padding of the inner dimension adds nothing (the packed weights are zero there too).
//
// Both instructions flush bfloat16 denormals to zero and round each float32 accumulation to nearest even.
//
// Include only from a translation unit compiled with -mavx512bf16 (and -mamx-tile -mamx-bf16 for AmxEngine) on top
// of the AVX-512 level, and call it only where matrix_unit_status says the unit runs.
#ifndef FASTLANGEVIN_CPU_BF16_H_
#define FASTLANGEVIN_CPU_BF16_H_

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "fastlangevin/cpu_gemm.h"
#include "fastlangevin/cpu_simd.h"

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "cpu_bf16.h needs -mavx512bf16 on top of the AVX-512 level"
#endif

namespace fastlangevin {
namespace cpu {
inline namespace FL_ISA_NAMESPACE {
namespace bf16 {

using Bits = uint16_t;  // a bfloat16 as its bits (the upper half of a float32)

FL_FORCEINLINE float to_float(Bits b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int kLanes = 16;  // float32 lanes of a vector: samples per row block of X

// xv (pairs x TB words) = X (cols x TB floats, feature-major) rounded to bfloat16 and paired: word n of pair row p
// is bf16(X(2p, n)) | bf16(X(2p + 1, n)) << 16, zero past cols.
template <int TB>
FL_FORCEINLINE void pair_rows(const float* __restrict X, int cols, int pairs, uint32_t* __restrict xv) {
  // _mm512_cvtne2ps_pbh(b, a) puts a's 16 values in the low half, b's in the high half; this permutation then
  // interleaves them into (a_n, b_n) pairs.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int full = cols / 2;
  for (int p = 0; p < full; ++p) {
    const float* lo = X + (int64_t)(2 * p) * TB;
    const float* hi = lo + TB;
    uint32_t* out = xv + (int64_t)p * TB;
#pragma GCC unroll 4
    for (int n = 0; n < TB; n += kLanes) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_load_ps(hi + n), _mm512_load_ps(lo + n));
      _mm512_store_si512(out + n, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
  }
  int p = full;
  if (cols % 2) {  // the last row pairs with zero
    const float* lo = X + (int64_t)(cols - 1) * TB;
    uint32_t* out = xv + (int64_t)p * TB;
    for (int n = 0; n < TB; n += kLanes) {
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_load_ps(lo + n));
      _mm512_store_si512(out + n, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
    ++p;
  }
  if (p < pairs) std::memset(xv + (int64_t)p * TB, 0, sizeof(uint32_t) * (size_t)(pairs - p) * TB);
}

// A product's workspace: the paired copy of X (AMX: padded to whole 16-pair blocks) and, for AMX, one block of
// output rows for a block that ends past the output's last row.
struct Scratch {
  AlignedBuffer<uint32_t> xv;
  AlignedBuffer<float> staging;
  Scratch(int max_cols, int TB) : xv((size_t)(max_cols + 31) / 32 * 16 * TB), staging((size_t)48 * TB) {}
};

// ---- AVX512-BF16 ---------------------------------------------------------------------------------------------

// C[r * TB + j] = sum_p dot(P[p * MR + r], xv[p * TB + j]) for r < MR: as cpu_gemm.h's micro_kernel, with a pair of
// bfloat16 weights (one 32-bit word) broadcast per pair row and two multiply-adds per lane per instruction.
template <int MR, int NV>
void dot_micro_kernel(const uint32_t* __restrict P, const uint32_t* __restrict xv, int pairs, float* __restrict C) {
  constexpr int TB = NV * kLanes;
  __m512 acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    __m512bh x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = (__m512bh)_mm512_load_si512(xv + (int64_t)p * TB + v * kLanes);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32((int)P[p * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w, x[v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_store_ps(C + r * TB + v * kLanes, acc[r][v]);
}

using DotKernel = void (*)(const uint32_t*, const uint32_t*, int, float*);

template <int NV, int... R>
constexpr std::array<DotKernel, sizeof...(R)> dot_kernels(std::integer_sequence<int, R...>) {
  return {{&dot_micro_kernel<R + 1, NV>...}};
}

// M (rows x cols) in panels of `mr` rows of bfloat16 pairs: the panel at row n0 holds
// data[n0 * pairs + p * h + r] = M(n0 + r, 2p) | M(n0 + r, 2p + 1) << 16 (zero past cols), h = min(mr, rows - n0).
struct PairPanels {
  const uint32_t* data;
  int rows, cols, pairs, mr;
};

struct PairPackJob {
  const Bits* src;  // M(r, c) = src[r * rs + c * cs]
  int rows, cols;
  int64_t rs, cs;
  int mr;
  uint32_t* dst;

  void run(int part, int parts) const {
    const int pairs = (cols + 1) / 2;
    for (int n0 = part * mr; n0 < rows; n0 += parts * mr) {
      const int h = std::min(mr, rows - n0);
      uint32_t* panel = dst + (int64_t)n0 * pairs;
      for (int p = 0; p < pairs; ++p)
        for (int r = 0; r < h; ++r) {
          const Bits* row = src + (n0 + r) * rs;
          const uint32_t lo = row[2 * p * cs];
          const uint32_t hi = 2 * p + 1 < cols ? row[(2 * p + 1) * cs] : 0u;
          panel[p * h + r] = lo | hi << 16;
        }
    }
  }
};

struct Avx512Bf16Engine {
  using T = float;
  using Weight = Bits;
  using Elem = uint32_t;
  using Panels = PairPanels;
  using PackJob = PairPackJob;
  using Scratch = bf16::Scratch;
  struct ThreadScope {};

  static float to_compute(Bits b) { return to_float(b); }
  static size_t panel_size(int rows, int cols) { return (size_t)rows * ((cols + 1) / 2); }

  template <int NV>
  static Panels plan(const Bits* src, int rows, int cols, int64_t rs, int64_t cs, uint32_t* dst,
                     std::vector<PackJob>& jobs) {
    const int mr = panel_rows(rows, rows_per_block<NV>());
    jobs.push_back({src, rows, cols, rs, cs, mr, dst});
    return {dst, rows, cols, (cols + 1) / 2, mr};
  }

  template <int NV, typename Epilogue>
  static FL_FORCEINLINE void product(const Panels& p, const float* X, float* C, Scratch& scratch,
                                     Epilogue&& epilogue) {
    constexpr int MR = rows_per_block<NV>();
    constexpr int TB = NV * kLanes;
    static constexpr std::array<DotKernel, MR> kKernels = dot_kernels<NV>(std::make_integer_sequence<int, MR>());
    pair_rows<TB>(X, p.cols, p.pairs, scratch.xv.data());
    for (int n0 = 0; n0 < p.rows; n0 += p.mr) {
      const int h = std::min(p.mr, p.rows - n0);
      kKernels[h - 1](p.data + (int64_t)n0 * p.pairs, scratch.xv.data(), p.pairs, C + (int64_t)n0 * TB);
      epilogue(n0, h);
    }
  }
};

// ---- AMX -----------------------------------------------------------------------------------------------------

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

// Every tile register is 16 rows x 64 bytes: a float32 accumulator block (16 output rows x 16 samples), a block of
// weights (16 output rows x 32 bfloat16 of the inner dimension) or a block of paired X (16 pair rows x 16 samples).
constexpr int kTileRows = 16;  // output rows per tile, pair rows per X block
constexpr int kTileK = 32;     // inner-dimension values per weight block

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// M (rows x cols) in 16 x 32 blocks of bfloat16, zero-padded to whole blocks: block (mb, kb) holds
// data[((mb * kblocks + kb) * 16 + r) * 32 + k] = M(16 mb + r, 32 kb + k), a 1 KB tile with 64-byte rows.
struct TilePanels {
  const Bits* data;
  int rows, cols, mblocks, kblocks;
};

struct TilePackJob {
  const Bits* src;  // M(r, c) = src[r * rs + c * cs]
  int rows, cols;
  int64_t rs, cs;
  Bits* dst;

  void run(int part, int parts) const {
    const int mblocks = (rows + kTileRows - 1) / kTileRows, kblocks = (cols + kTileK - 1) / kTileK;
    for (int mb = part; mb < mblocks; mb += parts)
      for (int kb = 0; kb < kblocks; ++kb) {
        Bits* block = dst + ((int64_t)mb * kblocks + kb) * kTileRows * kTileK;
        for (int r = 0; r < kTileRows; ++r)
          for (int k = 0; k < kTileK; ++k) {
            const int row = mb * kTileRows + r, col = kb * kTileK + k;
            block[r * kTileK + k] = row < rows && col < cols ? src[row * rs + col * cs] : Bits(0);
          }
      }
  }
};

// The tile instructions on registers named by template arguments. (GCC's _tile_* macros paste their register
// argument into the assembly text, so it must be a literal; and its tileloadd does not tell the compiler that it
// reads memory, which would let the stores filling that memory move past it.)
template <int Tile>
FL_FORCEINLINE void tile_zero() {
  __asm__ volatile("tilezero\t%%tmm%c0" ::"i"(Tile));
}
template <int Tile>
FL_FORCEINLINE void tile_load(const void* base, int64_t stride) {
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm%c2|tileloadd\t%%tmm%c2, [%0+%1*1]}" ::"r"(base), "r"(stride),
                   "i"(Tile)
                   : "memory");
}
template <int Tile>
FL_FORCEINLINE void tile_store(void* base, int64_t stride) {
  __asm__ volatile("{tilestored\t%%tmm%c2, (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm%c2}" ::"r"(base), "r"(stride),
                   "i"(Tile)
                   : "memory");
}
// C += A . B: C (16 x 16 float32) += A (16 x 32 bfloat16) times B (16 pair rows x 16 columns of bfloat16 pairs).
template <int C, int A, int B>
FL_FORCEINLINE void tile_dot() {
  __asm__ volatile("{tdpbf16ps\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps\t%%tmm%c0, %%tmm%c1, %%tmm%c2}" ::"i"(C),
                   "i"(A), "i"(B));
}

// Calls fn(std::integral_constant<int, I>()) for I = 0 .. N-1: tile register numbers must be compile-time constants.
// The lambdas passed are forced inline too (GCC leaves some out of line otherwise, a call per tile instruction).
#if defined(__GNUC__) || defined(__clang__)
#define FL_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FL_LAMBDA_INLINE
#endif
template <int N, typename Fn, int... I>
FL_FORCEINLINE void unrolled(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>()), ...);
}
template <int N, typename Fn>
FL_FORCEINLINE void unrolled(Fn&& fn) {
  unrolled<N>(fn, std::make_integer_sequence<int, N>());
}

// Accumulates MB x NB output tiles, registers 0 .. MB*NB - 1 (tile i * NB + j: rows 16 (mb0 + i), samples 16 j),
// over the whole inner dimension: per 32-value step, NB blocks of X (registers 4 + MB ..) and MB blocks of weights
// (registers 4 ..); MB * NB <= 4 and MB + NB <= 4. `mbs` <= MB blocks are real (the others are not computed).
template <int MB, int NB>
FL_FORCEINLINE void tile_block(const TilePanels& p, int mb0, int mbs, const uint32_t* xv, int TB) {
  static_assert(MB * NB <= 4 && MB + NB <= 4, "8 tile registers");
  unrolled<MB * NB>([&](auto c) FL_LAMBDA_INLINE { tile_zero<decltype(c)::value>(); });
  const int64_t block = (int64_t)kTileRows * kTileK;
  for (int kb = 0; kb < p.kblocks; ++kb) {
    unrolled<NB>([&](auto j) FL_LAMBDA_INLINE {
      tile_load<4 + MB + decltype(j)::value>(xv + (int64_t)kb * kTileRows * TB + decltype(j)::value * kLanes,
                                             TB * (int64_t)sizeof(uint32_t));
    });
    unrolled<MB>([&](auto i) FL_LAMBDA_INLINE {
      constexpr int I = decltype(i)::value;
      if (I < mbs) {
        tile_load<4 + I>(p.data + ((int64_t)(mb0 + I) * p.kblocks + kb) * block, kTileK * (int64_t)sizeof(Bits));
        unrolled<NB>([&](auto j) FL_LAMBDA_INLINE {
          constexpr int J = decltype(j)::value;
          tile_dot<I * NB + J, 4 + I, 4 + MB + J>();
        });
      }
    });
  }
}

// Stores accumulator tile C (rows 16 i, samples 16 j of the block) to `out` (row stride TB floats).
template <int MB, int NB>
FL_FORCEINLINE void store_block(float* out, int mbs, int TB) {
  unrolled<MB>([&](auto i) FL_LAMBDA_INLINE {
    constexpr int I = decltype(i)::value;
    if (I < mbs)
      unrolled<NB>([&](auto j) FL_LAMBDA_INLINE {
        constexpr int J = decltype(j)::value;
        tile_store<I * NB + J>(out + (int64_t)I * kTileRows * TB + J * kLanes, TB * (int64_t)sizeof(float));
      });
  });
}

struct AmxEngine {
  using T = float;
  using Weight = Bits;
  using Elem = Bits;
  using Panels = TilePanels;
  using PackJob = TilePackJob;
  using Scratch = bf16::Scratch;

  // The tile configuration of the thread while it runs tiles (tile state is per thread), released after.
  struct ThreadScope {
    ThreadScope() {
      TileConfig config;
      for (int t = 0; t < 8; ++t) {
        config.rows[t] = kTileRows;
        config.colsb[t] = 64;
      }
      _tile_loadconfig(&config);
    }
    ~ThreadScope() { _tile_release(); }
    ThreadScope(const ThreadScope&) = delete;
    ThreadScope& operator=(const ThreadScope&) = delete;
  };

  static float to_compute(Bits b) { return to_float(b); }
  static size_t panel_size(int rows, int cols) {
    return (size_t)(rows + kTileRows - 1) / kTileRows * kTileRows * ((cols + kTileK - 1) / kTileK * kTileK);
  }

  template <int NV>
  static Panels plan(const Bits* src, int rows, int cols, int64_t rs, int64_t cs, Bits* dst,
                     std::vector<PackJob>& jobs) {
    jobs.push_back({src, rows, cols, rs, cs, dst});
    return {dst, rows, cols, (rows + kTileRows - 1) / kTileRows, (cols + kTileK - 1) / kTileK};
  }

  // Blocks of MB x 16 output rows: 32 rows x 32 samples (2 x 2 tiles) for two-vector tiles, 48 rows x 16 samples
  // (3 x 1) for one-vector tiles. A block that ends past the last row goes through scratch.staging.
  template <int NV, typename Epilogue>
  static FL_FORCEINLINE void product(const Panels& p, const float* X, float* C, Scratch& scratch,
                                     Epilogue&& epilogue) {
    constexpr int TB = NV * kLanes;
    constexpr int NB = NV, MB = NV == 1 ? 3 : 2;
    static_assert(NV == 1 || NV == 2, "AmxEngine: tiles of 16 or 32 samples");
    uint32_t* xv = scratch.xv.data();
    pair_rows<TB>(X, p.cols, p.kblocks * kTileRows, xv);
    for (int mb0 = 0; mb0 < p.mblocks; mb0 += MB) {
      const int mbs = std::min(MB, p.mblocks - mb0);
      const int n0 = mb0 * kTileRows, h = std::min(mbs * kTileRows, p.rows - n0);
      tile_block<MB, NB>(p, mb0, mbs, xv, TB);
      float* out = C + (int64_t)n0 * TB;
      if (h == mbs * kTileRows) {
        store_block<MB, NB>(out, mbs, TB);
      } else {
        store_block<MB, NB>(scratch.staging.data(), mbs, TB);
        std::memcpy(out, scratch.staging.data(), sizeof(float) * (size_t)h * TB);
      }
      epilogue(n0, h);
    }
  }
};

#endif  // __AMX_TILE__ && __AMX_BF16__

}  // namespace bf16
}  // namespace FL_ISA_NAMESPACE
}  // namespace cpu
}  // namespace fastlangevin

#endif  // FASTLANGEVIN_CPU_BF16_H_
