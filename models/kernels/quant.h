// Quantized weights (GGUF block formats) for decode-sized forwards: y = x W^T with W in its raw blocks.
//
// Formats (ggml's layouts; a row of K weights is K / block elements' blocks, rows are contiguous):
//   Q8_0  34 B / 32: fp16 d, int8 q            w = d q
//   Q4_0  18 B / 32: fp16 d, 16 B nibbles       w = d (q - 8)     (low nibbles: elements 0-15, high: 16-31)
//   Q4_1  20 B / 32: fp16 d, fp16 m, nibbles    w = d q + m
//   Q5_0  22 B / 32: fp16 d, 4 B fifth bits (bit i: element i), nibbles    w = d (q - 16)
//   Q5_1  24 B / 32: fp16 d, fp16 m, 4 B fifth bits, nibbles                w = d q + m
//   Q4_K 144 B / 256: fp16 d, dmin, 12 B of 6-bit (scale, min) per 32, 128 B nibbles    w = d sc q - dmin mn
//   Q5_K 176 B / 256: as Q4_K plus 32 B of fifth bits
//   Q6_K 210 B / 256: 128 B low nibbles, 64 B high 2 bits, int8 scale per 16, fp16 d    w = d sc (q - 32)
//   Q3_K 110 B / 256: 32 B third bits, 64 B low 2 bits, 12 B of 6-bit scales per 16, fp16 d    w = d (sc - 32) (q - 4)
//   Q2_K  84 B / 256: 16 B of 4-bit (scale, min) per 16, 64 B of 2 bits, fp16 d, dmin    w = d sc q - dmin mn
//   IQ4_NL 18 B / 32: fp16 d, 16 B nibbles indexing a table of 16 int8 values    w = d table[q]
//   IQ4_XS 136 B / 256: fp16 d, 6-bit scales per 32 (2 high bits in a uint16, 4 low ones in 4 B), nibbles as
//          IQ4_NL's    w = d (sc - 32) table[q]
//
// The kernels quantize each token row of x to int8 per block of 32 (scale dx = max|x| / 127) and take
// integer dot products, 4 products per 32-bit lane (AVX-512 VNNI vpdpbusd, or AVX2 maddubs + madd), as
// llama.cpp does: the dequantized weights are never materialised. Each lane of 4 weights shares one
// weight scale, so the integer lane sums are scaled in fp32 and summed. Against the exact dot product of
// x with the dequantized weights, the error is at most sum over blocks b of (max_b|x| / 254) * sum_b |w|
// (rounding each x to its nearest step, dx / 2), plus fp32 rounding.
//
// Three paths, chosen at run time (set_isa may force a lower one, for tests): AVX-512 (VNNI, two blocks
// per 512-bit vector), AVX2 (one block per 256-bit vector) and portable scalar code. Weights of every type
// are laid out anew at load, 16 rows interleaved ("packed", below), for kernels that need no
// horizontal sums and scale a block once for 16 rows (AVX2: 8): 2 to 6 times the row-by-row kernels'
// throughput on AVX-512, 1.1 to 4 times on AVX2, in cache; less (1.0x-2.7x) at one token row where the weight
// streams from memory (a Zen 4). On CPUs with AMX-INT8, the AVX-512 path takes the integer dot products of 9 to
// 16 token rows from tile products (see "AMX-INT8" below), with the same results.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)  // the build's -march has AMX (see "AMX-INT8" below)
#define GORGON_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace quant {

// ggml's type ids, as GGUF files and gguf.GGMLQuantizationType number them
enum QType : int64_t {
  kF32 = 0, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13,
  kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23
};

// IQ4_NL's non-linear 4-bit values (ggml's kvalues_iq4nl)
alignas(16) constexpr int8_t kIq4NlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                  1,    13,   25,  38,  53,  69,  89,  113};

// Weights that are signed bytes (the others are unsigned, less an offset): maddubs and vpdpbusd need an unsigned side
template <int64_t QT>
constexpr bool kSignedWeights = QT == kQ8_0 || QT == kIQ4_NL || QT == kIQ4_XS;

// Blocks of 32 in a block of the type: 8 in a super-block of 256, else 1. The row kernels unroll a super-block,
// so that each sub-block's bit positions and shifts are constants: Q3_K, Q5_K and Q6_K rows ran 1.3x-1.6x faster
// on a Zen 4, AVX2 and AVX-512 paths alike (Q2_K and IQ4_XS: within the machine's noise)
template <int64_t QT>
constexpr int64_t kSubBlocks = (QT == kQ2_K || QT == kQ3_K || QT == kQ4_K || QT == kQ5_K || QT == kQ6_K ||
                                QT == kIQ4_XS) ? 8 : 1;

// Scale of sub-block j (0..7) of an IQ4_XS super-block at p
inline float iq4_xs_scale(const uint8_t* p, int j, float d) {
  const int high = (p[2 + j / 4] >> (2 * (j % 4))) & 3;  // (the uint16's bits 2j, 2j + 1, little-endian)
  return d * ((((p[4 + j / 2] >> (4 * (j % 2))) & 0xF) | (high << 4)) - 32);
}

struct Format {
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

inline Format format_of(int64_t qtype) {
  switch (qtype) {
    case kQ8_0: return {32, 34};
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    case kQ3_K: return {256, 110};
    case kQ2_K: return {256, 84};
    case kIQ4_NL: return {32, 18};
    case kIQ4_XS: return {256, 136};
    default: throw std::invalid_argument("quantized linear: unsupported ggml type " + std::to_string(qtype));
  }
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// --- one block of 32 weights in portable code: integer values q (offset removed) and scales -------------

struct Block32 {
  int16_t q[32];    // integer weights; w = scale[i / 16] * q[i] + min[i / 16]
  float scale[2];   // per 16 weights (equal halves except Q6_K, Q3_K, Q2_K)
  float min[2];     // the same (different halves: Q2_K)
};

// 6-bit scale i (0..15) of a Q3_K super-block's 12 packed bytes: low 4 bits in byte i % 8 (its high nibble
// for i >= 8), high 2 bits in byte 8 + i % 4 (bits 2 (i / 4) and up); stored + 32
inline int q3_scale(const uint8_t* s, int i) {
  return (((s[i % 8] >> (4 * (i / 8))) & 0xF) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block's 12 packed bytes
inline void k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Block b (of 32 weights) of a row in format qtype
inline void unpack_scalar(int64_t qtype, const uint8_t* row, int64_t b, Block32* out) {
  out->min[0] = out->min[1] = 0.f;
  switch (qtype) {
    case kQ8_0: {
      const uint8_t* p = row + b * 34;
      out->scale[0] = out->scale[1] = half(p);
      for (int i = 0; i < 32; ++i) out->q[i] = static_cast<int8_t>(p[2 + i]);
      return;
    }
    case kIQ4_NL:
    case kIQ4_XS: {
      const bool xs = qtype == kIQ4_XS;
      const uint8_t* p = row + (xs ? (b / 8) * 136 : b * 18);
      const uint8_t* qs = xs ? p + 8 + 16 * (b % 8) : p + 2;
      out->scale[0] = out->scale[1] = xs ? iq4_xs_scale(p, b % 8, half(p)) : half(p);
      for (int i = 0; i < 16; ++i) {
        out->q[i] = kIq4NlValues[qs[i] & 0xF];
        out->q[i + 16] = kIq4NlValues[qs[i] >> 4];
      }
      return;
    }
    case kQ4_0:
    case kQ4_1: {
      const bool q41 = qtype == kQ4_1;
      const uint8_t* p = row + b * (q41 ? 20 : 18);
      const uint8_t* qs = p + (q41 ? 4 : 2);
      out->scale[0] = out->scale[1] = half(p);
      if (q41) out->min[0] = out->min[1] = half(p + 2);
      const int offset = q41 ? 0 : 8;
      for (int i = 0; i < 16; ++i) {
        out->q[i] = (qs[i] & 0xF) - offset;
        out->q[i + 16] = (qs[i] >> 4) - offset;
      }
      return;
    }
    case kQ5_0:
    case kQ5_1: {
      const bool q51 = qtype == kQ5_1;
      const uint8_t* p = row + b * (q51 ? 24 : 22);
      uint32_t qh;
      std::memcpy(&qh, p + (q51 ? 4 : 2), 4);
      const uint8_t* qs = p + (q51 ? 8 : 6);
      out->scale[0] = out->scale[1] = half(p);
      if (q51) out->min[0] = out->min[1] = half(p + 2);
      const int offset = q51 ? 0 : 16;
      for (int i = 0; i < 16; ++i) {
        out->q[i] = ((qs[i] & 0xF) | ((qh >> i) & 1) << 4) - offset;
        out->q[i + 16] = ((qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4) - offset;
      }
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const bool q5 = qtype == kQ5_K;
      const uint8_t* p = row + (b / 8) * (q5 ? 176 : 144);
      const int j = b % 8;
      int sc, mn;
      k_scale_min(p + 4, j, &sc, &mn);
      out->scale[0] = out->scale[1] = half(p) * sc;
      out->min[0] = out->min[1] = -half(p + 2) * mn;
      const uint8_t* qh = p + 16;
      const uint8_t* qs = p + (q5 ? 48 : 16) + 32 * (j / 2);
      for (int i = 0; i < 32; ++i) {
        int v = (qs[i] >> (4 * (j % 2))) & 0xF;
        if (q5) v |= ((qh[i] >> j) & 1) << 4;
        out->q[i] = v;
      }
      return;
    }
    case kQ6_K: {
      const uint8_t* p = row + (b / 8) * 210;
      const int j = b % 8, h = j / 4, t = j % 4;
      const uint8_t* ql = p + 64 * h + 32 * (t % 2);
      const uint8_t* qh = p + 128 + 32 * h;
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
      const float d = half(p + 208);
      out->scale[0] = d * sc[2 * j];
      out->scale[1] = d * sc[2 * j + 1];
      for (int i = 0; i < 32; ++i)
        out->q[i] = (((ql[i] >> (4 * (t / 2))) & 0xF) | (((qh[i] >> (2 * t)) & 3) << 4)) - 32;
      return;
    }
    case kQ3_K:
    case kQ2_K: {  // sub-block j: bits 2t.. of the 2-bit bytes of half h (Q3_K: + bit j of hmask, times 4)
      const bool q3 = qtype == kQ3_K;
      const uint8_t* p = row + (b / 8) * (q3 ? 110 : 84);
      const int j = b % 8, h = j / 4, t = j % 4;
      const uint8_t* qs = p + (q3 ? 32 : 16) + 32 * h;
      for (int i = 0; i < 32; ++i) {
        const int v = (qs[i] >> (2 * t)) & 3;
        out->q[i] = q3 ? (v | ((p[i] >> j) & 1) << 2) - 4 : v;
      }
      for (int e = 0; e < 2; ++e) {
        if (q3) {
          out->scale[e] = half(p + 108) * q3_scale(p + 96, 2 * j + e);
        } else {
          out->scale[e] = half(p + 80) * (p[2 * j + e] & 0xF);
          out->min[e] = -half(p + 82) * (p[2 * j + e] >> 4);
        }
      }
      return;
    }
    default: throw std::invalid_argument("quantized linear: unsupported ggml type " + std::to_string(qtype));
  }
}

// --- packed weights: Q4_0, Q4_1, Q8_0, Q4_K and Q6_K interleaved in groups of 16 rows ----------------------
// One 512-bit VNNI instruction then multiplies 4 weights of each of 16 rows by 4 activations they share
// (AVX2: two instructions for 8 rows), so a block's integer dot products need no horizontal sums, and its
// scales are applied once per block for 16 rows (8). Per group of 16 rows and block of the format ("group
// block"; K-quants: their super-block of 256):
//   Q4_0, Q8_0: fp16 d[16] | quants;  Q4_1: fp16 d[16] | fp16 m[16] | quants
//   Q5_0, Q5_1: as Q4_0, Q4_1, with a chunk of fifth bits before the quants (bit c of byte e: element 4c + e)
//   Q4_K: fp16 d[16] | fp16 dmin[16] | uint8 sc[8][16] | uint8 mn[8][16] | quants of sub-block pairs 0..3
//   Q5_K: as Q4_K, with 512 bytes of fifth bits before the quants (bit j of byte e of chunk c: element 4c + e
//         of sub-block j)
//   Q6_K: fp16 d[16] | int8 sc[16][16] (per 16 weights) | low nibbles as Q4_K's | high 2 bits: 2 planes
//   Q2_K: fp16 d[16] | fp16 dmin[16] | uint8 sc[16][16] | uint8 mn[16][16] (per 16 weights) | 2 planes of 2 bits
//   Q3_K: fp16 d[16] | int8 sc[16][16] (its 6-bit scales less 32, per 16 weights) | 512 bytes of third bits (as
//         Q5_K's fifth) | low 2 bits: 2 planes (as Q6_K's high bits)
//   IQ4_NL: as Q4_0;  IQ4_XS: fp16 d[16] | int8 sc[8][16] (its 6-bit scales less 32) | 8 blocks as Q4_0's
// where quants come in chunks of 16 rows x 4 bytes, chunk c holding bytes 4c..4c+3 of each row's quant bytes
// (Q4: nibble bytes, 16 a block, 32 a K-quant sub-block pair; Q8_0: 32 bytes, each + 128 so that it is
// unsigned). Q6_K's plane p holds sub-blocks 4p..4p+3 of 32: the high bits of element 4c + e of sub-block j
// are bits 2 (j % 4) of byte e of chunk c; its runs of 512 bytes lie in the order the kernels read them
// (nibbles of pair 0, plane 0, pairs 1 and 2, plane 1, pair 3): with the planes after the nibbles, the kernels
// streamed a weight larger than the caches at half the speed (a Zen 4). repack() makes the layout once, at
// load time; a packed weight is uint8 [N / 16, K / block, group block bytes], as many bytes as the file's.
constexpr int64_t kGroupRows = 16;
// The decode kernels read a block of weights while they prefetch the one kPrefetchAhead bytes further on. With
// several token rows a block takes long enough to compute that the few misses in flight without it left memory
// idle: on a 2-core Xeon (SmolLM2's linears, from DRAM) 3 token rows took 1.4x the time of one, and one row
// itself 1.3x what it takes now (1.1x at 1 thread). 2-8 KiB ahead did about the same; 1 KiB was too close.
constexpr int64_t kPrefetchAhead = 4096;
// The cache lines of [p, p + bytes) moved `ahead` bytes on (x86 ignores a prefetch past the end of memory)
template <int64_t ahead = kPrefetchAhead>
inline void prefetch_ahead(const void* p, int64_t bytes) {
  const char* first = static_cast<const char*>(p) + ahead;
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + offset);
}
// Only the types with blocks of 32 weights: Qwen2.5-1.5B's Q4_K / Q6_K linears (1536 and 8960 inputs) ran 1.3x
// slower at one token row with these prefetches, whole blocks at once or spread over the sub-blocks as they are
// read (the same Xeon, 2 threads).
template <int64_t QT>
constexpr bool kSuperBlocks = QT == kQ4_K || QT == kQ5_K || QT == kQ6_K || QT == kQ3_K || QT == kQ2_K || QT == kIQ4_XS;

inline bool packable(int64_t qtype) {
  return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ5_0 || qtype == kQ5_1 || qtype == kQ8_0 || qtype == kQ4_K ||
         qtype == kQ5_K || qtype == kQ6_K || qtype == kQ3_K || qtype == kQ2_K || qtype == kIQ4_NL || qtype == kIQ4_XS;
}

inline int64_t quants_offset(int64_t qtype) {  // within a group block
  switch (qtype) {
    case kQ4_K: return 64 + 256;
    case kQ5_K: return 64 + 256 + 512;
    case kQ6_K:
    case kQ3_K: return 32 + 256;
    case kQ2_K: return 64 + 512;
    case kQ4_1: return 64;
    case kQ5_0: return 32 + 64;
    case kQ5_1: return 64 + 64;
    case kIQ4_XS: return 32 + 128;
    default: return 32;
  }
}

inline int64_t group_block_bytes(int64_t qtype) {
  const int64_t row_quants = qtype == kQ6_K ? 192 : qtype == kQ3_K ? 96 : qtype == kQ2_K ? 64
                             : format_of(qtype).block == 256 ? 128
                             : qtype == kQ8_0 ? 32 : 16;
  return quants_offset(qtype) + kGroupRows * row_quants;
}

// Byte e (0..3) of chunk c (0..7) of row i, within a 512-byte run of chunks
inline int64_t chunk_byte(int64_t c, int64_t i, int64_t e) { return c * 64 + 4 * i + e; }

// Where sub-block j's nibbles and high bits lie in a Q6_K group block's quants
constexpr int64_t q6_k_nibbles(int j) { return (j / 2 + (j >= 2) + (j >= 6)) * 512; }  // runs 0, 2, 3, 5
constexpr int64_t q6_k_high(int j) { return (j < 4 ? 1 : 4) * 512; }

// Row i's `bytes` bytes at src into runs of `run` bytes a row (a run of the group block: 16 rows x run bytes, byte
// 4c + e of a row's run at chunk_byte(c, i, e)), 4 bytes at a time, each XORed with `flip`
inline void copy_runs(const uint8_t* src, int64_t bytes, int64_t run, int64_t i, uint8_t* quants, uint32_t flip = 0) {
  for (int64_t r = 0; r < bytes / run; ++r) {
    for (int64_t c = 0; c < run / 4; ++c) {
      uint32_t v;
      std::memcpy(&v, src + r * run + 4 * c, 4);
      v ^= flip;
      std::memcpy(quants + r * 16 * run + chunk_byte(c, i, 0), &v, 4);
    }
  }
}

// Row i's Q6_K super-block src into its group block dst (see above). Sub-block j of the file: bits 4 (t / 2) of
// ql (its low nibbles), bits 2t of qh, for h = j / 4, t = j % 4 (unpack_scalar); a byte of a pair's nibbles holds
// sub-blocks 2k and 2k + 1, and a byte of plane h holds bits 2t of sub-blocks 4h + t: qh's own byte.
inline void repack_q6_k(const uint8_t* src, int64_t i, uint8_t* dst) {
  std::memcpy(dst + 2 * i, src + 208, 2);
  for (int s = 0; s < 16; ++s) dst[32 + 16 * s + i] = src[192 + s];
  uint8_t* quants = dst + quants_offset(kQ6_K);
  for (int k = 0; k < 4; ++k) {  // the pair of sub-blocks 2k, 2k + 1: nibbles 4 (k % 2) of ql's 64 (k / 2) + 0 / 32
    const uint8_t* ql = src + 64 * (k / 2);
    const int shift = 4 * (k % 2);
    for (int c = 0; c < 8; ++c) {
      uint32_t even, odd;
      std::memcpy(&even, ql + 4 * c, 4);
      std::memcpy(&odd, ql + 32 + 4 * c, 4);
      const uint32_t n = ((even >> shift) & 0x0F0F0F0Fu) | (((odd >> shift) & 0x0F0F0F0Fu) << 4);
      std::memcpy(quants + q6_k_nibbles(2 * k) + chunk_byte(c, i, 0), &n, 4);
    }
  }
  for (int h = 0; h < 2; ++h) copy_runs(src + 128 + 32 * h, 32, 32, i, quants + q6_k_high(4 * h));
}

// rows [N, row_bytes] of K weights (N % 16 == 0) -> packed [N / 16, K / block, group block bytes]
inline void repack(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, uint8_t* out) {
  const Format f = format_of(qtype);
  const int64_t gbb = group_block_bytes(qtype), blocks = K / f.block;
  const int64_t quant_bytes = qtype == kQ8_0 ? 32 : f.block / 2, quants_in_block = f.bytes - quant_bytes;
  at::parallel_for(0, N / kGroupRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* dst = out + (g * blocks + b) * gbb;
        uint8_t* quants = dst + quants_offset(qtype);
        for (int64_t i = 0; i < kGroupRows; ++i) {
          const uint8_t* src = w + (g * kGroupRows + i) * row_bytes + b * f.bytes;
          if (qtype == kQ6_K) {
            repack_q6_k(src, i, dst);
            continue;
          }
          if (qtype == kQ2_K) {  // the file's 2-bit bytes are already the planes' bytes, row by row
            std::memcpy(dst + 2 * i, src + 80, 2);
            std::memcpy(dst + 32 + 2 * i, src + 82, 2);
            for (int s = 0; s < 16; ++s) {
              dst[64 + 16 * s + i] = src[s] & 0xF;
              dst[64 + 256 + 16 * s + i] = src[s] >> 4;
            }
            copy_runs(src + 16, 64, 32, i, quants);
            continue;
          }
          if (qtype == kQ3_K) {  // the file's hmask and 2-bit bytes are already the planes' bytes, row by row
            std::memcpy(dst + 2 * i, src + 108, 2);
            for (int s = 0; s < 16; ++s) dst[32 + 16 * s + i] = static_cast<uint8_t>(q3_scale(src + 96, s));
            copy_runs(src, 96, 32, i, quants);
            continue;
          }
          std::memcpy(dst + 2 * i, src, 2);                                                    // d
          const bool k_quant = qtype == kQ4_K || qtype == kQ5_K;
          if (qtype == kQ4_1 || qtype == kQ5_1 || k_quant) std::memcpy(dst + 32 + 2 * i, src + 2, 2);  // m / dmin
          if (qtype == kQ5_0 || qtype == kQ5_1) {
            uint32_t fifth;
            std::memcpy(&fifth, src + (qtype == kQ5_1 ? 4 : 2), 4);
            for (int e = 0; e < 4; ++e) {
              uint8_t bits = 0;
              for (int c = 0; c < 8; ++c) bits |= ((fifth >> (4 * c + e)) & 1) << c;
              quants[-64 + chunk_byte(0, i, e)] = bits;
            }
          }
          if (k_quant) {
            for (int j = 0; j < 8; ++j) {
              int sc, mn;
              k_scale_min(src + 4, j, &sc, &mn);
              dst[64 + 16 * j + i] = static_cast<uint8_t>(sc);
              dst[64 + 128 + 16 * j + i] = static_cast<uint8_t>(mn);
            }
          }
          if (qtype == kQ5_K)  // byte e of the file's 32 holds bit j of element e of sub-block j
            copy_runs(src + 16, 32, 32, i, quants - 512);
          if (qtype == kIQ4_XS)
            for (int j = 0; j < 8; ++j)
              dst[32 + 16 * j + i] = static_cast<uint8_t>(std::lround(iq4_xs_scale(src, j, 1.f)));
          // runs of 32 quant bytes a row (Q4_K, Q5_K: a sub-block pair; Q8_0: a block) or 16 (a block of nibbles)
          const int64_t run = qtype == kQ4_K || qtype == kQ5_K || qtype == kQ8_0 ? 32 : 16;
          copy_runs(src + quants_in_block, quant_bytes, run, i, quants, qtype == kQ8_0 ? 0x80808080u : 0);
        }
      }
    }
  });
}

// Where a weight matrix's blocks lie: rows in the file's format, or packed
struct Weights {
  const uint8_t* data;
  int64_t row_bytes;  // of a row in the file's format
  int64_t blocks;     // blocks of the format per row
  bool packed;
};

// Block b (of 32 weights) of row n, as unpack_scalar gives it
inline void unpack_block(int64_t qtype, const Weights& w, int64_t n, int64_t b, Block32* out) {
  if (!w.packed) return unpack_scalar(qtype, w.data + n * w.row_bytes, b, out);
  const int64_t i = n % kGroupRows, per_block = format_of(qtype).block / 32;  // 32-blocks in a block
  const uint8_t* blk = w.data + (n / kGroupRows * w.blocks + b / per_block) * group_block_bytes(qtype);
  const uint8_t* quants = blk + quants_offset(qtype);
  if (qtype == kQ2_K) {
    const int j = b % 8;
    for (int e = 0; e < 2; ++e) {
      out->scale[e] = half(blk + 2 * i) * blk[64 + 16 * (2 * j + e) + i];
      out->min[e] = -half(blk + 32 + 2 * i) * blk[64 + 256 + 16 * (2 * j + e) + i];
    }
    for (int e = 0; e < 32; ++e)
      out->q[e] = (quants[512 * (j / 4) + chunk_byte(e / 4, i, e % 4)] >> (2 * (j % 4))) & 3;
    return;
  }
  if (qtype == kQ3_K) {
    const int j = b % 8;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 32);
    out->scale[0] = half(blk + 2 * i) * sc[16 * (2 * j) + i];
    out->scale[1] = half(blk + 2 * i) * sc[16 * (2 * j + 1) + i];
    out->min[0] = out->min[1] = 0.f;
    for (int e = 0; e < 32; ++e) {
      const int at = chunk_byte(e / 4, i, e % 4);
      out->q[e] = (((quants[512 * (1 + j / 4) + at] >> (2 * (j % 4))) & 3) | ((quants[at] >> j) & 1) << 2) - 4;
    }
    return;
  }
  if (qtype == kQ4_K || qtype == kQ5_K || qtype == kQ6_K) {
    const int j = b % 8;  // sub-block; its nibbles are the low (j even) or high (j odd) ones of pair j / 2
    for (int e = 0; e < 32; ++e)
      out->q[e] = (quants[(qtype == kQ6_K ? q6_k_nibbles(j) : (j / 2) * 512) + chunk_byte(e / 4, i, e % 4)] >>
                   (4 * (j % 2))) & 0xF;
    if (qtype == kQ6_K) {
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 32);
      out->scale[0] = half(blk + 2 * i) * sc[16 * (2 * j) + i];
      out->scale[1] = half(blk + 2 * i) * sc[16 * (2 * j + 1) + i];
      out->min[0] = out->min[1] = 0.f;
      const uint8_t* plane = quants + q6_k_high(j);
      for (int e = 0; e < 32; ++e)
        out->q[e] += (((plane[chunk_byte(e / 4, i, e % 4)] >> (2 * (j % 4))) & 3) << 4) - 32;
      return;
    }
    if (qtype == kQ5_K)
      for (int e = 0; e < 32; ++e) out->q[e] |= ((quants[-512 + chunk_byte(e / 4, i, e % 4)] >> j) & 1) << 4;
    out->scale[0] = out->scale[1] = half(blk + 2 * i) * blk[64 + 16 * j + i];
    out->min[0] = out->min[1] = -half(blk + 32 + 2 * i) * blk[64 + 128 + 16 * j + i];
    return;
  }
  out->scale[0] = out->scale[1] = half(blk + 2 * i);
  out->min[0] = out->min[1] = qtype == kQ4_1 || qtype == kQ5_1 ? half(blk + 32 + 2 * i) : 0.f;
  if (qtype == kIQ4_XS) {
    out->scale[0] = out->scale[1] = half(blk + 2 * i) * static_cast<int8_t>(blk[32 + 16 * (b % 8) + i]);
    quants += (b % 8) * 256;
  }
  const bool five = qtype == kQ5_0 || qtype == kQ5_1;
  for (int j = 0; j < (qtype == kQ8_0 ? 32 : 16); ++j) {
    const uint8_t v = quants[chunk_byte(j / 4, i, j % 4)];
    if (qtype == kQ8_0) {
      out->q[j] = static_cast<int8_t>(v ^ 0x80);
    } else if (qtype == kIQ4_NL || qtype == kIQ4_XS) {
      out->q[j] = kIq4NlValues[v & 0xF];
      out->q[j + 16] = kIq4NlValues[v >> 4];
    } else {
      const int offset = qtype == kQ4_0 ? 8 : qtype == kQ5_0 ? 16 : 0;
      const uint8_t fifth = five ? quants[-64 + chunk_byte(0, i, j % 4)] : 0;  // bit c: element 4c + j % 4
      out->q[j] = ((v & 0xF) | ((fifth >> (j / 4)) & 1) << 4) - offset;
      out->q[j + 16] = ((v >> 4) | ((fifth >> (j / 4 + 4)) & 1) << 4) - offset;
    }
  }
}

// [N, K] weights -> out [N, K] fp32 (the dequantization the kernels must agree with)
inline void dequantize(int64_t qtype, const Weights& w, int64_t N, int64_t K, float* out) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    Block32 blk;
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t b = 0; b < K / 32; ++b) {
        unpack_block(qtype, w, n, b, &blk);
        float* o = out + n * K + b * 32;
        for (int i = 0; i < 32; ++i) o[i] = blk.scale[i / 16] * blk.q[i] + blk.min[i / 16];
      }
    }
  });
}

// --- activations: each token row quantized to int8 per block of 32 -----------------------------------------

// Per token row, padded to a multiple of 64 weights with zeros; "lane" = 4 consecutive elements. The packed
// kernels read the same values block-major instead (quantize_activations(..., packed = true)), so that a
// block's token rows lie side by side at constant offsets: a kernel over 8 token rows needs one pointer, not 8.
struct Activations {
  int64_t M = 0, Kp = 0;
  std::vector<int8_t> q;       // [M, Kp], or packed [Kp / 32, M, 32]
  std::vector<float> scale;    // [M, Kp / 4]: the lane's block scale dx
  std::vector<int32_t> init;   // [M, Kp / 4]: -offset * (sum of the lane's q): removes an unsigned weight offset
  std::vector<float> qsum;     // [M, Kp / 4]: dx * (sum of the lane's q): multiplies a weight block's min
  std::vector<float> block_scale;   // packed [Kp / 32, M]: dx of each block
  std::vector<int32_t> block_init;  // packed [Kp / 32, M]: -offset * (sum of the block's q)
  std::vector<float> block_qsum;    // packed [Kp / 32, M]: dx * (sum of the block's q)
  std::vector<int32_t> half_sums;   // packed [Kp / 32, M]: the sums of the block's two halves' q, as int16s
                                    // (first half low): the scales of Q6_K, Q3_K and Q2_K are per 16
};

#define QUANT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QUANT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

// One block of 32 activations -> q = round-to-nearest-even(x / d), d = max |x| / 127, and the sums of q's 8 lanes
// of 4; returns d. The AVX2 version gives the same values, bit for bit; the scalar loops do not vectorise (the
// max and nearbyint), and at 8 token rows of a 256 x 1536 Q4_1 matrix they took a quarter of the call.
// A block holding a NaN or an infinity returns d = NaN with q = 0, so that the row's outputs are NaN, as the
// float matmul's are: max() would drop a NaN from d and its cast to int8 is undefined, which turned an overflow
// upstream into plausible numbers, different on each path.
inline float non_finite_block(int8_t* q, int32_t (&lane_sums)[8]) {
  std::memset(q, 0, 32);
  std::fill(lane_sums, lane_sums + 8, 0);
  return std::numeric_limits<float>::quiet_NaN();
}

inline float quantize_block(const float* xb, int8_t* q, int32_t (&lane_sums)[8]) {
  float amax = 0.f;
  bool finite = true;
  for (int i = 0; i < 32; ++i) {
    amax = std::max(amax, std::abs(xb[i]));
    finite &= std::isfinite(xb[i]);
  }
  if (!finite) return non_finite_block(q, lane_sums);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
  for (int l = 0; l < 8; ++l) lane_sums[l] = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
  return amax / 127.f;
}

QUANT_AVX2 inline float quantize_block_avx2(const float* xb, int8_t* q, int32_t (&lane_sums)[8]) {
  __m256 v[4], amax = _mm256_setzero_ps(), non_finite = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]);
    amax = _mm256_max_ps(amax, abs);
    non_finite = _mm256_or_ps(non_finite, _mm256_cmp_ps(abs, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));
  }
  if (_mm256_movemask_ps(non_finite)) return non_finite_block(q, lane_sums);
  __m128 max4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
  const float a = _mm_cvtss_f32(_mm_max_ss(max4, _mm_movehdup_ps(max4)));
  const __m256 inv = _mm256_set1_ps(a > 0.f ? 127.f / a : 0.f);
  __m256i n[4];
  for (int i = 0; i < 4; ++i)
    n[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // the packs interleave the 4 vectors' 4-value halves per 128-bit lane; the permute puts them back in order
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_sums), sums);
  return a / 127.f;
}

inline void quantize_activations(const float* x, int64_t M, int64_t K, int offset, bool packed, bool avx2,
                                 Activations* a) {
  a->M = M;
  a->Kp = (K + 63) / 64 * 64;
  const int64_t lanes = a->Kp / 4, blocks = a->Kp / 32;
  a->q.assign(M * a->Kp, 0);
  if (packed) {
    a->block_scale.assign(M * blocks, 0.f);
    a->block_init.assign(M * blocks, 0);
    a->block_qsum.assign(M * blocks, 0.f);
    a->half_sums.assign(M * blocks, 0);
  } else {
    a->scale.assign(M * lanes, 0.f);
    a->init.assign(M * lanes, 0);
    a->qsum.assign(M * lanes, 0.f);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* xb = x + m * K + b * 32;
      int8_t* q = a->q.data() + (packed ? (b * M + m) * 32 : m * a->Kp + b * 32);
      int32_t lane_sums[8];
      const float d = avx2 ? quantize_block_avx2(xb, q, lane_sums) : quantize_block(xb, q, lane_sums);
      int32_t block_sum = 0;
      for (int l = 0; l < 8; ++l) {
        const int32_t s = lane_sums[l];
        block_sum += s;
        if (packed) continue;
        const int64_t lane = m * lanes + b * 8 + l;
        a->scale[lane] = d;
        a->init[lane] = -offset * s;
        a->qsum[lane] = d * s;
      }
      if (packed) {
        a->block_scale[b * M + m] = d;
        a->block_init[b * M + m] = -offset * block_sum;
        a->block_qsum[b * M + m] = d * block_sum;
        const int32_t first = lane_sums[0] + lane_sums[1] + lane_sums[2] + lane_sums[3];  // |sum| <= 16 * 127
        const uint32_t second = static_cast<uint32_t>(block_sum - first);
        a->half_sums[b * M + m] = static_cast<int32_t>((static_cast<uint32_t>(first) & 0xFFFF) | second << 16);
      }
    }
  }
}

// --- SIMD unpacking of one block of 32 weights: raw bytes as the dot product takes them ---------------------
// q: the 32 weights as unsigned bytes (offset not removed; Q8_0: signed), scale/min: per lane of 4.

QUANT_AVX2 inline float half_f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

QUANT_AVX2 inline __m256i nibbles(const uint8_t* qs) {  // 16 bytes -> low nibbles, then high nibbles
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), mask), _mm_and_si128(t, mask));
}

// Q5_0 / Q5_1: the 16 bytes of nibbles at qs and the 32 fifth bits at qh -> 32 weights, as unsigned bytes
QUANT_AVX2 inline __m256i five_bits(const uint8_t* qh, const uint8_t* qs) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const __m256i spread = _mm256_shuffle_epi8(  // byte i: byte i / 8 of the bits (within each 128-bit half)
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte i: bit i % 8
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_or_si256(nibbles(qs), _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

template <int64_t QT>
struct Simd;

template <>
struct Simd<kQ8_0> {
  static constexpr int offset = 0;  // signed weights: each path handles the sign itself
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + b * 34;
    *scale = _mm256_set1_ps(half_f16c(p));
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
  }
};

template <>
struct Simd<kIQ4_NL> {
  static constexpr int offset = 0;  // signed weights, as Q8_0's
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + b * 18;
    *scale = _mm256_set1_ps(half_f16c(p));
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues)));
    return _mm256_shuffle_epi8(table, nibbles(p + 2));
  }
};

template <>
struct Simd<kIQ4_XS> {
  static constexpr int offset = 0;  // signed weights, as Q8_0's
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + (b / 8) * 136;
    *scale = _mm256_set1_ps(iq4_xs_scale(p, b % 8, half_f16c(p)));
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues)));
    return _mm256_shuffle_epi8(table, nibbles(p + 8 + 16 * (b % 8)));
  }
};

template <>
struct Simd<kQ4_0> {
  static constexpr int offset = 8;
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + b * 18;
    *scale = _mm256_set1_ps(half_f16c(p));
    return nibbles(p + 2);
  }
};

template <>
struct Simd<kQ4_1> {
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256* min) {
    const uint8_t* p = row + b * 20;
    *scale = _mm256_set1_ps(half_f16c(p));
    *min = _mm256_set1_ps(half_f16c(p + 2));
    return nibbles(p + 4);
  }
};

template <>
struct Simd<kQ5_0> {
  static constexpr int offset = 16;
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + b * 22;
    *scale = _mm256_set1_ps(half_f16c(p));
    return five_bits(p + 2, p + 6);
  }
};

template <>
struct Simd<kQ5_1> {
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256* min) {
    const uint8_t* p = row + b * 24;
    *scale = _mm256_set1_ps(half_f16c(p));
    *min = _mm256_set1_ps(half_f16c(p + 2));
    return five_bits(p + 4, p + 8);
  }
};

template <bool Q5>
struct SimdK {
  static constexpr int offset = 0;
  static constexpr bool has_min = true;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256* min) {
    const uint8_t* p = row + (b / 8) * (Q5 ? 176 : 144);
    const int j = b % 8;
    int sc, mn;
    k_scale_min(p + 4, j, &sc, &mn);
    *scale = _mm256_set1_ps(half_f16c(p) * sc);
    *min = _mm256_set1_ps(-half_f16c(p + 2) * mn);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (Q5 ? 48 : 16) + 32 * (j / 2)));
    __m256i v = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (j % 2))), _mm256_set1_epi8(0xF));
    if (Q5) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
      v = _mm256_or_si256(v, _mm256_slli_epi16(bit, 4));
    }
    return v;
  }
};

template <>
struct Simd<kQ4_K> : SimdK<false> {};
template <>
struct Simd<kQ5_K> : SimdK<true> {};

template <>
struct Simd<kQ6_K> {
  static constexpr int offset = 32;
  static constexpr bool has_min = false;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256*) {
    const uint8_t* p = row + (b / 8) * 210;
    const int j = b % 8, h = j / 4, t = j % 4;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = half_f16c(p + 208);
    *scale = _mm256_set_m128(_mm_set1_ps(d * sc[2 * j + 1]), _mm_set1_ps(d * sc[2 * j]));
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h + 32 * (t % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (t / 2))), _mm256_set1_epi8(0xF));
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
};

// Q3_K, Q2_K: sub-block j's 2-bit values are bits 2t.. of the 32 bytes of half h (Q3_K: + bit j of hmask, times 4)
template <bool Q3>
struct SimdLowK {
  static constexpr int offset = Q3 ? 4 : 0;
  static constexpr bool has_min = !Q3;
  QUANT_AVX2 static inline __m256i q(const uint8_t* row, int64_t b, __m256* scale, __m256* min) {
    const uint8_t* p = row + (b / 8) * (Q3 ? 110 : 84);
    const int j = b % 8, h = j / 4, t = j % 4;
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (Q3 ? 32 : 16) + 32 * h));
    __m256i v = _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    if (Q3) {
      const float d = half_f16c(p + 108);
      *scale = _mm256_set_m128(_mm_set1_ps(d * q3_scale(p + 96, 2 * j + 1)), _mm_set1_ps(d * q3_scale(p + 96, 2 * j)));
      const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
      v = _mm256_or_si256(v, _mm256_slli_epi16(bit, 2));
    } else {
      const float d = half_f16c(p + 80), dmin = half_f16c(p + 82);
      *scale = _mm256_set_m128(_mm_set1_ps(d * (p[2 * j + 1] & 0xF)), _mm_set1_ps(d * (p[2 * j] & 0xF)));
      *min = _mm256_set_m128(_mm_set1_ps(-dmin * (p[2 * j + 1] >> 4)), _mm_set1_ps(-dmin * (p[2 * j] >> 4)));
    }
    return v;
  }
};

template <>
struct Simd<kQ3_K> : SimdLowK<true> {};
template <>
struct Simd<kQ2_K> : SimdLowK<false> {};

// --- the dot-product kernels: MB token rows against weight rows [n_begin, n_end) --------------------------
// rows < MB repeats the last token row (its results are not written). Each token row's arithmetic is the
// same whatever MB, so a row's result does not depend on the batch it comes in (Medusa's verification of
// several rows must reproduce plain decoding of one exactly).

// --- AVX-512: two blocks (64 weights) per 512-bit vector ---------------------------------------------------
// Pair<QT>::q(row, b, second, &scale, &min): blocks b and b + 1 (b even; second = false: block b + 1 does not
// exist, its activations are zero, so any bytes will do), weights as unsigned bytes and per-lane scale / min.

QUANT_AVX512 inline __m512 lanes_of(__m128 v, __m512i index) {  // lane i of the result: v[index[i]]
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(v));
}

QUANT_AVX512 inline __m512i halves(int first, int second) {  // lane i: first for i < 8, else second
  return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(first), _mm512_set1_epi32(second));
}

QUANT_AVX512 inline __m128 two_halves(const uint8_t* a, const uint8_t* b) {  // fp16 at a and b -> [a, b, ., .]
  uint16_t ha, hb;
  std::memcpy(&ha, a, 2);
  std::memcpy(&hb, b, 2);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(ha | (static_cast<uint32_t>(hb) << 16)));
}

QUANT_AVX512 inline __m512i nibble_pair(const uint8_t* a, const uint8_t* b) {  // two blocks' 16 B of nibbles
  const __m128i qa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(qa),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
  const __m256i mask = _mm256_set1_epi8(0xF);
  const __m256i lo = _mm256_and_si256(t, mask), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), mask);
  // [lo a, lo b, hi a, hi b] -> [lo a, hi a, lo b, hi b]
  return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7),
                                  _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

// Per-lane scale and min of two blocks that start with fp16 (d, m): Q4_1, Q5_1
QUANT_AVX512 inline void scale_and_min(const uint8_t* pa, const uint8_t* pb, __m512* scale, __m512* min) {
  uint32_t da, db;
  std::memcpy(&da, pa, 4);
  std::memcpy(&db, pb, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(da), db, 1));  // [d a, m a, d b, m b]
  *scale = lanes_of(dm, halves(0, 2));
  *min = lanes_of(dm, halves(1, 3));
}

template <int64_t QT>
struct Pair;

template <>
struct Pair<kQ8_0> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512*) {
    const uint8_t *pa = row + b * 34, *pb = second ? pa + 34 : pa;
    *scale = lanes_of(two_halves(pa, pb), halves(0, 1));
    const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa + 2));
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(wa),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + 2)), 1);
    return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128: unsigned
  }
};

template <>
struct Pair<kIQ4_NL> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512*) {
    const uint8_t *pa = row + b * 18, *pb = second ? pa + 18 : pa;
    *scale = lanes_of(two_halves(pa, pb), halves(0, 1));
    const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues)));
    const __m512i w = _mm512_shuffle_epi8(table, nibble_pair(pa + 2, pb + 2));
    return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128: unsigned, as Q8_0's
  }
};

template <>
struct Pair<kIQ4_XS> {  // sub-blocks j and j + 1 (j even) of one super-block
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool, __m512* scale, __m512*) {
    const uint8_t* p = row + (b / 8) * 136;
    const int j = b % 8;
    const float d = half_f16c(p);
    *scale = lanes_of(_mm_setr_ps(iq4_xs_scale(p, j, d), iq4_xs_scale(p, j + 1, d), 0.f, 0.f), halves(0, 1));
    const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues)));
    const __m512i w = _mm512_shuffle_epi8(table, nibble_pair(p + 8 + 16 * j, p + 8 + 16 * (j + 1)));
    return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
};

template <>
struct Pair<kQ4_0> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512*) {
    const uint8_t *pa = row + b * 18, *pb = second ? pa + 18 : pa;
    *scale = lanes_of(two_halves(pa, pb), halves(0, 1));
    return nibble_pair(pa + 2, pb + 2);
  }
};

template <>
struct Pair<kQ4_1> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512* min) {
    const uint8_t *pa = row + b * 20, *pb = second ? pa + 20 : pa;
    scale_and_min(pa, pb, scale, min);
    return nibble_pair(pa + 4, pb + 4);
  }
};

// Q5_0 / Q5_1: each block's 32 weights (element order) from five_bits, one block per 256-bit half
template <>
struct Pair<kQ5_0> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512*) {
    const uint8_t *pa = row + b * 22, *pb = second ? pa + 22 : pa;
    *scale = lanes_of(two_halves(pa, pb), halves(0, 1));
    return _mm512_inserti64x4(_mm512_castsi256_si512(five_bits(pa + 2, pa + 6)), five_bits(pb + 2, pb + 6), 1);
  }
};

template <>
struct Pair<kQ5_1> {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool second, __m512* scale, __m512* min) {
    const uint8_t *pa = row + b * 24, *pb = second ? pa + 24 : pa;
    scale_and_min(pa, pb, scale, min);
    return _mm512_inserti64x4(_mm512_castsi256_si512(five_bits(pa + 4, pa + 8)), five_bits(pb + 4, pb + 8), 1);
  }
};

// Q4_K / Q5_K: the two sub-blocks of a pair share 32 bytes of nibbles (low: first, high: second)
template <bool Q5>
struct PairK {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool, __m512* scale, __m512* min) {
    const uint8_t* p = row + (b / 8) * (Q5 ? 176 : 144);
    const int j = b % 8;
    int sa, ma, sb, mb;
    k_scale_min(p + 4, j, &sa, &ma);
    k_scale_min(p + 4, j + 1, &sb, &mb);
    const __m128 dd = two_halves(p, p + 2);  // [d, dmin, ., .]
    const __m128 f = _mm_mul_ps(_mm_setr_ps(sa, sb, -ma, -mb), _mm_shuffle_ps(dd, dd, _MM_SHUFFLE(1, 1, 0, 0)));
    *scale = lanes_of(f, halves(0, 1));
    *min = lanes_of(f, halves(2, 3));
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (Q5 ? 48 : 16) + 16 * j));
    const __m256i mask = _mm256_set1_epi8(0xF);
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, mask)),
                                   _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask), 1);
    if (Q5) {  // fifth bits: bit j of qh for the first sub-block, bit j + 1 for the second
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);
      const __m512i shifts = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(j), _mm512_set1_epi16(j + 1));
      const __m512i bits = _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(1));
      v = _mm512_or_si512(v, _mm512_slli_epi16(bits, 4));
    }
    return v;
  }
};

template <>
struct Pair<kQ4_K> : PairK<false> {};
template <>
struct Pair<kQ5_K> : PairK<true> {};

template <>
struct Pair<kQ6_K> {  // the pair's low nibbles are 64 consecutive bytes; their high bits share 32 bytes
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool, __m512* scale, __m512*) {
    const uint8_t* p = row + (b / 8) * 210;
    const int j = b % 8, h = j / 4, t = j % 4;  // t even
    const __m128i sc = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(p + 192 + 2 * j)));
    const __m128 s = _mm_mul_ps(_mm_cvtepi32_ps(sc), _mm_set1_ps(half_f16c(p + 208)));
    *scale = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                   _mm512_castps128_ps512(s));
    const __m512i ql = _mm512_loadu_si512(p + 64 * h);
    const __m512i lo = _mm512_and_si512(_mm512_srl_epi16(ql, _mm_cvtsi32_si128(4 * (t / 2))), _mm512_set1_epi8(0xF));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);
    const __m512i shifts = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(2 * t), _mm512_set1_epi16(2 * t + 2));
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(3));
    return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
  }
};

// Q3_K, Q2_K: sub-blocks j and j + 1 (j even) read the same 32 bytes of 2-bit values (bits 2t.. and 2t + 2..)
template <bool Q3>
struct PairLowK {
  QUANT_AVX512 static inline __m512i q(const uint8_t* row, int64_t b, bool, __m512* scale, __m512* min) {
    const uint8_t* p = row + (b / 8) * (Q3 ? 110 : 84);
    const int j = b % 8, h = j / 4, t = j % 4;
    const __m512i four = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);  // lanes per scale
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (Q3 ? 32 : 16) + 32 * h));
    const __m512i shifts = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(2 * t), _mm512_set1_epi16(2 * t + 2));
    __m512i v = _mm512_and_si512(_mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(qs), qs, 1), shifts),
                                 _mm512_set1_epi8(3));
    if (Q3) {
      const float d = half_f16c(p + 108);
      const __m128 s = _mm_mul_ps(_mm_setr_ps(q3_scale(p + 96, 2 * j), q3_scale(p + 96, 2 * j + 1),
                                              q3_scale(p + 96, 2 * j + 2), q3_scale(p + 96, 2 * j + 3)),
                                  _mm_set1_ps(d));
      *scale = _mm512_permutexvar_ps(four, _mm512_castps128_ps512(s));
      const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m512i bit_shifts = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi16(j), _mm512_set1_epi16(j + 1));
      const __m512i bits = _mm512_and_si512(
          _mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(hm), hm, 1), bit_shifts), _mm512_set1_epi8(1));
      v = _mm512_or_si512(v, _mm512_slli_epi16(bits, 2));
    } else {
      const __m128i packed = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(p + 2 * j)));
      const __m128 sc = _mm_cvtepi32_ps(_mm_and_si128(packed, _mm_set1_epi32(0xF)));
      const __m128 mn = _mm_cvtepi32_ps(_mm_srli_epi32(packed, 4));
      *scale = _mm512_permutexvar_ps(four, _mm512_castps128_ps512(_mm_mul_ps(sc, _mm_set1_ps(half_f16c(p + 80)))));
      *min = _mm512_permutexvar_ps(four, _mm512_castps128_ps512(_mm_mul_ps(mn, _mm_set1_ps(-half_f16c(p + 82)))));
    }
    return v;
  }
};

template <>
struct Pair<kQ3_K> : PairLowK<true> {};
template <>
struct Pair<kQ2_K> : PairLowK<false> {};

template <int64_t QT, int MB>
QUANT_AVX512 void rows_avx512(const Activations& a, int64_t rows, const uint8_t* w, int64_t row_bytes, int64_t K,
                              float* y, int64_t N, int64_t m0, int64_t n_begin, int64_t n_end) {
  constexpr bool has_min = Simd<QT>::has_min, has_offset = kSignedWeights<QT> || Simd<QT>::offset != 0;
  constexpr int64_t kStep = std::max<int64_t>(kSubBlocks<QT>, 2);  // blocks of 32 a step: a super-block, or a pair
  const int64_t blocks = K / 32, lanes = a.Kp / 4;
  const int8_t* xq[MB];
  const float *xs[MB], *xsum[MB];
  const int32_t* xinit[MB];
  for (int m = 0; m < MB; ++m) {
    const int64_t r = m0 + std::min<int64_t>(m, rows - 1);
    xq[m] = a.q.data() + r * a.Kp;
    xs[m] = a.scale.data() + r * lanes;
    xsum[m] = a.qsum.data() + r * lanes;
    xinit[m] = a.init.data() + r * lanes;
  }
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += kStep) {
#pragma GCC unroll 4
      for (int64_t jj = 0; jj < kStep; jj += 2) {  // unrolled: a sub-block's bit positions become constants
        const int64_t b = b0 + jj;
        __m512 scale, min;
        const __m512i q = Pair<QT>::q(row, b, b + 1 < blocks, &scale, &min);
        const int64_t lane = b * 8;
        for (int m = 0; m < MB; ++m) {
          const __m512i init = has_offset ? _mm512_loadu_si512(xinit[m] + lane) : _mm512_setzero_si512();
          const __m512i dot = _mm512_dpbusd_epi32(init, q, _mm512_loadu_si512(xq[m] + b * 32));
          const __m512 s = _mm512_mul_ps(scale, _mm512_loadu_ps(xs[m] + lane));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[m]);
          if (has_min) acc[m] = _mm512_fmadd_ps(min, _mm512_loadu_ps(xsum[m] + lane), acc[m]);
        }
      }
    }
    for (int m = 0; m < rows; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

QUANT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int64_t QT, int MB>
QUANT_AVX2 void rows_avx2(const Activations& a, int64_t rows, const uint8_t* w, int64_t row_bytes, int64_t K,
                          float* y, int64_t N, int64_t m0, int64_t n_begin, int64_t n_end) {
  using F = Simd<QT>;
  const int64_t blocks = K / 32, lanes = a.Kp / 4;
  const int8_t* xq[MB];
  const float *xs[MB], *xsum[MB];
  const int32_t* xinit[MB];
  for (int m = 0; m < MB; ++m) {
    const int64_t r = m0 + std::min<int64_t>(m, rows - 1);
    xq[m] = a.q.data() + r * a.Kp;
    xs[m] = a.scale.data() + r * lanes;
    xsum[m] = a.qsum.data() + r * lanes;
    xinit[m] = a.init.data() + r * lanes;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += kSubBlocks<QT>) {
#pragma GCC unroll 8
      for (int64_t j = 0; j < kSubBlocks<QT>; ++j) {  // unrolled: a sub-block's bit positions become constants
        const int64_t b = b0 + j;
        __m256 scale, min;
        __m256i q = F::q(row, b, &scale, &min);
        // maddubs multiplies unsigned by signed bytes: signed weights (Q8_0, IQ4_NL) move their signs onto x
        // (|w| <= 128 cannot saturate the 16-bit pair sums); the unsigned formats' q <= 63 cannot either
        const __m256i wsigned = q;
        if (kSignedWeights<QT>) q = _mm256_sign_epi8(q, q);
        const int64_t lane = b * 8;
        for (int m = 0; m < MB; ++m) {
          __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m] + b * 32));
          if (kSignedWeights<QT>) x = _mm256_sign_epi8(x, wsigned);
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
          if (F::offset)
            dot = _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xinit[m] + lane)));
          const __m256 s = _mm256_mul_ps(scale, _mm256_loadu_ps(xs[m] + lane));
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[m]);
          if (F::has_min) acc[m] = _mm256_fmadd_ps(min, _mm256_loadu_ps(xsum[m] + lane), acc[m]);
        }
      }
    }
    for (int m = 0; m < rows; ++m) y[(m0 + m) * N + n] = hsum256(acc[m]);
  }
}

// Same arithmetic as the SIMD paths, in portable code: integer lane sums scaled per lane
inline void rows_scalar(int64_t qtype, const Activations& a, int64_t rows, const Weights& w, int64_t K, float* y,
                        int64_t N, int64_t m0, int64_t n_begin, int64_t n_end) {
  const int64_t lanes = a.Kp / 4;
  Block32 blk;
  std::vector<float> acc(rows);
  for (int64_t n = n_begin; n < n_end; ++n) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < K / 32; ++b) {
      unpack_block(qtype, w, n, b, &blk);
      for (int64_t m = 0; m < rows; ++m) {
        const int8_t* xq = a.q.data() + (m0 + m) * a.Kp + b * 32;
        for (int l = 0; l < 8; ++l) {
          int32_t dot = 0;
          for (int i = 4 * l; i < 4 * l + 4; ++i) dot += blk.q[i] * xq[i];
          const int64_t lane = (m0 + m) * lanes + b * 8 + l;
          acc[m] += dot * (blk.scale[l / 4] * a.scale[lane]) + blk.min[l / 4] * a.qsum[lane];
        }
      }
    }
    for (int64_t m = 0; m < rows; ++m) y[(m0 + m) * N + n] = acc[m];
  }
}

// --- instruction-set choice --------------------------------------------------------------------------------

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kScalar;
}

inline int isa_from_name(const std::string& name) {  // "" or "auto": the best this CPU runs
  const int best = best_isa();
  if (name.empty() || name == "auto" || name == "avx512") return best;
  if (name == "avx2") return std::min<int>(best, kAvx2);
  if (name == "scalar") return kScalar;
  throw std::invalid_argument("GORGON_CPU_ISA must be auto, avx512, avx2 or scalar, got " + name);
}

inline int& current_isa() {
  static int isa = [] {
    const char* env = std::getenv("GORGON_CPU_ISA");
    return isa_from_name(env ? env : "");
  }();
  return isa;
}

inline const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

// --- AMX-INT8 (Intel Xeon since Sapphire Rapids), for 2+ token rows ----------------------------------------
// On the AVX-512 path, a block's integer dot products for up to 16 token rows can come from one tile multiply
// (tdpbsud: 16 x 16 x 64 byte products at once) in place of 8 vpdpbusd per token row, which bound a step
// of a few rows (Medusa's trees, small batches) on 2 cores. The int32 sums are exact either way and every
// fp32 step after them is the same, so each row's result is bitwise that of the VNNI path. Compiled where the
// build's -march has AMX (builds are per machine), used where Linux grants the process the tile state.
// AMX takes the formats with a scale per 32 weights (Q4_K's per sub-block included), from this many token rows:
// a block's tile product and its round trip through memory cost about what 8 token rows' vpdpbusd do (Q4_K,
// Q4_1 and Q8_0 matrices, 2 threads; at 3 rows, 1.7x the time), and Q6_K, Q3_K and Q2_K, which scale each 16
// weights, need two products a block and gained nothing even at 16 rows
constexpr int64_t kAmxMinRows = 9;

template <int64_t QT>
constexpr bool kAmxTakes = !(QT == kQ6_K || QT == kQ3_K || QT == kQ2_K);

inline bool amx_available() {
#ifdef GORGON_AMX
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it, the first tile instruction raises SIGILL
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

// On by default where available; GORGON_CPU_ISA (avx512, avx2, scalar) runs as a CPU without it would
inline bool& amx_enabled() {
  static bool on = [] {
    const char* env = std::getenv("GORGON_CPU_ISA");
    return amx_available() && (env == nullptr || *env == 0 || std::string(env) == "auto");
  }();
  return on;
}

// --- y[M, N] = x[M, K] W^T for W's rows in format qtype; x and y fp32 -------------------------------------

template <int64_t QT>
void gemv_q(const Activations& a, const uint8_t* w, int64_t row_bytes, int64_t K, float* y, int64_t N, int isa) {
  const int64_t M = a.M;
  // ~32 KiB of weights per task: enough to amortise scheduling, small enough to balance the threads
  const int64_t grain = std::max<int64_t>(4, 32 * 1024 / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t rows = std::min<int64_t>(8, M - m0);
      if (isa == kScalar) {
        rows_scalar(QT, a, rows, Weights{w, row_bytes, K / format_of(QT).block, false}, K, y, N, m0, begin, end);
        continue;
      }
#define QUANT_CALL(MB)                                                                      \
  (isa == kAvx512 ? rows_avx512<QT, MB>(a, rows, w, row_bytes, K, y, N, m0, begin, end) \
                  : rows_avx2<QT, MB>(a, rows, w, row_bytes, K, y, N, m0, begin, end))
      if (rows == 1) QUANT_CALL(1);
      else if (rows == 2) QUANT_CALL(2);
      else if (rows <= 4) QUANT_CALL(4);
      else QUANT_CALL(8);
#undef QUANT_CALL
    }
  });
}

// Packed weights, AVX-512 VNNI: MB token rows against the 16 rows of one group. Per 32 weights and token row:
// dot = sum of q x in 16 int32 lanes (one per weight row; an offset o of the weights, q - o, is taken off
// through the activations' block sum), then acc += dot * d * dx (+ m * dx * sum x for Q4_1; Q4_K: d * sc and
// - dmin * mn in place of d and m).

// The activations of MB token rows from row m0, at their 32-block x32 (the packed layout of Activations)
template <int MB>
struct PackedRows {
  const int8_t* q;
  const float *scale, *qsum;
  const int32_t *init, *half_sums;
  PackedRows(const Activations& a, int64_t x32, int64_t m0)
      : q(a.q.data() + (x32 * a.M + m0) * 32), scale(a.block_scale.data() + x32 * a.M + m0),
        qsum(a.block_qsum.data() + x32 * a.M + m0), init(a.block_init.data() + x32 * a.M + m0),
        half_sums(a.half_sums.data() + x32 * a.M + m0) {}
};

#ifdef GORGON_AMX
#define QUANT_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

// The tiles of `rows` token rows: 0 a 32-block's dot products (rows x 16 int32), 1 its activations (rows x 32
// bytes), 2 its weights (8 x 64 bytes: chunk c is row c, the layout tdpbsud takes)
QUANT_AMX inline void configure_tiles(int rows) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 32, 64};
    uint8_t rows[16] = {};
  } config;
  config.rows[0] = config.rows[1] = static_cast<uint8_t>(rows);
  config.rows[2] = 8;
  _tile_loadconfig(&config);
}
#else
#define QUANT_AMX QUANT_AVX512
#endif

// The tiles' dot products of one batch of up to 8 32-blocks (a super-block of 256, or 8 blocks of 32)
template <int MB>
struct TileDots {
  alignas(64) uint8_t weights[2][8][512];  // two batches' 32-blocks' 8 chunks of weights, as tdpbsud takes them
  alignas(64) int32_t dots[8][MB][16];     // [32-block][token row][weight row]
};

#ifdef GORGON_AMX
// Each 32-block i < count of a batch, from 32-block x32 of the activations: its dot products from its
// weights[i]. Those were stored a whole batch earlier: a tile load of bytes just written by vector stores waits
// for them to leave the store buffer (4x the time of the product, measured).
template <int MB>
QUANT_AMX inline void tile_products(const Activations& a, int64_t x32, int64_t m0, int count,
                                    const uint8_t (*weights)[512], TileDots<MB>* t) {
  for (int i = 0; i < count; ++i) {
    _tile_zero(0);
    _tile_loadd(1, PackedRows<MB>(a, x32 + i, m0).q, 32);
    _tile_loadd(2, weights[i], 64);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, t->dots[i], 64);
  }
}
#endif

// dot + w's unsigned bytes times the 4 signed bytes at x4 (every lane's), x4 read by the instruction as an embedded
// broadcast: GCC keeps _mm512_set1_epi32 a separate vpbroadcastd per chunk, one more instruction per 4 products
// per token row
QUANT_AVX512 inline __m512i dpbusd_broadcast(__m512i dot, __m512i w, const int8_t* x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(dot) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x4)));
  return dot;
}

// acc[m] += the 32-block x against weights w[8] (w[c]: weights 4c..4c+3 of each of the 16 rows, unsigned,
// offset o), scaled by d and min per row. The integer dot products: tile_dots[m] (amx; w is then unused),
// else vpdpbusd's
template <int MB, bool has_offset, bool has_min, bool amx>
QUANT_AMX inline void packed_block(const PackedRows<MB>& x, const __m512i (&w)[8], const int32_t (*tile_dots)[16],
                                   __m512 d, __m512 min, __m512 (&acc)[MB]) {
  for (int m = 0; m < MB; ++m) {
    __m512i dot = has_offset ? _mm512_set1_epi32(x.init[m]) : _mm512_setzero_si512();
    if constexpr (amx) {
      dot = _mm512_add_epi32(dot, _mm512_load_si512(tile_dots[m]));
    } else {
      for (int c = 0; c < 8; ++c) dot = dpbusd_broadcast(dot, w[c], x.q + m * 32 + 4 * c);
    }
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(x.scale[m])), acc[m]);
    if (has_min) acc[m] = _mm512_fmadd_ps(min, _mm512_set1_ps(x.qsum[m]), acc[m]);
  }
}

// Q6_K, Q3_K, Q2_K: acc[m] += the 32-block x against weights w[8] (unsigned, less `offset`), whose halves
// (w[0..3], w[4..7]) have scales scale0 and scale1 (d sc) per row, and minimums min0 and min1 (Q2_K)
template <int MB, int offset, bool has_min>
QUANT_AVX512 inline void packed_block_halves(const PackedRows<MB>& x, const __m512i (&w)[8], __m512 scale0,
                                             __m512 scale1, __m512 min0, __m512 min1, __m512 (&acc)[MB]) {
  for (int m = 0; m < MB; ++m) {
    const int32_t sums = x.half_sums[m];
    __m512i dot[2] = {_mm512_set1_epi32(-offset * static_cast<int16_t>(sums & 0xFFFF)),
                      _mm512_set1_epi32(-offset * (sums >> 16))};
    for (int c = 0; c < 8; ++c) dot[c / 4] = dpbusd_broadcast(dot[c / 4], w[c], x.q + m * 32 + 4 * c);
    const __m512 both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0]), scale0,
                                        _mm512_mul_ps(_mm512_cvtepi32_ps(dot[1]), scale1));
    acc[m] = _mm512_fmadd_ps(both, _mm512_set1_ps(x.scale[m]), acc[m]);
    if (has_min) {
      acc[m] = _mm512_fmadd_ps(min0, _mm512_set1_ps(x.scale[m] * static_cast<int16_t>(sums & 0xFFFF)), acc[m]);
      acc[m] = _mm512_fmadd_ps(min1, _mm512_set1_ps(x.scale[m] * (sums >> 16)), acc[m]);
    }
  }
}

QUANT_AVX512 inline __m512 halves16(const uint8_t* p) {  // 16 fp16 -> fp32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

QUANT_AVX512 inline __m512 bytes16(const uint8_t* p) {  // 16 uint8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

QUANT_AVX512 inline __m512 signed_bytes16(const uint8_t* p) {  // 16 int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// IQ4_NL / IQ4_XS: a block's 4 chunks of nibbles -> its 8 chunks of weights, + 128 (unsigned; the activations'
// offset takes it off)
QUANT_AVX512 inline void iq4_chunks(const uint8_t* quants, __m512i (&w)[8]) {
  const __m512i table = _mm512_xor_si512(
      _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues))), _mm512_set1_epi8(-128));
  const __m512i low = _mm512_set1_epi8(0xF);
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_loadu_si512(quants + 64 * c);
    w[c] = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low));
    w[c + 4] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// Q5_0 / Q5_1: chunk c's nibbles with their fifth bits (bit c of each byte of the chunk `fifth`) at bit 4
QUANT_AVX512 inline __m512i with_fifth_bit(__m512i nibbles, __m512i fifth, int c) {
  const __m512i bit = c < 4 ? _mm512_slli_epi16(fifth, 4 - c) : _mm512_srli_epi16(fifth, c - 4);
  return _mm512_or_si512(nibbles, _mm512_and_si512(bit, _mm512_set1_epi8(0x10)));
}

// Chunk c of Q2_K sub-block j, from its 2-bit planes: 16 rows x 4 weights, 0..3
QUANT_AVX512 inline __m512i two_bit_chunk(const uint8_t* planes, int j, int c) {
  const __m512i p = _mm512_loadu_si512(planes + 512 * (j / 4) + 64 * c);
  return _mm512_and_si512(_mm512_srli_epi16(p, 2 * (j % 4)), _mm512_set1_epi8(3));
}

// Chunk c of Q3_K sub-block j of a group block's quants: 16 rows x 4 weights, 0..7
QUANT_AVX512 inline __m512i q3_k_chunk(const uint8_t* quants, int j, int c) {
  const __m512i h = _mm512_loadu_si512(quants + 64 * c);
  const __m512i third = j < 2 ? _mm512_slli_epi16(h, 2 - j) : _mm512_srli_epi16(h, j - 2);  // bit j to bit 2
  return _mm512_or_si512(two_bit_chunk(quants + 512, j, c), _mm512_and_si512(third, _mm512_set1_epi8(4)));
}

// Chunk c of Q6_K sub-block j of a group block's quants: 16 rows x 4 weights, 0..63
QUANT_AVX512 inline __m512i q6_k_chunk(const uint8_t* quants, int j, int c) {
  const __m512i v = _mm512_loadu_si512(quants + q6_k_nibbles(j) + 64 * c);
  const __m512i p = _mm512_loadu_si512(quants + q6_k_high(j) + 64 * c);
  const int t = j % 4;  // the high bits, at bits 2t of each byte, move to bits 4-5
  const __m512i top = t < 2 ? _mm512_slli_epi16(p, 4 - 2 * t) : _mm512_srli_epi16(p, 2 * t - 4);
  const __m512i low = _mm512_and_si512(j % 2 ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0xF));
  return _mm512_or_si512(low, _mm512_and_si512(top, _mm512_set1_epi8(0x30)));
}

// Blocks [begin, end) of a group, each 32-block x32 (numbered from the group's first) handed to the visitor as
// its weights and scales: visit.full<has_offset, has_min>(x32, w, scale, min) or, for scales per 16 weights,
// visit.halves<offset, has_min>(x32, w, scale0, scale1, min0, min1). The visitors are inlined, and what one
// does not read (the scales, or with AMX's products the weights) is never computed.
template <int64_t QT, typename Visit>
QUANT_AMX inline void for_each_block(const uint8_t* group, int64_t begin, int64_t end, const Visit& visit) {
  const __m512i low = _mm512_set1_epi8(0xF);
  const int64_t gbb = group_block_bytes(QT);
  __m512i w[8];
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* blk = group + b * gbb;
    if constexpr (!kSuperBlocks<QT>) prefetch_ahead(blk, gbb);
    const uint8_t* quants = blk + quants_offset(QT);
    if (QT == kQ4_K || QT == kQ5_K) {
      const __m512 d = halves16(blk), dmin = halves16(blk + 32);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // sub-blocks: the low nibbles of pair j / 2, then its high ones
        for (int c = 0; c < 8; ++c) {
          const __m512i v = _mm512_loadu_si512(quants + (j / 2) * 512 + 64 * c);
          w[c] = _mm512_and_si512(j % 2 ? _mm512_srli_epi16(v, 4) : v, low);
          if (QT == kQ5_K) w[c] = with_fifth_bit(w[c], _mm512_loadu_si512(quants - 512 + 64 * c), j);
        }
        const __m512 scale = _mm512_mul_ps(d, bytes16(blk + 64 + 16 * j));
        const __m512 min = _mm512_mul_ps(dmin, _mm512_sub_ps(_mm512_setzero_ps(), bytes16(blk + 64 + 128 + 16 * j)));
        visit.template full<false, true>(b * 8 + j, w, scale, min);
      }
      continue;
    }
    if constexpr (QT == kQ6_K || QT == kQ3_K || QT == kQ2_K) {  // scales (and Q2_K's minimums) per 16 weights
      const __m512 d = halves16(blk), dmin = QT == kQ2_K ? halves16(blk + 32) : _mm512_setzero_ps();
      const uint8_t* sc = blk + (QT == kQ2_K ? 64 : 32);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // unrolled: the bit positions become constants
        for (int c = 0; c < 8; ++c)
          w[c] = QT == kQ6_K ? q6_k_chunk(quants, j, c) : QT == kQ3_K ? q3_k_chunk(quants, j, c)
                                                                       : two_bit_chunk(quants, j, c);
        const __m512 scale0 = _mm512_mul_ps(d, signed_bytes16(sc + 16 * (2 * j)));
        const __m512 scale1 = _mm512_mul_ps(d, signed_bytes16(sc + 16 * (2 * j + 1)));
        __m512 min[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // Q2_K's -dmin mn; the others read no minimums
        for (int e = 0; e < 2 && QT == kQ2_K; ++e)
          min[e] = _mm512_mul_ps(dmin, _mm512_sub_ps(_mm512_setzero_ps(), bytes16(sc + 256 + 16 * (2 * j + e))));
        visit.template halves<QT == kQ6_K ? 32 : QT == kQ3_K ? 4 : 0, QT == kQ2_K>(b * 8 + j, w, scale0, scale1,
                                                                                  min[0], min[1]);
      }
      continue;
    }
    if (QT == kIQ4_XS) {
      const __m512 d = halves16(blk);
      for (int j = 0; j < 8; ++j) {
        iq4_chunks(quants + 256 * j, w);
        const __m512 scale = _mm512_mul_ps(d, signed_bytes16(blk + 32 + 16 * j));
        visit.template full<true, false>(b * 8 + j, w, scale, _mm512_setzero_ps());
      }
      continue;
    }
    if (QT == kQ8_0) {
      for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(quants + 64 * c);
    } else if (QT == kIQ4_NL) {
      iq4_chunks(quants, w);
    } else {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(quants + 64 * c);
        w[c] = _mm512_and_si512(v, low);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        if (QT == kQ5_0 || QT == kQ5_1) {
          const __m512i fifth = _mm512_loadu_si512(quants - 64);
          w[c] = with_fifth_bit(w[c], fifth, c);
          w[c + 4] = with_fifth_bit(w[c + 4], fifth, c + 4);
        }
      }
    }
    const __m512 d = halves16(blk);
    if (QT == kQ4_1 || QT == kQ5_1) visit.template full<false, true>(b, w, d, halves16(blk + 32));
    else visit.template full<true, false>(b, w, d, _mm512_setzero_ps());
  }
}

// The visitor that adds each 32-block's products to acc: the integer dot products from vpdpbusd, or (amx)
// from the tiles of the batch that starts at 32-block first32
template <int MB, bool amx>
struct Accumulate {
  const Activations& a;
  int64_t m0;
  __m512 (&acc)[MB];
  const TileDots<MB>* tiles;
  int64_t first32;

  template <bool has_offset, bool has_min>
  QUANT_AMX void full(int64_t x32, const __m512i (&w)[8], __m512 scale, __m512 min) const {
    packed_block<MB, has_offset, has_min, amx>(PackedRows<MB>(a, x32, m0), w, dots(x32), scale, min, acc);
  }
  template <int offset, bool has_min>  // (not with AMX)
  QUANT_AMX void halves(int64_t x32, const __m512i (&w)[8], __m512 scale0, __m512 scale1, __m512 min0,
                        __m512 min1) const {
    packed_block_halves<MB, offset, has_min>(PackedRows<MB>(a, x32, m0), w, scale0, scale1, min0, min1, acc);
  }
  const int32_t (*dots(int64_t x32) const)[16] { return amx ? tiles->dots[x32 - first32] : nullptr; }
};

// The visitor that stores each 32-block's weights for the tiles (buffer `slot` of a batch from 32-block first32)
template <int MB>
struct StoreWeights {
  TileDots<MB>* tiles;
  int slot;
  int64_t first32;

  template <bool, bool>
  QUANT_AMX void full(int64_t x32, const __m512i (&w)[8], __m512, __m512) const {
    for (int c = 0; c < 8; ++c) _mm512_store_si512(tiles->weights[slot][x32 - first32] + 64 * c, w[c]);
  }
};

// MB token rows against the 16 rows of one group. With AMX, a batch of 8 32-blocks at a time: the next batch's
// weights stored, this batch's tile products, then its scaling (as without AMX).
template <int64_t QT, int MB, bool amx>
QUANT_AMX void packed_group_avx512(const Activations& a, const uint8_t* group, int64_t blocks, float* y, int64_t N,
                                   int64_t m0, int64_t n0) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  if constexpr (!amx) {
    for_each_block<QT>(group, 0, blocks, Accumulate<MB, false>{a, m0, acc, nullptr, 0});
  } else {
#ifdef GORGON_AMX
    constexpr int64_t sub = kSubBlocks<QT>, batch = 8 / sub;  // format blocks per batch
    TileDots<MB> tiles;
    for_each_block<QT>(group, 0, std::min(blocks, batch), StoreWeights<MB>{&tiles, 0, 0});
    for (int64_t b = 0, i = 0; b < blocks; b += batch, ++i) {
      const int64_t end = std::min(blocks, b + batch), next_end = std::min(blocks, end + batch);
      if (end < blocks) for_each_block<QT>(group, end, next_end, StoreWeights<MB>{&tiles, int(~i & 1), end * sub});
      tile_products<MB>(a, b * sub, m0, int((end - b) * sub), tiles.weights[i & 1], &tiles);
      for_each_block<QT>(group, b, end, Accumulate<MB, true>{a, m0, acc, &tiles, b * sub});
    }
#endif
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + (m0 + m) * N + n0, acc[m]);
}

// Packed weights, AVX2: each group as two halves of 8 weight rows, a half's 4 bytes of chunk c one 256-bit
// vector (at 64 c + 32 h). maddubs multiplies them by 4 activations broadcast to every row, and madd adds each
// row's pairs: 8 int32 lane sums, one per weight row. The 4-bit formats add their 8 chunks' maddubs pairs in
// int16 first (|q0 x0 + q1 x1| <= 2 * 15 * 127, times 8 chunks: 30480 < 2^15, no overflow), the 5- and 6-bit
// ones 2 chunks (add_chunk_pair); signed weights (Q8_0, IQ4_NL, IQ4_XS) go to int32 a chunk at a time
// (add_signed_chunk).

QUANT_AVX2 inline __m256 halves8(const uint8_t* p) {  // 8 fp16 -> fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

QUANT_AVX2 inline __m256 bytes8(const uint8_t* p) {  // 8 uint8 -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

QUANT_AVX2 inline __m256i broadcast4(const int8_t* x) {  // 4 activation bytes, to every 32-bit lane
  int32_t x4;
  std::memcpy(&x4, x, 4);
  return _mm256_set1_epi32(x4);
}

// sums[m] += the 8 rows' unsigned weights w (chunk c) times token row m's activations 4c..4c+3, in int16.
// The empty asm pins each sum in its register: otherwise GCC reassociates every row's 8 additions into one
// tree per block, keeps all 8 x MB products alive, spills most of them to the stack and the kernel runs at
// about half speed (a Zen 3, 4 token rows: 1.3x the time; 1.7x for Q4_K)
template <int MB>
QUANT_AVX2 inline void add_chunk16(const PackedRows<MB>& x, int c, __m256i w, __m256i (&sums)[MB]) {
  for (int m = 0; m < MB; ++m) {
    sums[m] = _mm256_add_epi16(sums[m], _mm256_maddubs_epi16(w, broadcast4(x.q + m * 32 + 4 * c)));
    asm("" : "+x"(sums[m]));
  }
}

// sums[m] += token row m's activations of chunks c and c + 1 against weights w0, w1 (0..63), times the
// rows' scales (as int16, twice in each lane; Q6_K's, or 1). Two chunks' maddubs pairs fit int16:
// 4 * 63 * 127 = 32004 < 2^15
template <int MB>
QUANT_AVX2 inline void add_chunk_pair(const PackedRows<MB>& x, int c, __m256i w0, __m256i w1, __m256i scales,
                                      __m256i (&sums)[MB]) {
  for (int m = 0; m < MB; ++m) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w0, broadcast4(x.q + m * 32 + 4 * c)),
                                           _mm256_maddubs_epi16(w1, broadcast4(x.q + m * 32 + 4 * c + 4)));
    sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(pairs, scales));
    asm("" : "+x"(sums[m]));
  }
}

// Chunk c of Q2_K sub-block j, rows 8h..8h+7 (planes already at the half's 32 bytes): 8 rows x 4 weights, 0..3
QUANT_AVX2 inline __m256i two_bit_chunk8(const uint8_t* planes, int j, int c) {
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(planes + 512 * (j / 4) + 64 * c));
  return _mm256_and_si256(_mm256_srli_epi16(p, 2 * (j % 4)), _mm256_set1_epi8(3));
}

// Chunk c of Q3_K sub-block j, rows 8h..8h+7 (quants already at the half's 32 bytes): 8 rows x 4 weights, 0..7
QUANT_AVX2 inline __m256i q3_k_chunk8(const uint8_t* quants, int j, int c) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * c));
  const __m256i third = j < 2 ? _mm256_slli_epi16(h, 2 - j) : _mm256_srli_epi16(h, j - 2);
  return _mm256_or_si256(two_bit_chunk8(quants + 512, j, c), _mm256_and_si256(third, _mm256_set1_epi8(4)));
}

// Chunk c of Q6_K sub-block j, rows 8h..8h+7 (quants already at the half's 32 bytes): 8 rows x 4 weights, 0..63
QUANT_AVX2 inline __m256i q6_k_chunk8(const uint8_t* quants, int j, int c) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + q6_k_nibbles(j) + 64 * c));
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + q6_k_high(j) + 64 * c));
  const int t = j % 4;
  const __m256i top = t < 2 ? _mm256_slli_epi16(p, 4 - 2 * t) : _mm256_srli_epi16(p, 2 * t - 4);
  const __m256i low = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0xF));
  return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
}

// sums[m] += token row m's activations of chunk c against signed weights w (Q8_0, IQ4_NL, IQ4_XS): |w| meets x
// carrying w's sign, so a pair stays within 2 * 128 * 127, and each chunk goes to int32 at once
template <int MB>
QUANT_AVX2 inline void add_signed_chunk(const PackedRows<MB>& x, int c, __m256i w, __m256i (&sums)[MB]) {
  const __m256i magnitude = _mm256_sign_epi8(w, w);
  for (int m = 0; m < MB; ++m) {
    const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast4(x.q + m * 32 + 4 * c), w));
    sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
}

// Q5_0 / Q5_1, rows 8h..8h+7: chunk c's nibbles with their fifth bits (bit c of each byte of `fifth`) at bit 4
QUANT_AVX2 inline __m256i with_fifth_bit8(__m256i nibbles, __m256i fifth, int c) {
  const __m256i bit = c < 4 ? _mm256_slli_epi16(fifth, 4 - c) : _mm256_srli_epi16(fifth, c - 4);
  return _mm256_or_si256(nibbles, _mm256_and_si256(bit, _mm256_set1_epi8(0x10)));
}

// 8 int8 -> int32 lanes
QUANT_AVX2 inline __m256i signed_bytes8(const uint8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// acc[m] += (sums[m], int16 pairs or int32 when !int16_sums; + the offset's init) * d * dx, and acc_min[m] +=
// min * dx sum x: two accumulators, so that a block's two FMAs do not wait on each other
template <int MB, bool int16_sums, bool has_offset, bool has_min>
QUANT_AVX2 inline void scale_block(const PackedRows<MB>& x, const __m256i (&sums)[MB], __m256 d, __m256 min,
                                   __m256 (&acc)[MB], __m256 (&acc_min)[MB]) {
  for (int m = 0; m < MB; ++m) {
    __m256i dot = int16_sums ? _mm256_madd_epi16(sums[m], _mm256_set1_epi16(1)) : sums[m];
    if (has_offset) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(x.init[m]));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(x.scale[m])), acc[m]);
    if (has_min) acc_min[m] = _mm256_fmadd_ps(min, _mm256_set1_ps(x.qsum[m]), acc_min[m]);
  }
}

template <int64_t QT, int MB>
QUANT_AVX2 void packed_group_avx2(const Activations& a, const uint8_t* group, int64_t blocks,
                                  float* y, int64_t N, int64_t m0, int64_t n0) {
  const __m256i low = _mm256_set1_epi8(0xF);
  const int64_t gbb = group_block_bytes(QT);
  for (int h = 0; h < 2; ++h) {  // rows 8h..8h+7 of the group
    __m256 acc[MB], acc_min[MB];
    for (int m = 0; m < MB; ++m) acc[m] = acc_min[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = group + b * gbb;
      if (h == 0 && !kSuperBlocks<QT>) prefetch_ahead(blk, gbb);
      const uint8_t* quants = blk + quants_offset(QT) + 32 * h;
      __m256i sums[MB];
      if (QT == kQ5_K) {  // as Q4_K's, but 8 chunks' pairs would overflow int16: 2 do not
        const __m256 d = halves8(blk + 16 * h), dmin = halves8(blk + 32 + 16 * h);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const PackedRows<MB> x(a, b * 8 + j, m0);
          for (int m = 0; m < MB; ++m) sums[m] = _mm256_setzero_si256();
          for (int c = 0; c < 8; c += 2) {
            __m256i w[2];
            for (int k = 0; k < 2; ++k) {
              const __m256i v =
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + (j / 2) * 512 + 64 * (c + k)));
              const __m256i fifth = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants - 512 + 64 * (c + k)));
              w[k] = with_fifth_bit8(_mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low), fifth, j);
            }
            add_chunk_pair(x, c, w[0], w[1], _mm256_set1_epi16(1), sums);
          }
          const __m256 scale = _mm256_mul_ps(d, bytes8(blk + 64 + 16 * j + 8 * h));
          const __m256 mn = bytes8(blk + 192 + 16 * j + 8 * h);
          const __m256 min = _mm256_mul_ps(dmin, _mm256_sub_ps(_mm256_setzero_ps(), mn));
          scale_block<MB, false, false, true>(x, sums, scale, min, acc, acc_min);
        }
        continue;
      }
      if (QT == kQ4_K) {
        const __m256 d = halves8(blk + 16 * h), dmin = halves8(blk + 32 + 16 * h);
        for (int j = 0; j < 8; ++j) {  // sub-blocks: the low nibbles of pair j / 2, then its high ones
          const PackedRows<MB> x(a, b * 8 + j, m0);
          for (int m = 0; m < MB; ++m) sums[m] = _mm256_setzero_si256();
          for (int c = 0; c < 8; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + (j / 2) * 512 + 64 * c));
            add_chunk16(x, c, _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low), sums);
          }
          const __m256 scale = _mm256_mul_ps(d, bytes8(blk + 64 + 16 * j + 8 * h));
          const __m256 mn = bytes8(blk + 192 + 16 * j + 8 * h);
          const __m256 min = _mm256_mul_ps(dmin, _mm256_sub_ps(_mm256_setzero_ps(), mn));
          scale_block<MB, true, false, true>(x, sums, scale, min, acc, acc_min);
        }
        continue;
      }
      if (QT == kQ6_K || QT == kQ3_K || QT == kQ2_K) {  // integer sums times the rows' int8 scales (madd), then d
        const __m256 d = halves8(blk + 16 * h);
        const __m256 dmin = QT == kQ2_K ? halves8(blk + 32 + 16 * h) : _mm256_setzero_ps();
        const uint8_t* sc = blk + (QT == kQ2_K ? 64 : 32) + 8 * h;
        const __m256i low16 = _mm256_set1_epi32(0xFFFF);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const PackedRows<MB> x(a, b * 8 + j, m0);
          const __m256i sc0 = signed_bytes8(sc + 16 * (2 * j)), sc1 = signed_bytes8(sc + 16 * (2 * j + 1));
          const __m256i scales0 = _mm256_or_si256(_mm256_and_si256(sc0, low16), _mm256_slli_epi32(sc0, 16));
          const __m256i scales1 = _mm256_or_si256(_mm256_and_si256(sc1, low16), _mm256_slli_epi32(sc1, 16));
          const __m256i both = _mm256_or_si256(_mm256_and_si256(sc0, low16), _mm256_slli_epi32(sc1, 16));
          for (int m = 0; m < MB; ++m) {  // the offset (Q6_K 32, Q3_K 4) times (sc0 * first half's sum + sc1 * ...)
            const __m256i offset = _mm256_madd_epi16(both, _mm256_set1_epi32(x.half_sums[m]));
            const __m256i times_offset = _mm256_slli_epi32(offset, QT == kQ6_K ? 5 : 2);
            sums[m] = QT == kQ2_K ? _mm256_setzero_si256() : _mm256_sub_epi32(_mm256_setzero_si256(), times_offset);
          }
          for (int c = 0; c < 8; c += 2) {
            __m256i w[2];
            for (int k = 0; k < 2; ++k)
              w[k] = QT == kQ6_K ? q6_k_chunk8(quants, j, c + k) : QT == kQ3_K ? q3_k_chunk8(quants, j, c + k)
                                                                              : two_bit_chunk8(quants, j, c + k);
            add_chunk_pair(x, c, w[0], w[1], c < 4 ? scales0 : scales1, sums);
          }
          __m256 min[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // Q2_K's -dmin mn; the others read none
          for (int e = 0; e < 2 && QT == kQ2_K; ++e)
            min[e] = _mm256_mul_ps(dmin, _mm256_sub_ps(_mm256_setzero_ps(), bytes8(sc + 256 + 16 * (2 * j + e))));
          for (int m = 0; m < MB; ++m) {
            const __m256 dx = _mm256_set1_ps(x.scale[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), _mm256_mul_ps(d, dx), acc[m]);
            if (QT == kQ2_K) {
              const int32_t halves = x.half_sums[m];
              acc_min[m] = _mm256_fmadd_ps(min[0], _mm256_set1_ps(x.scale[m] * static_cast<int16_t>(halves & 0xFFFF)),
                                           acc_min[m]);
              acc_min[m] = _mm256_fmadd_ps(min[1], _mm256_set1_ps(x.scale[m] * (halves >> 16)), acc_min[m]);
            }
          }
        }
        continue;
      }
      const __m256 d = halves8(blk + 16 * h);
      if (QT == kIQ4_NL || QT == kIQ4_XS) {  // signed weights, as Q8_0's
        const __m256i table =
            _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIq4NlValues)));
        for (int j = 0; j < kSubBlocks<QT>; ++j) {
          const PackedRows<MB> x(a, b * kSubBlocks<QT> + j, m0);
          for (int m = 0; m < MB; ++m) sums[m] = _mm256_setzero_si256();
          for (int c = 0; c < 4; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 256 * j + 64 * c));
            add_signed_chunk(x, c, _mm256_shuffle_epi8(table, _mm256_and_si256(v, low)), sums);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            add_signed_chunk(x, c + 4, _mm256_shuffle_epi8(table, high), sums);
          }
          const __m256 scale =
              QT == kIQ4_XS ? _mm256_mul_ps(d, _mm256_cvtepi32_ps(signed_bytes8(blk + 32 + 16 * j + 8 * h))) : d;
          scale_block<MB, false, false, false>(x, sums, scale, _mm256_setzero_ps(), acc, acc_min);
        }
        continue;
      }
      const PackedRows<MB> x(a, b, m0);
      for (int m = 0; m < MB; ++m) sums[m] = _mm256_setzero_si256();
      if (QT == kQ8_0) {
        for (int c = 0; c < 8; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * c));
          add_signed_chunk(x, c, _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))), sums);  // signed again
        }
        scale_block<MB, false, false, false>(x, sums, d, _mm256_setzero_ps(), acc, acc_min);
        continue;
      }
      if (QT == kQ5_0 || QT == kQ5_1) {  // 5 bits: 8 chunks' pairs would overflow int16, 2 do not
        const __m256i fifth = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants - 64));
#pragma GCC unroll 4
        for (int c = 0; c < 8; c += 2) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * (c % 4)));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * (c % 4 + 1)));
          const __m256i n0 = _mm256_and_si256(c < 4 ? v : _mm256_srli_epi16(v, 4), low);
          const __m256i n1 = _mm256_and_si256(c < 4 ? v1 : _mm256_srli_epi16(v1, 4), low);
          add_chunk_pair(x, c, with_fifth_bit8(n0, fifth, c), with_fifth_bit8(n1, fifth, c + 1), _mm256_set1_epi16(1),
                         sums);
        }
        if (QT == kQ5_1) scale_block<MB, false, false, true>(x, sums, d, halves8(blk + 32 + 16 * h), acc, acc_min);
        else scale_block<MB, false, true, false>(x, sums, d, _mm256_setzero_ps(), acc, acc_min);
        continue;
      }
      for (int c = 0; c < 4; ++c) {  // Q4_0, Q4_1: a byte's low nibble is element 4c + i, its high one 16 + 4c + i
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * c));
        add_chunk16(x, c, _mm256_and_si256(v, low), sums);
        add_chunk16(x, c + 4, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), sums);
      }
      if (QT == kQ4_1) scale_block<MB, true, false, true>(x, sums, d, halves8(blk + 32 + 16 * h), acc, acc_min);
      else scale_block<MB, true, true, false>(x, sums, d, _mm256_setzero_ps(), acc, acc_min);
    }
    for (int m = 0; m < MB; ++m) _mm256_storeu_ps(y + (m0 + m) * N + n0 + 8 * h, _mm256_add_ps(acc[m], acc_min[m]));
  }
}

// One group of weight rows against `MB` token rows from m0, on the path chosen (amx: AVX-512 with AMX tiles
// configured for MB rows)
template <int64_t QT, int MB>
void packed_group(int isa, bool amx, const Activations& a, const uint8_t* group, int64_t blocks, float* y,
                  int64_t N, int64_t m0, int64_t n0) {
#ifdef GORGON_AMX
  if constexpr (MB >= kAmxMinRows && kAmxTakes<QT>) {
    if (amx) return packed_group_avx512<QT, MB, true>(a, group, blocks, y, N, m0, n0);
  }
#endif
  if constexpr (MB <= 8) {
    if (isa == kAvx512) packed_group_avx512<QT, MB, false>(a, group, blocks, y, N, m0, n0);
    else packed_group_avx2<QT, MB>(a, group, blocks, y, N, m0, n0);
  }
}

// Token rows go in balanced chunks of at most 8 (a ninth row's accumulator would not fit in AVX-512's
// registers), or 4 with AVX2 (half as many registers; each row also holds its int16 sums), or 16 with AMX
// (an AMX tile's rows)
template <int64_t QT>
void gemv_packed(const Activations& a, const uint8_t* w, int64_t K, float* y, int64_t N, int isa) {
  const int64_t blocks = K / format_of(QT).block, gbb = group_block_bytes(QT);
  const int64_t grain = std::max<int64_t>(1, 32 * 1024 / (blocks * gbb));  // groups per task, ~32 KiB
  const bool amx = isa == kAvx512 && kAmxTakes<QT> && a.M >= kAmxMinRows && amx_enabled();
  // (AMX: whole tiles of 16, as a tile product costs about the same at 9 rows as at 16, and the rest, where
  // fewer than 9 rows, on the VNNI path)
  const int64_t max_chunk = amx ? 16 : isa == kAvx512 ? 8 : 4;
  const int64_t chunks = (a.M + max_chunk - 1) / max_chunk;
  const int64_t chunk = amx ? max_chunk : (a.M + chunks - 1) / chunks;
  at::parallel_for(0, N / kGroupRows, grain, [&](int64_t begin, int64_t end) {
    int64_t tiles_rows = 0;  // the token rows the tiles are configured for (per thread)
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group = w + g * blocks * gbb;
      for (int64_t m0 = 0; m0 < a.M; m0 += chunk) {  // later chunks of token rows find the group in L1
        const int64_t rows = std::min<int64_t>(chunk, a.M - m0);
        const bool tiles = amx && rows >= kAmxMinRows;
#ifdef GORGON_AMX
        if (tiles && rows != tiles_rows) configure_tiles(static_cast<int>(tiles_rows = rows));
#endif
        switch (rows) {
#define PACKED_CALL(MB)                                                         \
  case MB:                                                                      \
    packed_group<QT, MB>(isa, tiles, a, group, blocks, y, N, m0, g * kGroupRows); \
    break;
          PACKED_CALL(1) PACKED_CALL(2) PACKED_CALL(3) PACKED_CALL(4)
          PACKED_CALL(5) PACKED_CALL(6) PACKED_CALL(7) PACKED_CALL(8)
#ifdef GORGON_AMX
          PACKED_CALL(9) PACKED_CALL(10) PACKED_CALL(11) PACKED_CALL(12)
          PACKED_CALL(13) PACKED_CALL(14) PACKED_CALL(15) PACKED_CALL(16)
#endif
#undef PACKED_CALL
        }
      }
    }
#ifdef GORGON_AMX
    if (tiles_rows) _tile_release();
#endif
  });
}

inline int activation_offset(int64_t qtype, int isa) {
  switch (qtype) {
    case kQ4_0: return 8;
    case kQ5_0: return 16;
    case kQ6_K: return 32;
    case kQ3_K: return 4;
    case kQ8_0:
    case kIQ4_NL:
    case kIQ4_XS: return isa == kAvx512 ? 128 : 0;  // the AVX-512 path adds 128 to make the weights unsigned
    default: return 0;  // scalar: q has its offset removed already
  }
}

// f(std::integral_constant<int64_t, qtype>): a kernel template instantiated for the run-time type qtype
template <typename F>
void with_type(int64_t qtype, F&& f) {
  switch (qtype) {
    case kQ8_0: return f(std::integral_constant<int64_t, kQ8_0>());
    case kQ4_0: return f(std::integral_constant<int64_t, kQ4_0>());
    case kQ4_1: return f(std::integral_constant<int64_t, kQ4_1>());
    case kQ5_0: return f(std::integral_constant<int64_t, kQ5_0>());
    case kQ5_1: return f(std::integral_constant<int64_t, kQ5_1>());
    case kQ2_K: return f(std::integral_constant<int64_t, kQ2_K>());
    case kQ3_K: return f(std::integral_constant<int64_t, kQ3_K>());
    case kQ4_K: return f(std::integral_constant<int64_t, kQ4_K>());
    case kQ5_K: return f(std::integral_constant<int64_t, kQ5_K>());
    case kQ6_K: return f(std::integral_constant<int64_t, kQ6_K>());
    case kIQ4_NL: return f(std::integral_constant<int64_t, kIQ4_NL>());
    case kIQ4_XS: return f(std::integral_constant<int64_t, kIQ4_XS>());
    default: throw std::invalid_argument("quantized linear: unsupported ggml type " + std::to_string(qtype));
  }
}

inline void linear(int64_t qtype, const float* x, int64_t M, int64_t K, const Weights& w, int64_t N, float* y) {
  const Format f = format_of(qtype);
  if (K % f.block || w.row_bytes != K / f.block * f.bytes)
    throw std::invalid_argument("quantized linear: " + std::to_string(w.row_bytes) + " bytes per row do not hold " +
                                std::to_string(K) + " weights of ggml type " + std::to_string(qtype));
  const int isa = current_isa();
  Activations a;
  const bool packed_kernels = w.packed && isa != kScalar;
  quantize_activations(x, M, K, isa == kScalar ? 0 : activation_offset(qtype, isa), packed_kernels, isa != kScalar,
                       &a);
  if (packed_kernels)
    return with_type(qtype, [&](auto type) { gemv_packed<decltype(type)::value>(a, w.data, K, y, N, isa); });
  if (w.packed) {  // a lower instruction set forced (tests): portable code over the packed layout
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        rows_scalar(qtype, a, std::min<int64_t>(8, M - m0), w, K, y, N, m0, begin, end);
    });
    return;
  }
  with_type(qtype, [&](auto type) { gemv_q<decltype(type)::value>(a, w.data, w.row_bytes, K, y, N, isa); });
}

}  // namespace quant
