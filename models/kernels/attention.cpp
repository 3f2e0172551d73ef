// Fused paged attention for the CPU: FlashAttention's tiled online softmax over a paged KV cache.
//
// One kernel serves prefill, decode, mixed batches and Medusa tree verification. The work is cut
// into units of (sequence, query tile, kv head, kv split): a unit holds the query rows of one query
// tile for all query heads that share the kv head (GQA), walks its share of the sequence's keys in
// tiles of KEY_TILE, and keeps a running max / sum / accumulator per row. Units run in parallel
// (OpenMP, dynamic schedule, heaviest first). The keys are split at every KEYS_PER_SPLIT positions and
// the splits' partial results combined at the end (flash-decoding), so that a long context's decode
// fills the cores. The split points are fixed, whatever the batch, and so is every row's arithmetic:
// a row's result is bitwise the same in any batch, in a prefill, a decode step or a Medusa tree.
// K/V of the cache's float type (q's, or bf16/fp16 under an fp32 q) is packed to fp32 tiles; all arithmetic is fp32,
// but for the scores of bf16 q over a bf16 cache on CPUs with AMX-BF16: tile products of bf16 (amx_scores).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec_math.h"

#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int KEY_TILE = 64;        // keys per tile (a multiple of TILE_ROWS)
constexpr int QUERY_ROWS = 128;     // target rows (query positions x heads of a group) per unit
constexpr int TILE_ROWS = 8;        // gemm micro-kernel rows
constexpr int TILE_COLS = 16;       // gemm columns come in multiples of one vector
constexpr int KEYS_PER_SPLIT = 512;  // a multiple of KEY_TILE
// below this many multiply-adds a call runs on one thread: starting the team would cost more than it saves. In a
// decode step the team is already awake (the linears around attention use it): at 1 << 22, SmolLM2's decode
// attention (3 kv heads) ran on one thread below ~1300 keys while the other waited; at 1 << 18 a step at 170 /
// 300 keys took 3% / 8% less time (a 3-node Medusa tree's 9%), one at 40 the same (2 threads, AMX Xeon)
constexpr int64_t MIN_PARALLEL_WORK = int64_t{1} << 18;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// dst[0, n) = src[0, n) as fp32 (a K or V row of the cache into a tile)
template <typename cache_t>
inline void widen_row(const cache_t* src, float* dst, int n) {
  int d = 0;
  if constexpr (!std::is_same_v<cache_t, float>)  // fp16 through F16C: its scalar conversion does not vectorise
    for (; d + kVecLanes <= n; d += kVecLanes) store_vec(dst + d, load_vec(src + d));
#pragma omp simd
  for (int e = d; e < n; ++e) dst[e] = static_cast<float>(src[e]);
}

// Rows i and i + S of a transpose in progress: swap their off-diagonal blocks of S lanes (keep_low / keep_high:
// the lanes each keeps, kVecLanes + l naming lane l of the other row)
template <int S>
inline void swap_blocks(Vec (&r)[kVecLanes]) {
  typedef int VecIndex __attribute__((vector_size(sizeof(Vec))));
  VecIndex keep_low{}, keep_high{};
#pragma GCC unroll 16
  for (int l = 0; l < kVecLanes; ++l) {
    keep_low[l] = (l & S) ? kVecLanes + l - S : l;
    keep_high[l] = (l & S) ? kVecLanes + l : l + S;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kVecLanes; ++i) {
    if (i & S) continue;
    const Vec a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, keep_low);
    r[i + S] = __builtin_shuffle(a, b, keep_high);
  }
}

// r[i][l] -> r[l][i]: a kVecLanes x kVecLanes transpose in registers
inline void transpose(Vec (&r)[kVecLanes]) {
  if constexpr (kVecLanes == 16) swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
inline int ceil_div(int x, int m) { return (x + m - 1) / m; }

// C[rows][cols] (+)= A[rows][depth] * B[depth][cols], where A(r, k) = A[r * a_row + k * a_col] (so A may
// be a transposed view); rows % ROWS == 0, cols % (16 * VECTORS) == 0. The micro-kernel keeps a ROWS x
// (16 * VECTORS) block of C in registers. Each element of C is summed over k in order, one multiply-add at a
// time, whatever the tile shape: which operand is the broadcast one does not change a result's rounding.
template <int VECTORS, int ROWS = TILE_ROWS>
void gemm_tiles(const float* A, int a_row, int a_col, const float* B, int ldb, float* C, int ldc, int rows, int cols,
                int depth, bool accumulate) {
  for (int r0 = 0; r0 < rows; r0 += ROWS) {
    for (int c0 = 0; c0 < cols; c0 += 16 * VECTORS) {
      constexpr int V = VECTORS * 16 / kVecLanes;  // vectors per row of the block
      Vec acc[ROWS][V];
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load_vec(C + (r0 + r) * ldc + c0 + kVecLanes * v) : Vec{};
      for (int k = 0; k < depth; ++k) {
        Vec b[V];
        for (int v = 0; v < V; ++v) b[v] = load_vec(B + k * ldb + c0 + kVecLanes * v);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; ++r) {
          const float a = A[(r0 + r) * a_row + k * a_col];
          for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r)
        for (int v = 0; v < V; ++v) store_vec(C + (r0 + r) * ldc + c0 + kVecLanes * v, acc[r][v]);
    }
  }
}

// gemm for any rows <= TILE_ROWS (the few rows of a decode unit)
template <int VECTORS>
void gemm_few_rows_of(const float* A, int a_row, int a_col, const float* B, int ldb, float* C, int ldc, int rows,
                      int cols, int depth, bool accumulate) {
  switch (rows) {
#define GEMM_ROWS(R) \
  case R: return gemm_tiles<VECTORS, R>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
    GEMM_ROWS(1) GEMM_ROWS(2) GEMM_ROWS(3) GEMM_ROWS(4) GEMM_ROWS(5) GEMM_ROWS(6) GEMM_ROWS(7) GEMM_ROWS(8)
#undef GEMM_ROWS
  }
}

// cols % 16 == 0; two vectors per micro-tile where the width allows (more work per load). On AVX2, 6 rows x 16
// columns of accumulators take 12 of the 16 registers (4 rows left the FMA units waiting: prefill 4-6% slower),
// and the last rows % 6 go through gemm_few_rows_of.
void gemm(const float* A, int a_row, int a_col, const float* B, int ldb, float* C, int ldc, int rows, int cols,
          int depth, bool accumulate) {
#ifdef __AVX512F__
  if (cols % 32 == 0)
    gemm_tiles<2>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
  else
    gemm_tiles<1>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
#else
  const int main_rows = rows / 6 * 6;
  gemm_tiles<1, 6>(A, a_row, a_col, B, ldb, C, ldc, main_rows, cols, depth, accumulate);
  if (rows > main_rows)
    gemm_few_rows_of<1>(A + main_rows * a_row, a_row, a_col, B, ldb, C + main_rows * ldc, ldc, rows - main_rows, cols,
                        depth, accumulate);
#endif
}

void gemm_few_rows(const float* A, int a_row, int a_col, const float* B, int ldb, float* C, int ldc, int rows,
                   int cols, int depth, bool accumulate) {
  if (kVecLanes < 16) return gemm_few_rows_of<1>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
  if (cols % 64 == 0) gemm_few_rows_of<4>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
  else if (cols % 32 == 0) gemm_few_rows_of<2>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
  else gemm_few_rows_of<1>(A, a_row, a_col, B, ldb, C, ldc, rows, cols, depth, accumulate);
}

// ---- Q K^T on AMX tiles ------------------------------------------------------------------------------------------
// With bf16 q and cache on CPUs with AMX-BF16, every unit's scores are tile products of bf16 (S^T = K Q^T, run_unit),
// where fp32 multiply-adds computed them one element at a time: a Medusa tree's rows (13 nodes: 39 query rows per kv
// head) made attention several times a plain step's. Each score is then the tile unit's sum over the dimensions, times
// the scale, the same whatever the unit; softmax and P V stay as they are, summed over keys in order, so a tree row
// remains bitwise a plain decode step of its path (siblings add exact zeros).
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define GORGON_AMX_SCORES 1

// Not on a CPU run as another (GORGON_CPU_ISA), nor where the kernel refuses the tile registers
bool amx_scores_available() {
  static const bool on = [] {
    const char* env = std::getenv("GORGON_CPU_ISA");
    const bool as_this_cpu = env == nullptr || *env == 0 || std::string(env) == "auto";
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it, the first tile instruction raises SIGILL
    return as_this_cpu && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return on;
}

// Tiles 0 (scores: 16 keys x 16 rows, fp32), 1 (16 keys x 32 dims, bf16), 2 (16 dim pairs x 16 rows, bf16 pairs)
void amx_scores_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64};
    uint8_t rows[16] = {16, 16, 16};
  } config;
  _tile_loadconfig(&config);
}

// S^T[j][c] = scale * K[j] . Q[c] for `width` keys (rows of `keys`, head_dim bf16 each; width % 16 == 0) and `rows`
// queries given as dimension pairs q_pairs[i][c] (rows % 16 == 0)
void amx_scores(const at::BFloat16* keys, const uint32_t* q_pairs, int width, int rows, int head_dim, float scale,
                float* St) {
  for (int j0 = 0; j0 < width; j0 += 16) {
    for (int c0 = 0; c0 < rows; c0 += 16) {
      _tile_zero(0);
      for (int i0 = 0; i0 < head_dim / 2; i0 += 16) {
        _tile_loadd(1, keys + j0 * head_dim + 2 * i0, head_dim * sizeof(at::BFloat16));
        _tile_loadd(2, q_pairs + i0 * rows + c0, rows * sizeof(uint32_t));
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, St + j0 * rows + c0, rows * sizeof(float));
    }
  }
  const int n = width * rows;
#pragma omp simd
  for (int e = 0; e < n; ++e) St[e] *= scale;
}
#endif

// The Medusa tree a sequence verifies over its last `size` cache entries (size 0: none, plain causal)
struct TreeShape {
  int size = 0;
  const bool* mask = nullptr;       // [size][size]: may entry i see entry j?
  std::vector<int> depths;          // [size]: each entry's depth below the first, non-decreasing
  std::vector<int> first_at_depth;  // [deepest + 2]: the first entry at each depth or deeper (size past the last)
  int deepest = 0;
};

struct Problem {
  int num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int group;            // query heads per kv head
  int padded_dim;       // head_dim rounded up to TILE_COLS
  int tile_positions;   // query positions per unit
  int rows;             // the most rows of a unit: tile_positions * group rounded up to TILE_COLS
  const std::vector<TreeShape>* trees;  // [num_seqs]
  int max_tile_keys;    // the most keys of one tile (key_tile_end): KEY_TILE plus a tree's nodes
  float scale;
  bool amx;             // bf16 q and cache, head_dim % 32 == 0, AMX-BF16: every unit's scores on tiles (run_unit)
};

// A run of consecutive query positions of one sequence.
struct QueryTile {
  int seq;
  int first_token;   // row of q holding the tile's first position
  int first_index;   // cache index of that position
  int num_positions;
  int context_len;
  int num_splits;    // splits of the keys its last row sees
};

// Scratch of one thread, reused across its units. Padding (columns beyond head_dim) stays zero.
struct Scratch {
  std::vector<float> q_t;         // [padded_dim][rows]: the unit's scaled queries, transposed
  std::vector<float> keys, values;  // [tile keys][padded_dim]: one key tile in fp32
  std::vector<float> scores_t;    // [tile keys][rows]: scores, then probabilities, key-major
  std::vector<int> query_index;   // [rows] cache index of each row's query position
  std::vector<int64_t> offsets;   // [tile keys + KEY_TILE]: where each key's K/V row starts (key_offsets)
  std::vector<uint32_t> q_pairs;       // p.amx: [head_dim / 2][rows], the unit's queries as pairs of dimensions
  std::vector<at::BFloat16> keys_bf16;  // p.amx: [tile keys][head_dim], the tile's keys
  std::vector<float> few_scores_t;     // p.amx: [tile keys][16], a few-row unit's scores before they are transposed
  explicit Scratch(const Problem& p)
      : q_t(p.amx ? 0 : p.padded_dim * p.rows), keys(p.amx ? 0 : p.max_tile_keys * p.padded_dim),
        values(p.max_tile_keys * p.padded_dim), scores_t(p.max_tile_keys * p.rows), query_index(p.rows),
        offsets(p.max_tile_keys + KEY_TILE), q_pairs(p.amx ? p.head_dim / 2 * p.rows : 0),
        keys_bf16(p.amx ? p.max_tile_keys * p.head_dim : 0), few_scores_t(p.amx ? p.max_tile_keys * 16 : 0) {}
};

inline const TreeShape& tree_of(const Problem& p, const QueryTile& tile) { return (*p.trees)[tile.seq]; }

// May the query at cache index qi see the key at cache index kj?
inline bool visible(const TreeShape& tree, int qi, int kj, int context_len) {
  const int tree_start = context_len - tree.size;
  if (tree.size > 0 && qi >= tree_start && kj >= tree_start)
    return tree.mask[(qi - tree_start) * tree.size + (kj - tree_start)];
  return kj <= qi;
}

// Keys are tiled and split by position, where a tree node's position is the root's plus its depth (below
// the tree, a key's position is its cache index). So a tree row meets its ancestors in the same tiles and
// splits as a plain step at its position meets the same keys, and its online softmax rounds the same
// (siblings in between are masked, and add exact zeros): bitwise the same row. A tile may then hold more
// than KEY_TILE keys (all the nodes of its depths).
inline int position_of(const Problem& p, const QueryTile& tile, int index) {
  const TreeShape& tree = tree_of(p, tile);
  const int tree_start = tile.context_len - tree.size;
  return index < tree_start ? index : tree_start + tree.depths[index - tree_start];
}

// The first cache index whose key sits at `position` or later
inline int first_index_at(const Problem& p, const QueryTile& tile, int position) {
  const TreeShape& tree = tree_of(p, tile);
  const int tree_start = tile.context_len - tree.size;
  if (position <= tree_start) return position;
  const int depth = position - tree_start;
  return tree_start + (depth > tree.deepest ? tree.size : tree.first_at_depth[depth]);
}

// The end of the key tile that starts at cache index k0: KEY_TILE positions from a multiple of KEY_TILE
inline int key_tile_end(const Problem& p, const QueryTile& tile, int k0) {
  return first_index_at(p, tile, (position_of(p, tile, k0) / KEY_TILE + 1) * KEY_TILE);
}

// The keys [first, second) a unit walks: its split's positions, cut short where even its last query row (at
// cache index last_query) sees nothing more
inline std::pair<int, int> unit_keys(const Problem& p, const QueryTile& tile, int split, int last_query) {
  return {first_index_at(p, tile, split * KEYS_PER_SPLIT),
          std::min({first_index_at(p, tile, (split + 1) * KEYS_PER_SPLIT), tile.context_len, last_query + 1})};
}

// Where the keys (or values) at cache indices [first, first + count) of kv_head start in a cache, walked block by
// block rather than divided out per key (the block size is known only at run time)
inline void key_offsets(const Problem& p, const int* block_table, int first, int count, int kv_head, int64_t* out) {
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  int block = first / p.block_size, slot = first % p.block_size;
  for (int j = 0; j < count; ++j) {
    out[j] = (static_cast<int64_t>(block_table[block]) * p.block_size + slot) * token_stride +
             static_cast<int64_t>(kv_head) * p.head_dim;
    if (++slot == p.block_size) slot = 0, ++block;
  }
}

// Ask for the K and V rows at `offset` into L2: a tile's rows are scattered over the cache, and a unit that
// requested them only as it read them waited on memory
template <typename cache_t>
inline void prefetch_rows(const cache_t* k_cache, const cache_t* v_cache, int64_t offset, int head_dim) {
  const char* k_row = reinterpret_cast<const char*>(k_cache + offset);
  const char* v_row = reinterpret_cast<const char*>(v_cache + offset);
  for (int b = 0; b < head_dim * static_cast<int>(sizeof(cache_t)); b += 64) {
    __builtin_prefetch(k_row + b, 0, 2);
    __builtin_prefetch(v_row + b, 0, 2);
  }
}

// A unit's R rows before any key: running max -inf, running sum 0, output 0
inline void start_rows(float* row_max, float* row_sum, float* acc, int R, int Dp) {
  std::fill(row_max, row_max + R, NEG_INF);
  std::fill(row_sum, row_sum + R, 0.0f);
  std::fill(acc, acc + R * Dp, 0.0f);
}

inline int unit_rows(const Problem& p, const QueryTile& tile) { return round_up(tile.num_positions * p.group, TILE_COLS); }

// p.amx: the dimension pairs of a unit's `rows` queries (kv head kv_head's, as run_unit orders them), unscaled (the
// scale multiplies each score), as q_pairs[i][c] for c < padded_rows (zero past rows)
template <typename q_t>
void amx_query_pairs(const Problem& p, int kv_head, int rows, int padded_rows, const q_t* q, uint32_t* q_pairs) {
  const int D = p.head_dim;
  std::fill(q_pairs, q_pairs + D / 2 * padded_rows, 0u);
  for (int r = 0; r < rows; ++r) {
    const int head = kv_head * p.group + r % p.group;
    const auto* src = reinterpret_cast<const char*>(q + (static_cast<int64_t>(r / p.group) * p.num_heads + head) * D);
    for (int i = 0; i < D / 2; ++i) std::memcpy(q_pairs + i * padded_rows + r, src + i * sizeof(uint32_t), sizeof(uint32_t));
  }
}

// p.amx: a key tile's scores S^T [width][rows] from its keys (the cache rows at offsets, gathered into keys_bf16 and
// zero past num_keys)
template <typename cache_t>
void amx_tile_scores(const cache_t* k_cache, const int64_t* offsets, int num_keys, int width, const uint32_t* q_pairs,
                     int rows, const Problem& p, at::BFloat16* keys_bf16, float* St) {
#ifdef GORGON_AMX_SCORES
  const int D = p.head_dim;
  for (int j = 0; j < num_keys; ++j) std::memcpy(keys_bf16 + j * D, k_cache + offsets[j], D * sizeof(cache_t));
  std::fill(keys_bf16 + num_keys * D, keys_bf16 + width * D, at::BFloat16(0.0f));
  amx_scores(keys_bf16, q_pairs, width, rows, D, p.scale, St);
#else
  TORCH_CHECK(false, "paged_attention: AMX scores on a build without AMX");
#endif
}

// One unit: the rows of one query tile x one kv head's query heads, against one split of the keys.
// Rows are (position, head within the group), padded to TILE_COLS with zero queries at the last position.
// Scores are kept key-major (S^T = K Q^T) so that the per-row softmax statistics are vector ops.
template <typename q_t, typename cache_t>
void run_unit(const Problem& p, const QueryTile& tile, int kv_head, int split, const q_t* q,
              const cache_t* k_cache, const cache_t* v_cache, const int* block_table, Scratch& s,
              float* row_max, float* row_sum, float* acc) {
  const int D = p.head_dim, Dp = p.padded_dim, R = unit_rows(p, tile);
  const int real_rows = tile.num_positions * p.group;
  for (int r = 0; r < R; ++r) s.query_index[r] = tile.first_index + std::min(r, real_rows - 1) / p.group;
  if (p.amx) {
    amx_query_pairs(p, kv_head, real_rows, R, q, s.q_pairs.data());
  } else {
    std::fill(s.q_t.begin(), s.q_t.begin() + Dp * R, 0.0f);
    for (int r = 0; r < real_rows; ++r) {
      const int head = kv_head * p.group + r % p.group;
      const q_t* src = q + (static_cast<int64_t>(r / p.group) * p.num_heads + head) * D;
      for (int d = 0; d < D; ++d) s.q_t[d * R + r] = static_cast<float>(src[d]) * p.scale;
    }
  }
  start_rows(row_max, row_sum, acc, R, Dp);

  const auto [key_begin, key_end] = unit_keys(p, tile, split, s.query_index[R - 1]);
  const TreeShape& tree = tree_of(p, tile);
  const int tree_start = tile.context_len - tree.size;
  for (int k0 = key_begin, k1; k0 < key_end; k0 = k1) {
    k1 = std::min(key_tile_end(p, tile, k0), key_end);
    const int num_keys = k1 - k0, width = round_up(num_keys, TILE_COLS);  // (padding keys are masked)
    // the next tile's K/V rows are asked for as this one's are read (AVX2 prefill 4096: 5% less time)
    const int ahead = std::min(key_end - k1, KEY_TILE);
    key_offsets(p, block_table, k0, num_keys + ahead, kv_head, s.offsets.data());
    for (int j = 0; j < num_keys; ++j) {
      if (!p.amx) widen_row(k_cache + s.offsets[j], s.keys.data() + j * Dp, D);
      widen_row(v_cache + s.offsets[j], s.values.data() + j * Dp, D);
      if (j < ahead) prefetch_rows(k_cache, v_cache, s.offsets[num_keys + j], D);
    }
    // padding keys must not leak into the sums
    std::fill(s.values.begin() + num_keys * Dp, s.values.begin() + width * Dp, 0.0f);
    if (p.amx) {
      amx_tile_scores(k_cache, s.offsets.data(), num_keys, width, s.q_pairs.data(), R, p, s.keys_bf16.data(),
                      s.scores_t.data());
    } else {
      std::fill(s.keys.begin() + num_keys * Dp, s.keys.begin() + width * Dp, 0.0f);
      gemm(s.keys.data(), Dp, 1, s.q_t.data(), R, s.scores_t.data(), R, width, R, Dp, false);
    }

    // masking is only needed on tiles that cross the diagonal, the tree, or the end of the keys
    const bool needs_mask = num_keys < width || k1 - 1 > s.query_index[0] || k1 > tree_start;
    if (needs_mask) {
      for (int j = 0; j < width; ++j)
        for (int r = 0; r < R; ++r)
          if (j >= num_keys || !visible(tree, s.query_index[r], k0 + j, tile.context_len))
            s.scores_t[j * R + r] = NEG_INF;
    }
    // online softmax, vectorised over rows: TILE_COLS rows at a time, whose running max and sum stay in registers
    // over the keys (kept in Scratch, each key's update was a store the next one waited on: a 5-node tree's
    // attention spent a third of run_unit's own time there)
    for (int r0 = 0; r0 < R; r0 += TILE_COLS) {
      float chunk_max[TILE_COLS], safe[TILE_COLS], chunk_sum[TILE_COLS];
      std::fill(chunk_max, chunk_max + TILE_COLS, NEG_INF);
      for (int j = 0; j < width; ++j) {
        const float* scores = s.scores_t.data() + j * R + r0;
#pragma omp simd
        for (int r = 0; r < TILE_COLS; ++r) chunk_max[r] = std::max(chunk_max[r], scores[r]);
      }
#pragma omp simd
      for (int r = 0; r < TILE_COLS; ++r) {
        const float new_max = std::max(row_max[r0 + r], chunk_max[r]);
        safe[r] = new_max == NEG_INF ? 0.0f : new_max;  // a row that sees no key yet stays all zero
        chunk_sum[r] = 0.0f;
      }
      for (int j = 0; j < width; ++j) {
        float* scores = s.scores_t.data() + j * R + r0;
#pragma omp simd
        for (int r = 0; r < TILE_COLS; ++r) {
          scores[r] = exp_nonpositive(scores[r] - safe[r]);
          chunk_sum[r] += scores[r];
        }
      }
      for (int r = r0; r < r0 + TILE_COLS; ++r) {
        const float rescale = exp_nonpositive(row_max[r] - safe[r - r0]);
        row_sum[r] = row_sum[r] * rescale + chunk_sum[r - r0];
        row_max[r] = std::max(row_max[r], chunk_max[r - r0]);
        float* out = acc + r * Dp;
#pragma omp simd
        for (int d = 0; d < Dp; ++d) out[d] *= rescale;
      }
    }
    // acc[R][Dp] += P[R][width] V[width][Dp], reading P from the key-major scores
    gemm(s.scores_t.data(), 1, R, s.values.data(), Dp, acc, Dp, R, Dp, width, true);
  }
}

// run_unit for a unit of at most TILE_ROWS real rows (decode: one position x a group of heads), without
// run_unit's padding to 16 rows: scores are row-major (S = Q K^T, vectorised over keys) and the keys are
// packed transposed. Every number is computed as in run_unit, in the same order (gemm_tiles; the row sums
// run over keys one by one), so a row's result is bitwise the same on either path.
template <typename q_t, typename cache_t>
void run_unit_few_rows(const Problem& p, const QueryTile& tile, int kv_head, int split, const q_t* q,
                       const cache_t* k_cache, const cache_t* v_cache, const int* block_table, Scratch& s,
                       float* row_max, float* row_sum, float* acc) {
  const int D = p.head_dim, Dp = p.padded_dim, R = tile.num_positions * p.group;
  float* q_rows = s.q_t.data();        // [R][Dp]
  float* keys_t = s.keys.data();       // [Dp][width]
  float* scores = s.scores_t.data();   // [R][width]
  for (int r = 0; r < R; ++r) s.query_index[r] = tile.first_index + r / p.group;
  if (p.amx) {
    amx_query_pairs(p, kv_head, R, 16, q, s.q_pairs.data());
  } else {
    std::fill(q_rows, q_rows + R * Dp, 0.0f);
    for (int r = 0; r < R; ++r) {
      const int head = kv_head * p.group + r % p.group;
      const q_t* src = q + (static_cast<int64_t>(r / p.group) * p.num_heads + head) * D;
      for (int d = 0; d < D; ++d) q_rows[r * Dp + d] = static_cast<float>(src[d]) * p.scale;
    }
  }
  start_rows(row_max, row_sum, acc, R, Dp);

  const auto [key_begin, key_end] = unit_keys(p, tile, split, s.query_index[R - 1]);
  const TreeShape& tree = tree_of(p, tile);
  const int tree_start = tile.context_len - tree.size;
  for (int k0 = key_begin, k1; k0 < key_end; k0 = k1) {
    k1 = std::min(key_tile_end(p, tile, k0), key_end);
    const int num_keys = k1 - k0, width = round_up(num_keys, TILE_COLS);
    // the next tile's K/V rows are asked into L2 while this one is worked on, a row as each of this tile's V rows is
    // read: a decode unit does little arithmetic per key, and its rows (one head's share of each token's) are
    // scattered, so it waited on memory at a quarter of the bandwidth (1 thread, 600 keys: 15-30% less time). Asked
    // for in one burst at the tile's start, they came 12-27% later (a hint into L1 was slower still).
    const int64_t* offsets = s.offsets.data();
    const int ahead = std::min(key_end - k1, KEY_TILE);
    key_offsets(p, block_table, k0, num_keys + ahead, kv_head, s.offsets.data());
    for (int j = 0; j < num_keys; ++j) {
      widen_row(v_cache + offsets[j], s.values.data() + j * Dp, D);
      if (j < ahead) prefetch_rows(k_cache, v_cache, offsets[num_keys + j], D);
    }
    std::fill(s.values.begin() + num_keys * Dp, s.values.begin() + width * Dp, 0.0f);
    if (p.amx) {  // the scores key-major on tiles, then row-major as below
      amx_tile_scores(k_cache, offsets, num_keys, width, s.q_pairs.data(), 16, p, s.keys_bf16.data(),
                      s.few_scores_t.data());
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < width; ++j) scores[r * width + j] = s.few_scores_t[j * 16 + r];
    } else {
      int j0 = 0;  // keys transposed kVecLanes x kVecLanes dims at a time in registers, the rest one by one
      for (; j0 + kVecLanes <= num_keys; j0 += kVecLanes) {
        const cache_t* k_src[kVecLanes];
        for (int t = 0; t < kVecLanes; ++t) k_src[t] = k_cache + offsets[j0 + t];
        int d0 = 0;
        for (; d0 + kVecLanes <= D; d0 += kVecLanes) {
          Vec r[kVecLanes];
          for (int t = 0; t < kVecLanes; ++t) r[t] = load_vec(k_src[t] + d0);
          transpose(r);
          for (int t = 0; t < kVecLanes; ++t) store_vec(keys_t + (d0 + t) * width + j0, r[t]);
        }
        for (int t = 0; t < kVecLanes; ++t)
          for (int d = d0; d < D; ++d) keys_t[d * width + j0 + t] = static_cast<float>(k_src[t][d]);
      }
      for (int j = j0; j < num_keys; ++j) {
        const cache_t* k_src = k_cache + offsets[j];
        for (int d = 0; d < D; ++d) keys_t[d * width + j] = static_cast<float>(k_src[d]);
      }
      for (int d = 0; d < D; ++d) std::fill(keys_t + d * width + num_keys, keys_t + (d + 1) * width, 0.0f);
      std::fill(keys_t + D * width, keys_t + Dp * width, 0.0f);  // the padding dims
      gemm_few_rows(q_rows, Dp, 1, keys_t, width, scores, width, R, width, Dp, false);
    }

    const bool needs_mask = num_keys < width || k1 - 1 > s.query_index[0] || k1 > tree_start;
    for (int r = 0; r < R; ++r) {
      float* row = scores + r * width;
      if (needs_mask)
        for (int j = 0; j < width; ++j)
          if (j >= num_keys || !visible(tree, s.query_index[r], k0 + j, tile.context_len)) row[j] = NEG_INF;
      float tile_max = NEG_INF;
      for (int j = 0; j < width; ++j) tile_max = std::max(tile_max, row[j]);
      const float new_max = std::max(row_max[r], tile_max);
      const float safe_max = new_max == NEG_INF ? 0.0f : new_max;
#pragma omp simd
      for (int j = 0; j < width; ++j) row[j] = exp_nonpositive(row[j] - safe_max);
      float tile_sum = 0.0f;
      for (int j = 0; j < width; ++j) tile_sum += row[j];  // in key order, as run_unit sums
      const float rescale = exp_nonpositive(row_max[r] - safe_max);
      row_sum[r] = row_sum[r] * rescale + tile_sum;
      row_max[r] = new_max;
      float* out = acc + r * Dp;
#pragma omp simd
      for (int d = 0; d < Dp; ++d) out[d] *= rescale;
    }
    gemm_few_rows(scores, width, 1, s.values.data(), Dp, acc, Dp, R, Dp, width, true);
  }
}

// The normalised output of one (tile, kv head) from its splits' partial results (running max, running sum,
// unnormalised output; split s at offset s * rows), combined in split order
template <typename scalar_t>
void combine_splits(const Problem& p, const QueryTile& tile, int kv_head, const float* part_max, const float* part_sum,
                    const float* part_acc, scalar_t* out, std::vector<float>& row) {
  const int Dp = p.padded_dim;
  for (int r = 0; r < tile.num_positions * p.group; ++r) {
    float overall_max = NEG_INF;
    for (int split = 0; split < tile.num_splits; ++split) overall_max = std::max(overall_max, part_max[split * p.rows + r]);
    float total = 0.0f;
    std::fill(row.begin(), row.end(), 0.0f);
    for (int split = 0; split < tile.num_splits; ++split) {
      const float m = part_max[split * p.rows + r];
      if (m == NEG_INF) continue;
      const float weight = exp_nonpositive(m - overall_max);
      total += weight * part_sum[split * p.rows + r];
      const float* a = part_acc + (static_cast<int64_t>(split) * p.rows + r) * Dp;
#pragma omp simd
      for (int d = 0; d < Dp; ++d) row[d] += weight * a[d];
    }
    const int head = kv_head * p.group + r % p.group;
    scalar_t* dst = out + (static_cast<int64_t>(tile.first_token + r / p.group) * p.num_heads + head) * p.head_dim;
    for (int d = 0; d < p.head_dim; ++d) dst[d] = static_cast<scalar_t>(row[d] / total);
  }
}

// Partial results of `splits` units of p.rows rows each
struct Partials {
  std::vector<float> max, sum, acc;
  void resize(const Problem& p, int splits) {
    const size_t rows = static_cast<size_t>(splits) * p.rows;
    if (max.size() < rows) max.resize(rows), sum.resize(rows), acc.resize(rows * p.padded_dim);
  }
  float* max_at(const Problem& p, int64_t unit) { return max.data() + unit * p.rows; }
  float* sum_at(const Problem& p, int64_t unit) { return sum.data() + unit * p.rows; }
  float* acc_at(const Problem& p, int64_t unit) { return acc.data() + unit * p.rows * p.padded_dim; }
};

// Work items: a (tile, kv head) whose tile has more than TILE_ROWS rows (prefill) runs its splits one after
// another in one task and combines them from the thread's own partials, so that memory stays per thread;
// one of a few rows (decode) gets an item per split, the splits running in parallel (flash-decoding) into
// shared partials that are combined once all are done. Each row's arithmetic is the same either way.
template <typename q_t, typename cache_t>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const std::vector<QueryTile>& tiles, const Problem& p,
                          at::Tensor& out) {
  struct Item { int tile, kv_head, split; };  // split -1: all of the pair's splits
  std::vector<Item> items;
  std::vector<int64_t> first_shared;  // per (tile, kv head): its first unit in `shared`, or -1
  int64_t shared_units = 0;
  for (size_t t = 0; t < tiles.size(); ++t) {
    const bool few_rows = tiles[t].num_positions * p.group <= TILE_ROWS;
    for (int h = 0; h < p.num_kv_heads; ++h) {
      first_shared.push_back(few_rows ? shared_units : -1);
      if (!few_rows) {
        items.push_back({static_cast<int>(t), h, -1});
        continue;
      }
      for (int split = 0; split < tiles[t].num_splits; ++split) items.push_back({static_cast<int>(t), h, split});
      shared_units += tiles[t].num_splits;
    }
  }
  Partials shared;
  shared.resize(p, static_cast<int>(shared_units));
  const q_t* q_data = q.data_ptr<q_t>();
  const cache_t* k_data = k_cache.data_ptr<cache_t>();
  const cache_t* v_data = v_cache.data_ptr<cache_t>();
  q_t* out_data = out.data_ptr<q_t>();
  const int* tables = block_tables.data_ptr<int>();
  const int64_t row_stride = static_cast<int64_t>(p.num_heads) * p.head_dim;

  int64_t work = 0;  // multiply-adds of Q K^T and P V, padding included
  for (const QueryTile& tile : tiles) work += int64_t{2} * unit_rows(p, tile) * (tile.first_index + tile.num_positions) * p.padded_dim;
#pragma omp parallel if (work * p.num_kv_heads > MIN_PARALLEL_WORK)
  {
#ifdef GORGON_AMX_SCORES
    if (p.amx) amx_scores_configure();
#endif
    Scratch scratch(p);
    Partials own;
    std::vector<float> row(p.padded_dim);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      const auto [t, kv_head, split] = items[i];
      const QueryTile& tile = tiles[t];
      const auto run = [&](int s, Partials& parts, int64_t unit) {
        const auto unit_fn = tile.num_positions * p.group <= TILE_ROWS ? run_unit_few_rows<q_t, cache_t> : run_unit<q_t, cache_t>;
        unit_fn(p, tile, kv_head, s, q_data + tile.first_token * row_stride, k_data, v_data,
                tables + static_cast<int64_t>(tile.seq) * p.max_blocks, scratch, parts.max_at(p, unit),
                parts.sum_at(p, unit), parts.acc_at(p, unit));
      };
      if (split >= 0) {
        run(split, shared, first_shared[t * p.num_kv_heads + kv_head] + split);
        continue;
      }
      own.resize(p, tile.num_splits);
      for (int s = 0; s < tile.num_splits; ++s) run(s, own, s);
      combine_splits(p, tile, kv_head, own.max_at(p, 0), own.sum_at(p, 0), own.acc_at(p, 0), out_data, row);
    }
#ifdef GORGON_AMX_SCORES
    if (p.amx) _tile_release();
#endif
  }
  if (shared_units == 0) return;
  at::parallel_for(0, static_cast<int64_t>(first_shared.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(p.padded_dim);
    for (int64_t pair = begin; pair < end; ++pair) {
      if (first_shared[pair] < 0) continue;
      combine_splits(p, tiles[pair / p.num_kv_heads], static_cast<int>(pair % p.num_kv_heads),
                     shared.max_at(p, first_shared[pair]), shared.sum_at(p, first_shared[pair]),
                     shared.acc_at(p, first_shared[pair]), out_data, row);
    }
  });
}

std::vector<QueryTile> plan_tiles(const Problem& p, const std::vector<int>& query_start,
                                  const std::vector<int>& context_lens) {
  std::vector<QueryTile> tiles;
  for (size_t seq = 0; seq < context_lens.size(); ++seq) {
    const int query_len = query_start[seq + 1] - query_start[seq];
    for (int first = 0; first < query_len; first += p.tile_positions) {
      QueryTile tile{static_cast<int>(seq), query_start[seq] + first, context_lens[seq] - query_len + first,
                     std::min(p.tile_positions, query_len - first), context_lens[seq], 0};
      tile.num_splits = position_of(p, tile, tile.first_index + tile.num_positions - 1) / KEYS_PER_SPLIT + 1;
      tiles.push_back(tile);
    }
  }
  // heaviest first (the dynamic schedule then balances causal prefill): work grows with the last index
  std::stable_sort(tiles.begin(), tiles.end(), [](const QueryTile& a, const QueryTile& b) {
    return a.first_index + a.num_positions > b.first_index + b.num_positions;
  });
  return tiles;
}

// t in dtype; the check skips torch's dispatcher (a microsecond or two per call) when it already is
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

std::vector<int> to_vector(const at::Tensor& t) {
  const at::Tensor c = as_type(t, at::kInt).contiguous();
  return std::vector<int>(c.data_ptr<int>(), c.data_ptr<int>() + c.numel());
}

}  // namespace

// Write the new tokens' K/V (k, v [num_tokens, num_kv_heads, head_dim]) into their cache slots, in the cache's dtype.
void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == slot_mapping.numel() && k.size(1) == k_cache.size(2) &&
                  k.size(2) == k_cache.size(3),
              "paged_attention: the new k/v do not fit the cache");
  const at::Tensor kc = as_type(k, k_cache.scalar_type()).contiguous(), vc = as_type(v, k_cache.scalar_type()).contiguous();
  const at::Tensor slots = as_type(slot_mapping, at::kLong).contiguous();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = kc.size(1) * kc.size(2) * kc.element_size();
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto* k_dst = static_cast<char*>(k_cache.data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.data_ptr());
  const auto* k_src = static_cast<const char*>(kc.data_ptr());
  const auto* v_src = static_cast<const char*>(vc.data_ptr());
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "paged_attention: slot ", slot[t], " is outside the cache");
    std::memcpy(k_dst + slot[t] * row_bytes, k_src + t * row_bytes, row_bytes);
    std::memcpy(v_dst + slot[t] * row_bytes, v_src + t * row_bytes, row_bytes);
  }
}

// q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]: the new tokens, whose
// K/V go to cache slots slot_mapping [num_tokens] first; caches [num_blocks, block_size, num_kv_heads,
// head_dim]; block_tables [num_seqs, max_blocks] int32; query_start_loc [num_seqs + 1]; context_lens
// [num_seqs]; tree_mask [num_seqs, T, T] bool or None (ForwardContext.tree_mask). Returns [num_tokens, num_heads,
// head_dim] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                           const at::Tensor& query_start_loc, const at::Tensor& context_lens,
                           const std::optional<at::Tensor>& tree_mask, double scale) {
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: the cpu backend needs CPU tensors");
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_attention: bad shapes");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (q_in.scalar_type() == k_cache.scalar_type() || q_in.scalar_type() == at::kFloat),
              "paged_attention: the caches must share q's dtype, or hold bf16/fp16 for an fp32 q");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: the caches must be contiguous");
  store_kv(k, v, k_cache, v_cache, slot_mapping);
  const at::Tensor q = q_in.contiguous();
  Problem p{};
  p.num_heads = static_cast<int>(q.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  TORCH_CHECK(k_cache.size(3) == p.head_dim && p.num_heads % p.num_kv_heads == 0,
              "paged_attention: head_dim or head counts do not match");
  const at::Tensor tables = as_type(block_tables, at::kInt).contiguous();
  p.max_blocks = static_cast<int>(tables.size(1));
  p.group = p.num_heads / p.num_kv_heads;
  p.padded_dim = round_up(p.head_dim, TILE_COLS);
  p.scale = static_cast<float>(scale);
#ifdef GORGON_AMX_SCORES
  p.amx = q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 && p.head_dim % 32 == 0 &&
          amx_scores_available();
#endif

  const std::vector<int> query_start = to_vector(query_start_loc), contexts = to_vector(context_lens);
  at::Tensor masks;
  std::vector<TreeShape> trees(contexts.size());
  int largest_tree = 0;
  if (tree_mask.has_value()) {
    masks = as_type(*tree_mask, at::kBool).contiguous();
    TORCH_CHECK(masks.dim() == 3 && masks.size(0) == static_cast<int64_t>(contexts.size()) &&
                    masks.size(1) == masks.size(2),
                "paged_attention: the tree mask must be [num_seqs, T, T]");
    const int size = static_cast<int>(masks.size(1));
    for (size_t seq = 0; seq < trees.size(); ++seq) {
      const bool* mask = masks.data_ptr<bool>() + seq * size * size;
      bool causal = true;  // (a sequence that verifies no tree: causal there too, as without the mask)
      for (int i = 0; i < size && causal; ++i)
        for (int j = 0; j < size; ++j) causal = causal && mask[i * size + j] == (j <= i);
      if (causal) continue;
      TreeShape& tree = trees[seq];
      tree.size = size;
      tree.mask = mask;
      for (int i = 0; i < size; ++i) {  // an entry sees itself and the entries of its path before it
        tree.depths.push_back(static_cast<int>(std::count(mask + i * size, mask + (i + 1) * size, true)) - 1);
        TORCH_CHECK(tree.depths[i] >= (i ? tree.depths[i - 1] : 0),
                    "paged_attention: the tree's nodes must come in order of depth");
        while (static_cast<int>(tree.first_at_depth.size()) <= tree.depths[i]) tree.first_at_depth.push_back(i);
      }
      tree.first_at_depth.push_back(size);
      tree.deepest = tree.depths.back();
      largest_tree = size;
    }
  }
  p.trees = &trees;
  p.max_tile_keys = round_up(KEY_TILE + largest_tree, TILE_COLS);
  int max_query_len = 1;
  for (size_t i = 0; i < contexts.size(); ++i) {
    max_query_len = std::max(max_query_len, query_start[i + 1] - query_start[i]);
  }
  p.tile_positions = std::min(max_query_len, std::max(1, QUERY_ROWS / p.group));
  // Too few units to keep every thread busy (a Medusa tree of one sequence: a unit per kv head): smaller tiles, of
  // at least TILE_ROWS rows. A row's arithmetic does not depend on its tile. (SmolLM2, 3 kv heads, a 9-node tree on
  // 2 threads: 2 units on one thread, 1 on the other; tiles of 5 nodes give 3 each.) Queries whose rows fit one tile
  // of TILE_COLS stay whole: each part would cost a whole tile (SmolLM2, 30 layers at 290 keys, a 4-node tree, fp32
  // over an fp16 cache: 1.72 -> 1.28 ms; 5 nodes, bf16: 1.62 -> 1.00 ms; one row 0.76-0.82 ms).
  const int units = static_cast<int>(contexts.size()) * p.num_kv_heads, wanted = 2 * at::get_num_threads();
  if (max_query_len * p.group > TILE_COLS && units * ceil_div(max_query_len, p.tile_positions) < wanted) {
    const int fewer = ceil_div(max_query_len, ceil_div(wanted, units));
    p.tile_positions = std::min(max_query_len, std::max(fewer, ceil_div(TILE_ROWS, p.group)));
  }
  p.rows = round_up(p.tile_positions * p.group, TILE_COLS);
  const std::vector<QueryTile> tiles = plan_tiles(p, query_start, contexts);

  at::Tensor out = at::empty_like(q);
  if (tiles.empty()) return out;
  const auto impl = [&](auto q_type, auto cache_type) {
    paged_attention_impl<decltype(q_type), decltype(cache_type)>(q, k_cache, v_cache, tables, tiles, p, out);
  };
  switch (k_cache.scalar_type()) {  // q of the cache's type, or fp32 (an fp32 model over a 16-bit cache)
    case at::kFloat: impl(float{}, float{}); break;
    case at::kBFloat16:
      q.scalar_type() == at::kFloat ? impl(float{}, at::BFloat16{}) : impl(at::BFloat16{}, at::BFloat16{});
      break;
    case at::kHalf: q.scalar_type() == at::kFloat ? impl(float{}, at::Half{}) : impl(at::Half{}, at::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", k_cache.scalar_type());
  }
  return out;
}

TORCH_LIBRARY(gorgon_attention, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor query_start_loc, Tensor context_lens, Tensor? tree_mask, float scale) "
        "-> Tensor");
  m.impl("paged_attention", c10::DispatchKey::CPU, &paged_attention);
}
