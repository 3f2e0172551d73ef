// CPU kernels for decode-sized forwards (a few token rows: decode batches, Medusa trees).
//
// Decode is bound by how fast the weights stream from memory, and, for small models, by how many
// operators Python dispatches per layer. So there are two kinds of kernel here:
//   - small_batch_linear: y = x W^T (+ b) that streams W from memory once for any number of token
//     rows, with a register-blocked micro-kernel over (weight rows x token rows); rms_norm; and the
//     Medusa drafts: every head's residual blocks, vocabulary projection and top-k in one call;
//   - the two halves of a decoder layer around attention, each one call:
//       attention_input:  RMSNorm -> packed q/k/v projection (+ bias) -> rotary on q and k;
//       attention_output: o_proj + residual -> RMSNorm -> gate/up -> SiLU(gate) * up -> down + residual;
//     each projection adds its per-token LoRA delta when the step has LoRA rows (a mixed batch is one call).
// All arithmetic is fp32; weights are fp32, bf16 or fp16, or quantized blocks (quant.h: a uint8 [out, row bytes]
// tensor and its ggml type, given in a call's qtypes); activations come and go in the model's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "quant.h"
#include "vec_math.h"

namespace {

typedef int i32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }

// Lane sums of 16 accumulators, as one vector (lane i = the sum of acc[i]). Each step adds pairs of
// vectors' halves, so 15 shuffle-pairs replace 16 separate horizontal reductions.
inline f32x16 fold(f32x16 a, f32x16 b, i32x16 lo, i32x16 hi) {
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

inline f32x16 lane_sums(const f32x16 (&acc)[16]) {
  const i32x16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const i32x16 hi8 = lo8 + 8;
  const i32x16 lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const i32x16 hi4 = lo4 + 4;
  const i32x16 lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const i32x16 hi2 = lo2 + 2;
  const i32x16 lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i32x16 hi1 = lo1 + 1;
  f32x16 v8[8], v4[4], v2[2];
  for (int i = 0; i < 8; ++i) v8[i] = fold(acc[2 * i], acc[2 * i + 1], lo8, hi8);  // 8 partial sums each
  for (int i = 0; i < 4; ++i) v4[i] = fold(v8[2 * i], v8[2 * i + 1], lo4, hi4);   // 4 each
  for (int i = 0; i < 2; ++i) v2[i] = fold(v4[2 * i], v4[2 * i + 1], lo2, hi2);   // 2 each
  return fold(v2[0], v2[1], lo1, hi1);
}

// y[m, n] = x[m] . w[n] (+ bias[n]) for MB token rows and weight rows [n_begin, n_end), 16 / MB weight
// rows at a time: 16 vector accumulators, one per (weight row, token row), summed over K in registers.
// rows < MB repeats the last token row (its results are not written).
template <int MB, typename W>
void gemv_block(int64_t rows, const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N,
                int64_t n_begin, int64_t n_end) {
  constexpr int NB = 16 / MB;
  const int64_t K_vec = K - K % kLanes;
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) xs[m] = x + std::min<int64_t>(m, rows - 1) * K;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NB) {
    const W* ws[NB];  // past the end, repeat the last row (its results are not written)
    for (int j = 0; j < NB; ++j) ws[j] = w + std::min(n0 + j, n_end - 1) * K;
    f32x16 acc[16] = {};
    for (int64_t k = 0; k < K_vec; k += kLanes) {
      f32x16 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = load16(xs[m] + k);
      for (int j = 0; j < NB; ++j) {
        const f32x16 wv = load16(ws[j] + k);
        for (int m = 0; m < MB; ++m) acc[j * MB + m] += wv * xv[m];
      }
    }
    const f32x16 sums = lane_sums(acc);
    for (int j = 0; j < NB && n0 + j < n_end; ++j) {
      for (int m = 0; m < rows; ++m) {
        float sum = sums[j * MB + m] + (bias ? bias[n0 + j] : 0.f);
        for (int64_t k = K_vec; k < K; ++k) sum += to_float(ws[j][k]) * xs[m][k];
        y[m * N + n0 + j] = sum;
      }
    }
  }
}

// y[M, N] = x[M, K] w[N, K]^T (+ bias), fp32 x and y. Token rows go in chunks of 4 over a cache-sized
// block of weight rows, so the weights stream from memory once whatever M is.
template <typename W>
void gemv(int64_t M, const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W));
  // ~64 KiB of weights per task: big enough to amortise scheduling, small enough to balance threads
  const int64_t grain = std::max<int64_t>(16, (64 * 1024) / row_bytes / 16 * 16);
  // weight rows per pass when there are several chunks of token rows: the later chunks find them in L1
  const int64_t block = std::max<int64_t>(16, (16 * 1024) / row_bytes / 16 * 16);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += block) {
      const int64_t n1 = std::min(end, n0 + block);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rows = std::min<int64_t>(4, M - m0);
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        if (rows == 1) gemv_block<1>(rows, xm, w, bias, ym, K, N, n0, n1);
        else if (rows == 2) gemv_block<2>(rows, xm, w, bias, ym, K, N, n0, n1);
        else gemv_block<4>(rows, xm, w, bias, ym, K, N, n0, n1);
      }
    }
  });
}

// Float weights packed for decode (repack_float): groups of 16 weight rows with lane r = row r of the
// group, so a group is one sequential run of memory. Rows interleaved in the file's layout are 16 short
// streams per step, which the hardware prefetchers pick up too late: a 576-wide bf16 model streamed at a
// third of the bandwidth a packed one does. fp32 and fp16: [N / 16, K, 16]; bf16: [N / 16, K / 2, 16, 2], a lane
// holding one row's pair of consecutive weights (the even one in its low half).
constexpr int64_t kGroupRows = quant::kGroupRows;  // (one grouping for both layouts: weight_rows reads either)
// Token rows one pass of a group's weights serves: 2 chains of each take 16 of AVX-512's 32 registers;
// AVX2 has 16 half-width ones.
#ifdef __AVX512F__
constexpr int kPackedTokenRows = 8;
#else
constexpr int kPackedTokenRows = 2;
#endif
// bf16 weights take x as bf16 pairs into vdpbf16ps where the CPU has it (AVX512-BF16)
#ifdef __AVX512BF16__
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// The packed kernels' vector (vec_math.h's Vec): a group's 16 lanes in one AVX-512 register, else in two native
// 8-lane ones
#ifdef __AVX512F__
typedef u32x16 UVec;
#else
typedef uint32_t UVec __attribute__((vector_size(32)));
#endif
constexpr int kVecs = kGroupRows / kVecLanes;

inline Vec broadcast(const float& v) {
#ifdef __AVX512F__  // (from memory: a load, where the generic vector's broadcast takes a shuffle as well)
  return _mm512_set1_ps(v);
#elif defined(__AVX__)
  return reinterpret_cast<Vec>(_mm256_set1_ps(v));
#else
  return Vec{} + v;
#endif
}

// Inputs per element of the token rows as packed_gemv hands them over: fp32 values, or bf16 pairs (vdpbf16ps)
template <typename X>
constexpr int64_t kInputsPer = std::is_same_v<X, float> ? 1 : 2;

// y[m, 16(g + j) .. 16(g + j) + 15] for the MB token rows at x (rows < MB repeats the last one; not written)
// and the G groups from g (`group`, then every group_size elements). Each output sums its products in 2
// chains (alternate inputs, or pairs of them), whatever MB and G are: a row's result never depends on the
// other rows of the call, nor on the tile that computes it.
// Float weights: the cache line kFloatPrefetchAhead bytes on is prefetched as each one is read (see quant.h's
// kPrefetchAhead). SmolLM2's linears from DRAM, 2-core Xeon: bf16 at 5 token rows 2.0x -> 1.3x the time of one
// row, fp32 1.6x -> 1.2x; one row 1.0x-1.15x faster. 4 KiB did worse for bf16 at one row.
constexpr int64_t kFloatPrefetchAhead = 2048;
template <int G, int MB, typename W, typename X>
void packed_tile(int64_t rows, const X* x, const W* group, int64_t group_size, const float* bias, float* y,
                 int64_t K, int64_t N, int64_t n0) {
  const X* xs[MB];
  for (int m = 0; m < MB; ++m) xs[m] = x + std::min<int64_t>(m, rows - 1) * (K / kInputsPer<X>);
  Vec acc[G][MB][2][kVecs];  // (constant indices below, so the chains stay in registers)
  for (int j = 0; j < G; ++j)  // (not `= {}`: GCC zeroes such an array in memory with a call to memset)
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < 2; ++c)
        for (int v = 0; v < kVecs; ++v) acc[j][m][c][v] = Vec{};
  if constexpr (!std::is_same_v<W, at::BFloat16>) {  // fp32 or fp16: one weight per lane
    const auto step = [&](int64_t k, int c) {
      Vec w[G][kVecs];
      for (int j = 0; j < G; ++j) {
        if ((k * kGroupRows * sizeof(W)) % 64 == 0)  // once a cache line
          quant::prefetch_ahead<kFloatPrefetchAhead>(group + j * group_size + k * kGroupRows, 1);
        for (int v = 0; v < kVecs; ++v) w[j][v] = load_vec(group + j * group_size + k * kGroupRows + v * kVecLanes);
      }
      for (int m = 0; m < MB; ++m) {
        const Vec xv = broadcast(xs[m][k]);
        for (int j = 0; j < G; ++j)
          for (int v = 0; v < kVecs; ++v) acc[j][m][c][v] += w[j][v] * xv;
      }
    };
    for (int64_t k = 0; k + 1 < K; k += 2) step(k, 0), step(k + 1, 1);
    if (K % 2) step(K - 1, 0);
  } else {
#ifdef __AVX512BF16__
    const auto pair = [&](int64_t k, int c) {  // inputs k and k + 1 (k even): one vdpbf16ps into chain c
      __m512bh w[G];
      for (int j = 0; j < G; ++j) {
        quant::prefetch_ahead<kFloatPrefetchAhead>(group + j * group_size + k * kGroupRows, 1);
        w[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(group + j * group_size + k * kGroupRows));
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(xs[m][k / 2]));
        for (int j = 0; j < G; ++j) acc[j][m][c][0] = _mm512_dpbf16_ps(acc[j][m][c][0], w[j], xv);
      }
    };
    for (int64_t k = 0; k + 3 < K; k += 4) pair(k, 0), pair(k + 2, 1);
    if (K % 4) pair(K - 2, 0);  // K is even (repack_float)
#else
    for (int64_t k = 0; k < K; k += 2) {  // inputs k (the even chain) and k + 1 (the odd one)
      for (int j = 0; j < G; ++j) {
        for (int v = 0; v < kVecs; ++v) {
          UVec bits;  // the lanes' (even, odd) pairs
          if (v == 0)  // (a cache line per k)
            quant::prefetch_ahead<kFloatPrefetchAhead>(group + j * group_size + k * kGroupRows, 1);
          std::memcpy(&bits, group + j * group_size + k * kGroupRows + 2 * v * kVecLanes, sizeof(bits));
          const Vec even = reinterpret_cast<Vec>(bits << 16), odd = reinterpret_cast<Vec>(bits & 0xFFFF0000u);
          for (int m = 0; m < MB; ++m) {
            acc[j][m][0][v] += even * broadcast(xs[m][k]);
            acc[j][m][1][v] += odd * broadcast(xs[m][k + 1]);
          }
        }
      }
    }
#endif
  }
  for (int j = 0; j < G; ++j) {
    for (int m = 0; m < rows; ++m) {
      for (int v = 0; v < kVecs; ++v) {
        const int64_t n = n0 + j * kGroupRows + v * kVecLanes;
        const Vec sum = acc[j][m][0][v] + acc[j][m][1][v] + (bias ? load_vec(bias + n) : Vec{});
        std::memcpy(y + m * N + n, &sum, sizeof(sum));
      }
    }
  }
}

// packed_tile's two chains of one group of fp32 weights in turn, over each span of kTurnInputs inputs: the
// same products summed in the same order (so the same bits) with half the accumulators live at a time. On
// AVX2 (16 registers of 8 lanes) that lets 6 token rows share each weight loaded from L2 where packed_tile
// fits 2: its loads from L2 bound it at many token rows. A span's weights stay in L1 for the second chain.
// (bf16 and fp16 weights gained nothing: their widening, not the loads, bounds them.)
constexpr int64_t kTurnInputs = 256;
template <int MB>
void packed_tile_chains_in_turn(int64_t rows, const float* x, const float* group, const float* bias, float* y,
                                int64_t K, int64_t N, int64_t n0) {
  const float* xs[MB];
  for (int m = 0; m < MB; ++m) xs[m] = x + std::min<int64_t>(m, rows - 1) * K;
  Vec chain_sums[2][MB][kVecs];  // chain c: the inputs k with k % 2 == c
  for (int c = 0; c < 2; ++c)
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < kVecs; ++v) chain_sums[c][m][v] = Vec{};
  for (int64_t k0 = 0; k0 < K; k0 += kTurnInputs) {
    const int64_t k1 = std::min(K, k0 + kTurnInputs);
    for (int c = 0; c < 2; ++c) {
      Vec acc[MB][kVecs];
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < kVecs; ++v) acc[m][v] = chain_sums[c][m][v];
      for (int64_t k = k0 + c; k < k1; k += 2) {
        Vec w[kVecs];
        for (int v = 0; v < kVecs; ++v) w[v] = load_vec(group + k * kGroupRows + v * kVecLanes);
        if (c == 0) {  // an input's weights fill a cache line, so a chain reads every other line: fetch the
                       // next span's lines ahead (x86 ignores a prefetch past the end)
          __builtin_prefetch(group + (k + kTurnInputs) * kGroupRows);
          __builtin_prefetch(group + (k + 1 + kTurnInputs) * kGroupRows);
        }
        for (int m = 0; m < MB; ++m) {
          const Vec xv = broadcast(xs[m][k]);
          for (int v = 0; v < kVecs; ++v) acc[m][v] += w[v] * xv;
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < kVecs; ++v) chain_sums[c][m][v] = acc[m][v];
    }
  }
  for (int m = 0; m < rows; ++m) {
    for (int v = 0; v < kVecs; ++v) {
      const int64_t n = n0 + v * kVecLanes;
      const Vec sum = chain_sums[0][m][v] + chain_sums[1][m][v] + (bias ? load_vec(bias + n) : Vec{});
      std::memcpy(y + m * N + n, &sum, sizeof(sum));
    }
  }
}

// packed_tile for `rows` token rows (at most MB) over groups [g0, g1): G at a time, then one by one
template <int G, int MB, typename W, typename X>
void packed_groups(int64_t rows, const X* x, const W* packed, const float* bias, float* y, int64_t K, int64_t N,
                   int64_t g0, int64_t g1) {
  const int64_t size = K * kGroupRows;
  int64_t g = g0;
  for (; g + G <= g1; g += G) packed_tile<G, MB>(rows, x, packed + g * size, size, bias, y, K, N, g * kGroupRows);
  for (; g < g1; ++g) packed_tile<1, MB>(rows, x, packed + g * size, size, bias, y, K, N, g * kGroupRows);
}

// packed_gemv over token rows x as packed_tile takes them. Weights go in blocks of groups that stay in L2
// while every chunk of token rows passes over them, so they stream from memory once whatever M is.
// Weights of 1024 inputs or more go 2 groups a tile (AVX-512): half the broadcasts of x per multiply-add.
// Measured on one Zen 4 core, 2048 x 5632 weights: 3 to 8 token rows in 0.5x-0.8x the time of one group a
// tile; at 576 inputs 2 groups were up to 1.3x slower.
template <typename W, typename X>
void packed_rows(int64_t M, const X* x, const W* packed, const float* bias, float* y, int64_t K, int64_t N) {
  const int64_t group_bytes = K * kGroupRows * static_cast<int64_t>(sizeof(W));
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / group_bytes);
  const int64_t block = std::max<int64_t>(1, (256 * 1024) / group_bytes);
  const bool two_groups = kPackedTokenRows == 8 && K >= 1024;
  // AVX2, fp32 weights: from 8 token rows on, the chains in turn, 6 rows at a time, after 2 rows by
  // packed_tile: its sequential reads stream a weight from memory at up to twice the speed of the chains'
  // alternate lines, and leave it in L2 for them
  constexpr bool fp32 = std::is_same_v<W, float> && std::is_same_v<X, float>;
  const bool chains_in_turn = kPackedTokenRows == 2 && fp32 && M >= 8;
  const int64_t chunk = two_groups || chains_in_turn ? 6 : kPackedTokenRows;
  at::parallel_for(0, N / kGroupRows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g0 = begin; g0 < end; g0 += block) {
      const int64_t g1 = std::min(end, g0 + block);
      for (int64_t m0 = 0, rows; m0 < M; m0 += rows) {
        rows = std::min(chains_in_turn && m0 == 0 ? 2 : chunk, M - m0);
        const X* xm = x + m0 * (K / kInputsPer<X>);
        float* ym = y + m0 * N;
        if constexpr (fp32) {
          if (chains_in_turn && m0 > 0) {
            const int64_t size = K * kGroupRows;
            for (int64_t g = g0; g < g1; ++g) {
              const float* group = packed + g * size;
              if (rows <= 2) packed_tile<1, 2>(rows, xm, group, size, bias, ym, K, N, g * kGroupRows);
              else if (rows <= 4) packed_tile_chains_in_turn<4>(rows, xm, group, bias, ym, K, N, g * kGroupRows);
              else packed_tile_chains_in_turn<6>(rows, xm, group, bias, ym, K, N, g * kGroupRows);
            }
            continue;
          }
        }
        if (two_groups) {
          if (rows == 1) packed_groups<2, 1>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else if (rows == 2) packed_groups<2, 2>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else if (rows <= 4) packed_groups<2, 4>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else packed_groups<2, 6>(rows, xm, packed, bias, ym, K, N, g0, g1);
        } else {
          if (rows == 1) packed_groups<1, 1>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else if (rows == 2) packed_groups<1, 2>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else if (rows <= 4) packed_groups<1, std::min(4, kPackedTokenRows)>(rows, xm, packed, bias, ym, K, N, g0, g1);
          else packed_groups<1, kPackedTokenRows>(rows, xm, packed, bias, ym, K, N, g0, g1);
        }
      }
    }
  });
}

#if defined(GORGON_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define GORGON_AMX_BF16 1
#define DECODE_AMX_BF16 __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
// bf16 weights on CPUs with AMX-BF16 (Intel Xeon since Sapphire Rapids), at any number of token rows. A group's
// 32 inputs in repack_float's layout (16 pairs of 64 bytes: the 16 rows' pairs of inputs) are the tile tdpbf16ps
// takes, so one instruction meets up to 16 token rows' inputs with 1 KiB of weights, where the AVX-512 path
// takes 16 vdpbf16ps per token row: the rows of a Medusa tree cost next to nothing while the weights stream.
// Each output is then one sum in the tile unit's order over the inputs (not packed_tile's two chains): the same
// whatever the number of rows, so a row's result never depends on the others, and one row takes this path too.
// Tiles: 0-3 the outputs of (row chunk r, group g) at 2r + g (rows x 16 fp32), 4-5 the row chunks' inputs (rows x
// 32 bf16), 6-7 the groups' weights. rows0 / rows1: the token rows of the two chunks (rows1 0: one chunk).
DECODE_AMX_BF16 void amx_bf16_configure(int rows0, int rows1) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {};
  } config;
  config.rows[0] = config.rows[1] = config.rows[4] = static_cast<uint8_t>(rows0);
  config.rows[2] = config.rows[3] = config.rows[5] = static_cast<uint8_t>(rows1);
  config.rows[6] = config.rows[7] = 16;
  if (rows1 == 0) config.colsb[2] = config.colsb[3] = config.colsb[5] = 0;  // (a tile of no rows has no bytes)
  _tile_loadconfig(&config);
}

// The outputs of CHUNKS chunks of 16 token rows (from m0) x GROUPS groups (from w), into out[2r + g]: each tile
// of inputs or weights loaded serves two products where there are two of the other (prefill: tile loads, not
// products, bound one chunk x one group). Every output sums over k in the same order whatever the blocking.
template <int CHUNKS, int GROUPS>
DECODE_AMX_BF16 inline void amx_bf16_block(const uint32_t* x, int64_t m0, const at::BFloat16* w, int64_t group_size,
                                           int64_t K, float (*out)[16][kGroupRows]) {
  _tile_zero(0);
  if constexpr (GROUPS == 2) _tile_zero(1);
  if constexpr (CHUNKS == 2) _tile_zero(2);
  if constexpr (CHUNKS == 2 && GROUPS == 2) _tile_zero(3);
  const uint32_t* x0 = x + m0 * (K / 2);
  for (int64_t k = 0; k < K; k += 32) {
    quant::prefetch_ahead<kFloatPrefetchAhead>(w + k * kGroupRows, 1024);
    _tile_loadd(4, x0 + k / 2, 2 * K);
    _tile_loadd(6, w + k * kGroupRows, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (GROUPS == 2) {
      quant::prefetch_ahead<kFloatPrefetchAhead>(w + group_size + k * kGroupRows, 1024);
      _tile_loadd(7, w + group_size + k * kGroupRows, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (CHUNKS == 2) {
      _tile_loadd(5, x0 + 16 * (K / 2) + k / 2, 2 * K);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (GROUPS == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out[0], 64);
  if constexpr (GROUPS == 2) _tile_stored(1, out[1], 64);
  if constexpr (CHUNKS == 2) _tile_stored(2, out[2], 64);
  if constexpr (CHUNKS == 2 && GROUPS == 2) _tile_stored(3, out[3], 64);
}

// packed_rows for bf16 weights and x as bf16 pairs, K a multiple of 32, on AMX tiles: 32 token rows x 2 groups a
// block, over groups that stay in L2 while every 32 rows pass
DECODE_AMX_BF16 void amx_bf16_rows(int64_t M, const uint32_t* x, const at::BFloat16* packed, const float* bias,
                                   float* y, int64_t K, int64_t N) {
  const int64_t group_size = K * kGroupRows, group_bytes = 2 * group_size;
  const int64_t grain = std::max<int64_t>(2, (64 * 1024) / group_bytes);
  const int64_t block = std::max<int64_t>(2, (256 * 1024) / group_bytes);
  at::parallel_for(0, N / kGroupRows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float out[4][16][kGroupRows];
    std::pair<int, int> configured{0, 0};
    for (int64_t g0 = begin; g0 < end; g0 += block) {
      const int64_t g1 = std::min(end, g0 + block);
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int rows0 = static_cast<int>(std::min<int64_t>(16, M - m0));
        const int rows1 = static_cast<int>(std::clamp<int64_t>(M - m0 - 16, 0, 16));
        if (configured != std::pair{rows0, rows1}) amx_bf16_configure(rows0, rows1), configured = {rows0, rows1};
        for (int64_t g = g0; g < g1; g += 2) {
          const at::BFloat16* w = packed + g * group_size;
          const int groups = g + 1 < g1 ? 2 : 1;
          if (rows1 && groups == 2) amx_bf16_block<2, 2>(x, m0, w, group_size, K, out);
          else if (rows1) amx_bf16_block<2, 1>(x, m0, w, group_size, K, out);
          else if (groups == 2) amx_bf16_block<1, 2>(x, m0, w, group_size, K, out);
          else amx_bf16_block<1, 1>(x, m0, w, group_size, K, out);
          for (int chunk = 0; chunk < (rows1 ? 2 : 1); ++chunk)
            for (int j = 0; j < groups; ++j) {
              const float* b = bias ? bias + (g + j) * kGroupRows : nullptr;
              for (int m = 0; m < (chunk ? rows1 : rows0); ++m)
                for (int n = 0; n < kGroupRows; ++n)
                  y[(m0 + 16 * chunk + m) * N + (g + j) * kGroupRows + n] = out[2 * chunk + j][m][n] + (b ? b[n] : 0.0f);
            }
        }
      }
    }
    if (configured.first) _tile_release();
  });
}
#endif

// y[M, N] = x[M, K] W^T (+ bias) over repack_float's layout (N a multiple of 16)
template <typename W>
void packed_gemv(int64_t M, const float* x, const W* packed, const float* bias, float* y, int64_t K, int64_t N) {
  if constexpr (kBf16Dot && std::is_same_v<W, at::BFloat16>) {
    // x rounded to bf16, as torch's bf16 linear takes it; read in pairs (the even input low, little-endian)
    std::vector<uint32_t> pairs(M * K / 2);
    auto* bits = reinterpret_cast<uint16_t*>(pairs.data());
    at::parallel_for(0, M * K, 1 << 16, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) bits[i] = bf16_bits(x[i]);
    });
#ifdef GORGON_AMX_BF16
    if (quant::amx_enabled() && K % 32 == 0) return amx_bf16_rows(M, pairs.data(), packed, bias, y, K, N);
#endif
    packed_rows(M, pairs.data(), packed, bias, y, K, N);
  } else {
    packed_rows(M, x, packed, bias, y, K, N);
  }
}

// (the checks skip torch's dispatcher, which costs a microsecond or two per call even when nothing changes)
torch::Tensor as_float(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat && t.is_contiguous() ? t : t.to(torch::kFloat).contiguous();
}

torch::Tensor as_dtype(const torch::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The blocks of quantized W: uint8 [out, row bytes] in the file's layout, or [out / 16, blocks, group block
// bytes] packed (quant.h, repack)
quant::Weights quantized_weights(const torch::Tensor& weight, int64_t qtype, int64_t in_features) {
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == torch::kByte && (weight.dim() == 2 || weight.dim() == 3),
              "linear: quantized weights must be a contiguous uint8 [out, row bytes] or packed tensor");
  const quant::Format f = quant::format_of(qtype);
  const int64_t row_bytes = in_features / f.block * f.bytes;
  if (weight.dim() == 3)
    TORCH_CHECK(quant::packable(qtype) && weight.size(1) == in_features / f.block &&
                    weight.size(2) == quant::group_block_bytes(qtype),
                "linear: the packed weights do not hold ", in_features, " weights per row of ggml type ", qtype);
  return {weight.data_ptr<uint8_t>(), weight.dim() == 3 ? row_bytes : weight.size(1), in_features / f.block,
          weight.dim() == 3};
}

// Output rows of a kernel weight: a packed one's first dimension counts groups of kGroupRows
int64_t weight_rows(const torch::Tensor& weight) {
  return weight.dim() == 3 ? weight.size(0) * quant::kGroupRows : weight.size(0);
}

// y = x W^T + b in quantized W's blocks (qtype: its ggml type) for fp32 x
torch::Tensor linear_quantized(const torch::Tensor& x, const torch::Tensor& weight, int64_t qtype,
                               const torch::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = weight_rows(weight);
  auto y = torch::empty({M, N}, x.options());
  quant::linear(qtype, x.data_ptr<float>(), M, K, quantized_weights(weight, qtype, K), N, y.data_ptr<float>());
  if (bias.defined()) y.add_(bias);
  return y;
}

// f(W*) for float weights: fp32, bf16 or fp16
template <typename F>
void with_weights(const torch::Tensor& weight, const char* what, F&& f) {
  switch (weight.scalar_type()) {
    case torch::kFloat: return f(weight.data_ptr<float>());
    case torch::kBFloat16: return f(weight.data_ptr<at::BFloat16>());
    case torch::kHalf: return f(weight.data_ptr<at::Half>());
    default: TORCH_CHECK(false, what, ": weights must be float32, bfloat16 or float16");
  }
}

// y = x W^T + b in fp32 for fp32 x; W float (contiguous), or quantized (qtype != 0); b fp32 or undefined.
torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         int64_t qtype = 0) {
  if (qtype != quant::kF32) return linear_quantized(x, weight, qtype, bias);
  const int64_t M = x.size(0), K = x.size(1);
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (weight.dim() == 3) {  // repack_float's layout
    const int64_t pair = weight.scalar_type() == torch::kBFloat16 ? 2 : 1;
    TORCH_CHECK(weight.is_contiguous() && weight.size(1) * pair == K && weight.size(2) == kGroupRows * pair,
                "linear: packed weights must be repack_float's layout for ", K, " inputs");
    const int64_t N = weight.size(0) * kGroupRows;
    auto y = torch::empty({M, N}, x.options());
    with_weights(weight, "linear", [&](auto* w) { packed_gemv(M, x.data_ptr<float>(), w, b, y.data_ptr<float>(), K, N); });
    return y;
  }
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && x.size(1) == weight.size(1),
              "linear: weight must be a contiguous [out, in] matrix matching the input");
  const int64_t N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  with_weights(weight, "linear", [&](auto* w) { gemv(M, x.data_ptr<float>(), w, b, y.data_ptr<float>(), K, N); });
  return y;
}

torch::Tensor optional_float(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? as_float(*t) : torch::Tensor();
}

// RMSNorm of each row of x [M, H] (fp32) with weight w: HF's rule, all in fp32.
torch::Tensor rms_norm_f32(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t M = x.size(0), H = x.size(1);
  auto w = as_float(weight);
  auto y = torch::empty_like(x);
  const float *src = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = src + m * H;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t h = 0; h < H; ++h) sum += row[h] * row[h];
    const float inv = 1.0f / std::sqrt(sum / H + static_cast<float>(eps));
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) dst[m * H + h] = row[h] * inv * wp[h];
  }
  return y;
}


template <typename W>
void lora_rows(float* out, const float* x, const W* a, const W* bt, int64_t a_slot_stride, int64_t bt_slot_stride,
               const int64_t* slots, int64_t M, int64_t K, int64_t N, int64_t R) {
  at::parallel_for(0, M, 1, [&](int64_t m_begin, int64_t m_end) {
    std::vector<float> t(R);
    for (int64_t m = m_begin; m < m_end; ++m) {
      if (slots[m] < 0) continue;
      const W* am = a + slots[m] * a_slot_stride;
      const W* bm = bt + slots[m] * bt_slot_stride;
      const float* xm = x + m * K;
      for (int64_t r = 0; r < R; ++r) {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) sum += to_float(am[r * K + k]) * xm[k];
        t[r] = sum;
      }
      float* o = out + m * N;
      for (int64_t r = 0; r < R; ++r) {
        const W* b = bm + r * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) o[n] += t[r] * to_float(b[n]);
      }
    }
  });
}

// out [M, N] += (x [M, K] A[s]^T) Bt[s] for each row m with LoRA slot s = slots[m] >= 0; A [S, R, K] and
// Bt [S, R, N] (the scale folded in; the slot dimension may be strided, e.g. the first R rows of a bigger
// stack), as engine.adapters.lora.LoRALinear keeps them. No-op without LoRA.
void add_lora(torch::Tensor& out, const torch::Tensor& x, const c10::optional<torch::Tensor>& slots,
              const c10::optional<torch::Tensor>& a, const c10::optional<torch::Tensor>& bt) {
  if (!slots.has_value() || !a.has_value() || !bt.has_value()) return;
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), R = a->size(1);
  TORCH_CHECK(a->dim() == 3 && bt->dim() == 3 && a->size(2) == K && bt->size(2) == N && bt->size(1) == R &&
                  slots->numel() == M && a->scalar_type() == bt->scalar_type() && a->stride(2) == 1 &&
                  a->stride(1) == K && bt->stride(2) == 1 && bt->stride(1) == N,
              "add_lora: the LoRA weights do not fit this linear");
  const auto s = slots->to(torch::kLong).contiguous();
  with_weights(*a, "add_lora", [&](auto* a_data) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(a_data)>>;
    lora_rows(out.data_ptr<float>(), x.data_ptr<float>(), a_data, bt->data_ptr<W>(), a->stride(0), bt->stride(0),
              s.data_ptr<int64_t>(), M, K, N, R);
  });
}

}  // namespace

// x: [M, K] (any float dtype), weight: [N, K] fp32, bf16 or fp16 contiguous, bias: [N] or None. Returns [M, N] in x's dtype.
torch::Tensor small_batch_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "small_batch_linear: x must be [rows, in_features]");
  return as_dtype(linear_f32(as_float(x), weight, optional_float(bias)), x.scalar_type());
}

// RMSNorm of each row of x [M, H] (any float dtype), in fp32; returns x's dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.numel(), "rms_norm: x must be [rows, hidden_size]");
  return as_dtype(rms_norm_f32(as_float(x), weight, eps), x.scalar_type());
}

// y = x W^T + b for W stored as row ranges of different types (parts, one qtype each; qtypes [] for one float
// part): a GGUF file may keep q/k and v in different types
torch::Tensor linear_parts(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, const torch::Tensor& bias,
                           const std::vector<int64_t>& qtypes) {
  TORCH_CHECK(!weights.empty() && (qtypes.empty() ? weights.size() == 1 : qtypes.size() == weights.size()),
              "linear: one ggml type per part of the weights");
  if (weights.size() == 1) return linear_f32(x, weights[0], bias, qtypes.empty() ? 0 : qtypes[0]);
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < weights.size(); ++i) parts.push_back(linear_f32(x, weights[i], torch::Tensor(), qtypes[i]));
  auto y = torch::cat(parts, 1);
  if (bias.defined()) y.add_(bias);
  return y;
}

// hidden [M, H] -> (q [M, num_heads, D], k [M, num_kv_heads, D], v [M, num_kv_heads, D]) in hidden's dtype:
// RMSNorm, the packed q/k/v projection (+ bias, + LoRA), then rotate-half RoPE on q and k with cos/sin [M, D];
// with q_norm and k_norm ([D]: Qwen3), each head of q and of k RMS-normed (eps too) before its rotation.
// LoRA: lora_slots [M] (-1: none) and [A, Bt] as engine.adapters.lora.LoRALinear stacks them, or [].
// qkv_weights: the projection's parts (linear_parts), one unless the file stores them in several types;
// qtypes: [] for float weights, or the ggml type of each part (0: float).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> attention_input(
    torch::Tensor hidden, torch::Tensor norm_weight, double eps, std::vector<torch::Tensor> qkv_weights,
    c10::optional<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
    int64_t num_kv_heads, c10::optional<torch::Tensor> lora_slots, std::vector<c10::optional<torch::Tensor>> lora,
    std::vector<int64_t> qtypes, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm) {
  TORCH_CHECK(hidden.dim() == 2, "attention_input: hidden must be [rows, hidden_size]");
  const int64_t M = hidden.size(0);
  const int64_t num_qk_heads = num_heads + num_kv_heads;
  int64_t qkv_rows = 0;
  for (const auto& w : qkv_weights) qkv_rows += weight_rows(w);
  const int64_t D = qkv_rows / (num_qk_heads + num_kv_heads);
  TORCH_CHECK(D * (num_qk_heads + num_kv_heads) == qkv_rows && D % 2 == 0,
              "attention_input: the q/k/v weight does not split into heads of an even size");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == M && cos.size(1) == D, "attention_input: cos/sin must be [rows, head_dim]");
  auto normed = rms_norm_f32(as_float(hidden), norm_weight, eps);
  auto qkv = linear_parts(normed, qkv_weights, optional_float(qkv_bias), qtypes);
  TORCH_CHECK(lora.empty() || lora.size() == 2, "attention_input: lora takes the A and Bt of q/k/v");
  if (!lora.empty()) add_lora(qkv, normed, lora_slots, lora[0], lora[1]);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value() && (!q_norm || (q_norm->numel() == D && k_norm->numel() == D)),
              "attention_input: q_norm and k_norm come together, each [head_dim]");
  torch::Tensor qn, kn;
  if (q_norm) qn = as_float(*q_norm), kn = as_float(*k_norm);
  auto c = as_float(cos), s = as_float(sin);
  float* data = qkv.data_ptr<float>();
  const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  const int64_t half = D / 2, width = qkv.size(1);
  for (int64_t m = 0; m < M; ++m) {
    const float *cm = cp + m * D, *sm = sp + m * D;
    for (int64_t head = 0; head < num_qk_heads; ++head) {
      float* x = data + m * width + head * D;
      if (q_norm) {  // (rms_norm_f32's arithmetic, in place)
        const float* w = (head < num_heads ? qn : kn).data_ptr<float>();
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < D; ++d) sum += x[d] * x[d];
        const float inv = 1.0f / std::sqrt(sum / D + static_cast<float>(eps));
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) x[d] = x[d] * inv * w[d];
      }
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        const float lo = x[d], hi = x[d + half];
        x[d] = lo * cm[d] - hi * sm[d];
        x[d + half] = hi * cm[d + half] + lo * sm[d + half];
      }
    }
  }
  auto heads = as_dtype(qkv, hidden.scalar_type()).view({M, num_qk_heads + num_kv_heads, D});
  auto parts = heads.split_with_sizes({num_heads, num_kv_heads, num_kv_heads}, 1);
  return {parts[0], parts[1], parts[2]};
}

// The rest of a decoder layer after attention: h = residual + attn W_o^T (+ b_o), then
// h + down(SiLU(gate) * up) of RMSNorm(h). attn [M, num_heads * D]; returns [M, H] in residual's dtype.
// LoRA: lora_slots [M] and [A, Bt] of o_proj, gate_up_proj and down_proj (None where not adapted), or [].
// qtypes: [] for float weights, or the ggml types of the o and down weights (0: float); gate/up's parts and
// their types as attention_input takes q/k/v's (a file may store gate and up in different types).
torch::Tensor attention_output(torch::Tensor attn, torch::Tensor residual, torch::Tensor o_weight,
                               c10::optional<torch::Tensor> o_bias, torch::Tensor norm_weight, double eps,
                               std::vector<torch::Tensor> gate_up_weights, c10::optional<torch::Tensor> gate_up_bias,
                               torch::Tensor down_weight, c10::optional<torch::Tensor> down_bias,
                               c10::optional<torch::Tensor> lora_slots, std::vector<c10::optional<torch::Tensor>> lora,
                               std::vector<int64_t> qtypes, std::vector<int64_t> gate_up_qtypes) {
  TORCH_CHECK(attn.dim() == 2 && residual.dim() == 2 && attn.size(0) == residual.size(0),
              "attention_output: attn and residual must be [rows, features]");
  TORCH_CHECK(lora.empty() || lora.size() == 6, "attention_output: lora takes A and Bt of o, gate/up and down");
  auto lora_at = [&](size_t i) { return lora.empty() ? c10::optional<torch::Tensor>() : lora[i]; };
  TORCH_CHECK(qtypes.empty() || qtypes.size() == 2, "attention_output: qtypes takes the types of o and down");
  auto qtype = [&](size_t i) { return qtypes.empty() ? int64_t{0} : qtypes[i]; };
  auto attn32 = as_float(attn);
  auto hidden = linear_f32(attn32, o_weight, optional_float(o_bias), qtype(0));
  add_lora(hidden, attn32, lora_slots, lora_at(0), lora_at(1));
  hidden.add_(as_dtype(residual, torch::kFloat));
  auto normed = rms_norm_f32(hidden, norm_weight, eps);
  auto gate_up = linear_parts(normed, gate_up_weights, optional_float(gate_up_bias), gate_up_qtypes);
  add_lora(gate_up, normed, lora_slots, lora_at(2), lora_at(3));
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto act = torch::empty({M, I}, gate_up.options());
  const float* gu = gate_up.data_ptr<float>();
  float* a = act.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / I), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float *gate = gu + m * 2 * I, *up = gate + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) a[m * I + i] = silu(gate[i]) * up[i];
    }
  });
  auto down = linear_f32(act, down_weight, optional_float(down_bias), qtype(1));
  add_lora(down, act, lora_slots, lora_at(4), lora_at(5));
  hidden.add_(down);
  return as_dtype(hidden, residual.scalar_type());
}

// The decoder layers of one step, run from C++ so that Python dispatches one call per step instead of three
// per layer: per layer attention_input, the paged attention op of attention.cpp (through torch's dispatcher,
// so the two extensions stay separate builds) and attention_output. Invariant: each layer's arithmetic is
// exactly that of the three calls made one by one from Python; the caches are the ones attention reads.
class DecoderStack {
 public:
  struct Layer {
    torch::Tensor input_norm, o_weight, post_norm, down_weight, k_cache, v_cache;
    std::vector<torch::Tensor> qkv_weights, gate_up_weights;  // (their parts)
    c10::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias;
    double input_eps, post_eps;
    std::vector<int64_t> qkv_qtypes, gate_up_qtypes, qtypes;  // q/k/v's parts; gate/up's parts; o, down
    c10::optional<torch::Tensor> q_norm, k_norm;  // (Qwen3)
  };

  DecoderStack(int64_t num_heads, int64_t num_kv_heads, double scale)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), scale_(scale),
        attention_(c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gorgon_attention::paged_attention", "")
                       .typed<AttentionOp>()) {}

  void add_layer(torch::Tensor input_norm, double input_eps, std::vector<torch::Tensor> qkv_weights,
                 c10::optional<torch::Tensor> qkv_bias, torch::Tensor o_weight, c10::optional<torch::Tensor> o_bias,
                 torch::Tensor post_norm, double post_eps, std::vector<torch::Tensor> gate_up_weights,
                 c10::optional<torch::Tensor> gate_up_bias, torch::Tensor down_weight,
                 c10::optional<torch::Tensor> down_bias, std::vector<int64_t> qkv_qtypes,
                 std::vector<int64_t> gate_up_qtypes, std::vector<int64_t> qtypes, torch::Tensor k_cache,
                 torch::Tensor v_cache, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm) {
    TORCH_CHECK(qkv_qtypes.size() == qkv_weights.size() && gate_up_qtypes.size() == gate_up_weights.size() &&
                    qtypes.size() == 2,
                "DecoderStack: the types of q/k/v's parts, gate/up's parts, then of o and down");
    layers_.push_back({input_norm, o_weight, post_norm, down_weight, k_cache, v_cache, qkv_weights, gate_up_weights,
                       qkv_bias, o_bias, gate_up_bias, down_bias, input_eps, post_eps, qkv_qtypes, gate_up_qtypes,
                       qtypes, q_norm, k_norm});
  }

  // hidden [M, H] -> the last layer's output [M, H]; the step's attention metadata as the op takes it
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor query_start_loc, torch::Tensor context_lens,
                        c10::optional<torch::Tensor> tree_mask) {
    const std::vector<c10::optional<torch::Tensor>> no_lora;
    for (const Layer& l : layers_) {
      auto [q, k, v] = attention_input(hidden, l.input_norm, l.input_eps, l.qkv_weights, l.qkv_bias, cos, sin,
                                       num_heads_, num_kv_heads_, c10::nullopt, no_lora, l.qkv_qtypes, l.q_norm,
                                       l.k_norm);
      auto attn = attention_.call(q, k, v, l.k_cache, l.v_cache, slot_mapping, block_tables, query_start_loc,
                                  context_lens, tree_mask, scale_);
      hidden = attention_output(attn.view({hidden.size(0), -1}), hidden, l.o_weight, l.o_bias, l.post_norm,
                                l.post_eps, l.gate_up_weights, l.gate_up_bias, l.down_weight, l.down_bias,
                                c10::nullopt, no_lora, l.qtypes, l.gate_up_qtypes);
    }
    return hidden;
  }

 private:
  using AttentionOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const std::optional<at::Tensor>&, double);
  int64_t num_heads_, num_kv_heads_;
  double scale_;
  c10::TypedOperatorHandle<AttentionOp> attention_;
  std::vector<Layer> layers_;
};

namespace {

// Medusa heads' residual blocks: head h starts from hidden [M, H] (fp32) and applies x + SiLU(x W^T + b)
// for each of its blocks; weights/biases hold num_heads * blocks_per_head [H, H]/[H] tensors, head-major
// (weights in ggml type weights_qtype: 0 float).
// Returns the heads' states [num_heads * M, H] in fp32, head-major.
torch::Tensor medusa_states(const torch::Tensor& hidden, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& biases, int64_t num_heads, int64_t weights_qtype) {
  const int64_t M = hidden.size(0), H = hidden.size(1), blocks = weights.size() / num_heads;
  auto states = torch::empty({num_heads * M, H}, hidden.options());
  for (int64_t h = 0; h < num_heads; ++h) {
    auto x = hidden;
    for (int64_t j = 0; j < blocks; ++j) {
      auto y = linear_f32(x, weights[h * blocks + j], as_float(biases[h * blocks + j]), weights_qtype);
      float* yp = y.data_ptr<float>();
      const float* xp = x.data_ptr<float>();
#pragma omp simd
      for (int64_t i = 0; i < M * H; ++i) yp[i] = xp[i] + silu(yp[i]);
      x = y;
    }
    states.narrow(0, h * M, M).copy_(x);
  }
  return states;
}

// Index of the largest entry of each row of x [M, N] (any float dtype), the first among equals, as torch.argmax
// (NaNs aside). torch's CPU argmax is a scalar loop, ~80 us a 49152-token row on a Zen 4 (as long as two
// layers of SmolLM2's decode step). Here each lane keeps its largest value and where it was (the first, as
// the comparison is strict), and the lanes are reduced at the end.
torch::Tensor argmax_rows(torch::Tensor x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) >= 1, "argmax_rows: x must be [rows, columns]");
  typedef int32_t IVec __attribute__((vector_size(sizeof(Vec))));
  const auto x = as_float(x_in);
  const int64_t M = x.size(0), N = x.size(1);
  const float lowest = -std::numeric_limits<float>::infinity();
  auto out = torch::empty({M}, x.options().dtype(torch::kLong));
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x.data_ptr<float>() + r * N;
    Vec best;
    IVec where, lane;
    for (int l = 0; l < kVecLanes; ++l) best[l] = lowest, where[l] = 0, lane[l] = l;
    int64_t i = 0;
    for (; i + kVecLanes <= N; i += kVecLanes) {
      const Vec v = load_vec(row + i);
      where = v > best ? lane + static_cast<int32_t>(i) : where;
      best = v > best ? v : best;
    }
    float top = lowest;
    int64_t index = 0;
    for (int l = 0; l < kVecLanes; ++l)
      if (best[l] > top || (best[l] == top && where[l] < index)) top = best[l], index = where[l];
    for (; i < N; ++i)
      if (row[i] > top) top = row[i], index = i;
    out.data_ptr<int64_t>()[r] = index;
  }
  return out;
}

// Column indices of the k largest entries of each row of x [M, N] (fp32), largest first; among equal
// values the lower index wins, as in argmax. k is small (a tree's widest rank), so insertion is cheap. With
// logprobs ([M, k] fp32), also their log-softmax over the row.
torch::Tensor top_k_rows(const torch::Tensor& x, int64_t k, torch::Tensor* logprobs = nullptr) {
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(k >= 1 && k <= N, "medusa_top_k: k must be in [1, vocabulary size]");
  auto out = torch::empty({M, k}, x.options().dtype(torch::kLong));
  if (logprobs != nullptr) *logprobs = torch::empty({M, k}, x.options());
  std::vector<float> best(k);
  std::vector<int64_t> index(k);
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x.data_ptr<float>() + r * N;
    for (int64_t j = 0; j < k; ++j) {
      best[j] = -std::numeric_limits<float>::infinity();
      index[j] = j;
    }
    for (int64_t i = 0; i < N; ++i) {
      const float v = row[i];
      if (!(v > best[k - 1])) continue;
      int64_t j = k - 1;
      for (; j > 0 && v > best[j - 1]; --j) {
        best[j] = best[j - 1];
        index[j] = index[j - 1];
      }
      best[j] = v;
      index[j] = i;
    }
    std::copy(index.begin(), index.end(), out.data_ptr<int64_t>() + r * k);
    if (logprobs != nullptr) {
      float sum = 0.0f;  // of exp(v - max): the largest entry is best[0]
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < N; ++i) sum += exp_nonpositive(row[i] - best[0]);
      float* dst = logprobs->data_ptr<float>() + r * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = best[j] - best[0] - std::log(sum);
    }
  }
  return out;
}

}  // namespace

namespace {

// Every head's logits for a few rows of hidden states [M, H]: its residual blocks, then its vocabulary projection
// (projections: the shared base lm_head, or one matrix per head). Returns [num_heads * M, V] fp32.
torch::Tensor medusa_logits(const torch::Tensor& hidden, const std::vector<torch::Tensor>& weights,
                            const std::vector<torch::Tensor>& biases, int64_t num_heads,
                            const std::vector<torch::Tensor>& projections, int64_t projection_qtype,
                            int64_t weights_qtype) {
  TORCH_CHECK(hidden.dim() == 2 && num_heads > 0 && weights.size() == biases.size() &&
                  weights.size() % num_heads == 0,
              "medusa_top_k: hidden must be [rows, H] and every head needs the same number of blocks");
  TORCH_CHECK(projections.size() == 1 || static_cast<int64_t>(projections.size()) == num_heads,
              "medusa_top_k: give one shared projection or one per head");
  const int64_t M = hidden.size(0), V = projections[0].size(0);
  auto states = medusa_states(as_float(hidden), weights, biases, num_heads, weights_qtype);
  if (projections.size() == 1) return linear_f32(states, projections[0], torch::Tensor(), projection_qtype);
  auto logits = torch::empty({num_heads * M, V}, states.options());
  for (int64_t h = 0; h < num_heads; ++h)
    logits.narrow(0, h * M, M).copy_(
        linear_f32(states.narrow(0, h * M, M), projections[h], torch::Tensor(), projection_qtype));
  return logits;
}

}  // namespace

// Medusa drafts for a few rows of hidden states [M, H]: every head's residual blocks, its vocabulary
// projection (projections: the shared base lm_head, or one matrix per head) and the k likeliest
// tokens, in one call and without handing logits back to Python. Returns [num_heads, M, k] int64.
// projection_qtype, weights_qtype: the ggml types of the projections and of the blocks' weights (0: float).
torch::Tensor medusa_top_k(torch::Tensor hidden, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases,
                           int64_t num_heads, std::vector<torch::Tensor> projections, int64_t k,
                           int64_t projection_qtype, int64_t weights_qtype) {
  auto logits = medusa_logits(hidden, weights, biases, num_heads, projections, projection_qtype, weights_qtype);
  return top_k_rows(logits, k).view({num_heads, hidden.size(0), k});
}

// medusa_top_k, and the drafts' log-probabilities under each head's softmax over its projection's rows:
// (top [num_heads, M, k] int64, log-probabilities [num_heads, M, k] fp32)
std::tuple<torch::Tensor, torch::Tensor> medusa_top_k_logprobs(
    torch::Tensor hidden, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases, int64_t num_heads,
    std::vector<torch::Tensor> projections, int64_t k, int64_t projection_qtype, int64_t weights_qtype) {
  auto logits = medusa_logits(hidden, weights, biases, num_heads, projections, projection_qtype, weights_qtype);
  torch::Tensor logprobs;
  auto top = top_k_rows(logits, k, &logprobs);
  return {top.view({num_heads, hidden.size(0), k}), logprobs.view({num_heads, hidden.size(0), k})};
}

// One level of Hydra drafting (models.medusa.MedusaHeads.draft_level) in one call: each row's head input
// x = state + W_in [state, embedding] + b_in, then the head's blocks, its projection and the k likeliest
// tokens, as medusa_top_k. Returns (x [M, H] fp32: what the next level starts from, top [M, k] int64, their
// log-probabilities [M, k] fp32 under the head's softmax over the projection's rows).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> hydra_level(torch::Tensor states, torch::Tensor embeddings,
                                                     torch::Tensor input_weight, torch::Tensor input_bias,
                                                     std::vector<torch::Tensor> weights,
                                                     std::vector<torch::Tensor> biases, torch::Tensor projection,
                                                     int64_t k, int64_t projection_qtype, int64_t weights_qtype) {
  TORCH_CHECK(states.dim() == 2 && embeddings.sizes() == states.sizes(),
              "hydra_level: states and embeddings must both be [rows, H]");
  auto x = linear_f32(as_float(torch::cat({states, embeddings.to(states.scalar_type())}, 1)), input_weight,
                      as_float(input_bias), weights_qtype);
  x.add_(as_float(states));
  torch::Tensor logprobs;
  auto top = top_k_rows(medusa_logits(x, weights, biases, 1, {projection}, projection_qtype, weights_qtype), k,
                        &logprobs);
  return {x, top, logprobs};
}

// x: [M, K] (any float dtype), weight: uint8 [N, row bytes] in ggml type qtype, bias: [N] or None.
torch::Tensor quantized_linear(torch::Tensor x, torch::Tensor weight, int64_t qtype,
                               c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "quantized_linear: x must be [rows, in_features]");
  return as_dtype(linear_quantized(as_float(x), weight, qtype, optional_float(bias)), x.scalar_type());
}

// quantized weights (uint8 [N, row bytes] in ggml type qtype, or packed) -> fp32 [N, in_features]
torch::Tensor dequantize(torch::Tensor weight, int64_t qtype, int64_t in_features) {
  const quant::Format f = quant::format_of(qtype);
  TORCH_CHECK(in_features % f.block == 0 && (weight.dim() == 3 || weight.size(1) == in_features / f.block * f.bytes),
              "dequantize: weight must be uint8 [rows, row bytes] holding in_features weights per row, or packed");
  auto w = weight.contiguous();
  auto out = torch::empty({weight_rows(w), in_features}, torch::kFloat);
  quant::dequantize(qtype, quantized_weights(w, qtype, in_features), out.size(0), in_features, out.data_ptr<float>());
  return out;
}

// uint8 [N, row bytes] in ggml type qtype -> the packed layout (quant.h), or None where it does not apply: N not
// a multiple of 16, or a CPU without AVX2 (the kernels that read it are AVX-512 VNNI's and AVX2's)
c10::optional<torch::Tensor> repack(torch::Tensor weight, int64_t qtype, int64_t in_features) {
  if (!quant::packable(qtype) || weight.size(0) % quant::kGroupRows || quant::current_isa() == quant::kScalar)
    return c10::nullopt;
  auto w = weight.contiguous();
  quantized_weights(w, qtype, in_features);  // checks the shape
  auto out = torch::empty({w.size(0) / quant::kGroupRows, in_features / quant::format_of(qtype).block,
                           quant::group_block_bytes(qtype)}, w.options());
  quant::repack(qtype, w.data_ptr<uint8_t>(), w.size(1), w.size(0), in_features, out.data_ptr<uint8_t>());
  return out;
}

// fp32, bf16 or fp16 W [N, K] -> packed_gemv's layout, where it applies (N a multiple of 16; K even for bf16)
c10::optional<torch::Tensor> repack_float(const torch::Tensor& weight) {
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  if (weight.dim() != 2 || weight.size(0) % kGroupRows || (bf16 && weight.size(1) % 2) ||
      !(bf16 || weight.scalar_type() == torch::kFloat || weight.scalar_type() == torch::kHalf))
    return c10::nullopt;
  const int64_t N = weight.size(0), K = weight.size(1), pair = bf16 ? 2 : 1;
  return weight.reshape({N / kGroupRows, kGroupRows, K / pair, pair}).permute({0, 2, 1, 3}).contiguous()
      .reshape({N / kGroupRows, K / pair, kGroupRows * pair});
}

// Force a lower instruction set for the quantized kernels ("auto", "avx512", "avx2", "scalar"); returns the one used.
std::string set_isa(std::string name) {
  quant::current_isa() = quant::isa_from_name(name);
  return quant::isa_name(quant::current_isa());
}

std::string isa() { return quant::isa_name(quant::current_isa()); }

// Turn the AMX tiles of the quantized kernels on or off (on: where the CPU and OS allow); returns whether they are on
bool set_amx(bool on) { return quant::amx_enabled() = on && quant::amx_available(); }

bool amx() { return quant::amx_enabled(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("small_batch_linear", &small_batch_linear, "y = x @ w.T + b for a few rows, streaming w once");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows");
  m.def("medusa_top_k", &medusa_top_k, "every Medusa head's k likeliest tokens for a few rows of hidden states",
        py::arg("hidden"), py::arg("weights"), py::arg("biases"), py::arg("num_heads"), py::arg("projections"),
        py::arg("k"), py::arg("projection_qtype") = 0, py::arg("weights_qtype") = 0);
  m.def("medusa_top_k_logprobs", &medusa_top_k_logprobs, "medusa_top_k, and the drafts' log-probabilities",
        py::arg("hidden"), py::arg("weights"), py::arg("biases"), py::arg("num_heads"), py::arg("projections"),
        py::arg("k"), py::arg("projection_qtype") = 0, py::arg("weights_qtype") = 0);
  m.def("argmax_rows", &argmax_rows, "each row's argmax, the first among equals");
  m.def("hydra_level", &hydra_level,
        "one level of Hydra drafting: head input, blocks, projection, k likeliest tokens and their log-probs",
        py::arg("states"), py::arg("embeddings"), py::arg("input_weight"), py::arg("input_bias"), py::arg("weights"),
        py::arg("biases"), py::arg("projection"), py::arg("k"), py::arg("projection_qtype") = 0,
        py::arg("weights_qtype") = 0);
  m.def("attention_input", &attention_input, "RMSNorm, q/k/v projection and RoPE of a few rows", py::arg("hidden"),
        py::arg("norm_weight"), py::arg("eps"), py::arg("qkv_weights"), py::arg("qkv_bias"), py::arg("cos"),
        py::arg("sin"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("lora_slots"), py::arg("lora"),
        py::arg("qtypes") = std::vector<int64_t>{}, py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none());
  m.def("attention_output", &attention_output, "o_proj + residual, RMSNorm, SwiGLU MLP + residual of a few rows",
        py::arg("attn"), py::arg("residual"), py::arg("o_weight"), py::arg("o_bias"), py::arg("norm_weight"),
        py::arg("eps"), py::arg("gate_up_weights"), py::arg("gate_up_bias"), py::arg("down_weight"),
        py::arg("down_bias"), py::arg("lora_slots"), py::arg("lora"), py::arg("qtypes") = std::vector<int64_t>{},
        py::arg("gate_up_qtypes") = std::vector<int64_t>{});
  m.def("quantized_linear", &quantized_linear, "y = x @ dequantize(w).T + b for a few rows, w in ggml blocks");
  m.def("dequantize", &dequantize, "ggml blocks (or packed) -> fp32 rows");
  m.def("repack_float", &repack_float, "fp32/bf16 [out, in] -> the kernels' 16-row interleaved layout, where it applies");
  m.def("repack", &repack, "ggml blocks -> the kernels' 16-row interleaved layout, where it applies");
  m.def("packable", &quant::packable, "does ggml type qtype have kernels over the 16-row interleaved layout?");
  m.def("set_isa", &set_isa, "force the quantized kernels' instruction set (auto, avx512, avx2, scalar)");
  m.def("isa", &isa, "the quantized kernels' instruction set");
  m.def("set_amx", &set_amx, "turn the AMX tiles (quantized and bf16 weights) on or off, where the CPU has them");
  m.def("amx", &amx, "do the kernels use AMX tiles (quantized weights: from 9 token rows; bf16: any)?");
  py::class_<DecoderStack>(m, "DecoderStack", "every decoder layer of a step in one call")
      .def(py::init<int64_t, int64_t, double>(), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("scale"))
      .def("add_layer", &DecoderStack::add_layer)
      .def("forward", &DecoderStack::forward);
}
