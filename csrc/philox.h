// Philox4x32-10 (Salmon et al., SC'11; Random123, cuRAND, Triton's tl.randint4x),
// shared by modelbatch::philox4x32 and modelbatch::batched_dropout.
//
// A round maps the counter (c0, c1, c2, c3) under the key (k0, k1) to
//   hi0:lo0 = 0xD2511F53 * c0,  hi1:lo1 = 0xCD9E8D57 * c2   (32 x 32 -> 64 bits)
//   (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// and the key advances by the Weyl increments (0x9E3779B9, 0xBB67AE85) between
// rounds. See python/modelbatch/ops/philox.py (the pure-torch reference) for the
// stream layout ModelBatch builds on it.
//
// Two forms: philox4x32_10 for one block (any counter and key), and stream_words,
// the words of a run of consecutive blocks of one stream (vectorised across blocks
// with AVX-512 / AVX2 intrinsics, chosen at run time by detect_isa).
#pragma once

#include <cstdint>

#define MB_PHILOX_INLINE inline __attribute__((always_inline))

namespace modelbatch {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// The round keys of a 64-bit key (k0, k1): key r is (k0 + r * W0, k1 + r * W1).
struct Keys {
  uint32_t k0[kRounds];
  uint32_t k1[kRounds];
};

MB_PHILOX_INLINE Keys schedule(uint32_t k0, uint32_t k1) {
  Keys k;
  for (int r = 0; r < kRounds; ++r) {
    k.k0[r] = k0;
    k.k1[r] = k1;
    k0 += kW0;
    k1 += kW1;
  }
  return k;
}

// The key of a 64-bit seed (its two's complement bits): k0 = low word, k1 = high word.
MB_PHILOX_INLINE Keys seed_keys(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return schedule(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

MB_PHILOX_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                  uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// One block: c[4] is the counter on entry and the four output words on return.
MB_PHILOX_INLINE void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    philox_round(c[0], c[1], c[2], c[3], k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
}

// ---------------------------------------------------------------------------
// Streams: the words of blocks first, first + 1, ..., first + nblocks - 1 (64-bit
// block indices, wrapping mod 2**64) under one key, block b having the counter
// (lo32(b), hi32(b), 0, 0), stored in stream order: words[4 * i + q] = word q of
// block first + i. This is the layout of ModelBatch's per-model streams (see
// python/modelbatch/ops/philox.py), which batched_dropout consumes.
//
// Three kernels with bit-identical output: AVX-512 (16 blocks per vector), AVX2 (8)
// and scalar. The vector ones hold word q of 16 (8) consecutive blocks in one
// register of 32-bit lanes; a 32 x 32 -> 64 multiply is two vpmuludq (even lanes,
// then the odd lanes shifted down), whose high and low halves are merged back
// into 32-bit lanes by two (masked) shuffles. A 4 x 4 transpose at the end puts
// the words in stream order.

enum class Isa { kScalar, kAvx2, kAvx512 };

// One block at a time: the portable kernel, and the tail of the vector ones.
inline void stream_words_scalar(uint64_t first, const Keys& keys, int64_t nblocks,
                                uint32_t* __restrict words) {
  for (int64_t i = 0; i < nblocks; ++i) {
    const uint64_t b = first + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(b), c1 = static_cast<uint32_t>(b >> 32), c2 = 0, c3 = 0;
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) philox_round(c0, c1, c2, c3, keys.k0[r], keys.k1[r]);
    words[4 * i + 0] = c0;
    words[4 * i + 1] = c1;
    words[4 * i + 2] = c2;
    words[4 * i + 3] = c3;
  }
}

}  // namespace philox
}  // namespace modelbatch

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MB_PHILOX_X86 1
// GCC 12 warns about the _mm512_undefined_epi32() inside the AVX-512 intrinsics
// (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace modelbatch {
namespace philox {

#define MB_AVX512 __attribute__((target("avx512f")))
#define MB_AVX2 __attribute__((target("avx2")))

// V independent vectors of 16 blocks each (instruction-level parallelism).
template <int V>
inline MB_AVX512 __attribute__((always_inline)) void blocks_avx512(uint64_t first,
                                                                    const Keys& keys,
                                                                    uint32_t* __restrict words) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  __m512i c0[V], c1[V], c2[V], c3[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    // counter lo32(first + i), hi32(first + i): the low word wraps into the high one.
    c0[v] = _mm512_add_epi32(lo, _mm512_add_epi32(lane, _mm512_set1_epi32(16 * v)));
    c1[v] = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0[v], lo), hi, one);
    c2[v] = _mm512_setzero_si512();
    c3[v] = _mm512_setzero_si512();
  }
#pragma GCC unroll 10
  for (int r = 0; r < kRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(keys.k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(keys.k1[r]));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m512i pe0 = _mm512_mul_epu32(c0[v], m0);  // even lanes' 64-bit products
      const __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[v], 32), m0);  // odd lanes'
      const __m512i pe1 = _mm512_mul_epu32(c2[v], m1);
      const __m512i po1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[v], 32), m1);
      const __m512i hi0 = _mm512_mask_shuffle_epi32(po0, 0x5555, pe0, _MM_PERM_CDAB);
      const __m512i lo0 = _mm512_mask_shuffle_epi32(pe0, 0xAAAA, po0, _MM_PERM_CDAB);
      const __m512i hi1 = _mm512_mask_shuffle_epi32(po1, 0x5555, pe1, _MM_PERM_CDAB);
      const __m512i lo1 = _mm512_mask_shuffle_epi32(pe1, 0xAAAA, po1, _MM_PERM_CDAB);
      c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], k0, 0x96);  // hi1 ^ c1 ^ k0
      c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], k1, 0x96);  // hi0 ^ c3 ^ k1
      c1[v] = lo1;
      c3[v] = lo0;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    // 4 x 4 transposes of 32-bit words in each 128-bit lane: t_l = block l of each lane,
    const __m512i a = _mm512_unpacklo_epi32(c0[v], c1[v]);
    const __m512i b = _mm512_unpackhi_epi32(c0[v], c1[v]);
    const __m512i c = _mm512_unpacklo_epi32(c2[v], c3[v]);
    const __m512i d = _mm512_unpackhi_epi32(c2[v], c3[v]);
    const __m512i t0 = _mm512_unpacklo_epi64(a, c);  // blocks 0, 4, 8, 12
    const __m512i t1 = _mm512_unpackhi_epi64(a, c);  // blocks 1, 5, 9, 13
    const __m512i t2 = _mm512_unpacklo_epi64(b, d);  // blocks 2, 6, 10, 14
    const __m512i t3 = _mm512_unpackhi_epi64(b, d);  // blocks 3, 7, 11, 15
    // then one of the 128-bit lanes.
    const __m512i u0 = _mm512_shuffle_i32x4(t0, t1, 0x44);  // 0, 4, 1, 5
    const __m512i u1 = _mm512_shuffle_i32x4(t2, t3, 0x44);  // 2, 6, 3, 7
    const __m512i u2 = _mm512_shuffle_i32x4(t0, t1, 0xEE);  // 8, 12, 9, 13
    const __m512i u3 = _mm512_shuffle_i32x4(t2, t3, 0xEE);  // 10, 14, 11, 15
    uint32_t* w = words + 64 * v;
    _mm512_storeu_si512(w + 0, _mm512_shuffle_i32x4(u0, u1, 0x88));   // 0, 1, 2, 3
    _mm512_storeu_si512(w + 16, _mm512_shuffle_i32x4(u0, u1, 0xDD));  // 4, 5, 6, 7
    _mm512_storeu_si512(w + 32, _mm512_shuffle_i32x4(u2, u3, 0x88));  // 8 .. 11
    _mm512_storeu_si512(w + 48, _mm512_shuffle_i32x4(u2, u3, 0xDD));  // 12 .. 15
  }
}

inline MB_AVX512 __attribute__((noinline)) void stream_words_avx512(uint64_t first,
                                                                     const Keys& keys,
                                                                     int64_t nblocks,
                                                                     uint32_t* words) {
  int64_t i = 0;
  for (; i + 64 <= nblocks; i += 64) {
    blocks_avx512<4>(first + static_cast<uint64_t>(i), keys, words + 4 * i);
  }
  for (; i + 16 <= nblocks; i += 16) {
    blocks_avx512<1>(first + static_cast<uint64_t>(i), keys, words + 4 * i);
  }
  stream_words_scalar(first + static_cast<uint64_t>(i), keys, nblocks - i, words + 4 * i);
}

template <int V>
inline MB_AVX2 __attribute__((always_inline)) void blocks_avx2(uint64_t first, const Keys& keys,
                                                                uint32_t* __restrict words) {
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i c0[V], c1[V], c2[V], c3[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm256_add_epi32(lo, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * v)));
    // carry = lo >u c0 (as -1), via a signed compare of the sign-flipped words.
    const __m256i carry =
        _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0[v], sign));
    c1[v] = _mm256_sub_epi32(hi, carry);
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
#pragma GCC unroll 10
  for (int r = 0; r < kRounds; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(keys.k0[r]));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(keys.k1[r]));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m256i pe0 = _mm256_mul_epu32(c0[v], m0);
      const __m256i po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[v], 32), m0);
      const __m256i pe1 = _mm256_mul_epu32(c2[v], m1);
      const __m256i po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[v], 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_shuffle_epi32(pe0, 0xB1), po0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_shuffle_epi32(po0, 0xB1), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_shuffle_epi32(pe1, 0xB1), po1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_shuffle_epi32(po1, 0xB1), 0xAA);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), k1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m256i a = _mm256_unpacklo_epi32(c0[v], c1[v]);
    const __m256i b = _mm256_unpackhi_epi32(c0[v], c1[v]);
    const __m256i c = _mm256_unpacklo_epi32(c2[v], c3[v]);
    const __m256i d = _mm256_unpackhi_epi32(c2[v], c3[v]);
    const __m256i t0 = _mm256_unpacklo_epi64(a, c);  // blocks 0, 4
    const __m256i t1 = _mm256_unpackhi_epi64(a, c);  // blocks 1, 5
    const __m256i t2 = _mm256_unpacklo_epi64(b, d);  // blocks 2, 6
    const __m256i t3 = _mm256_unpackhi_epi64(b, d);  // blocks 3, 7
    uint32_t* w = words + 32 * v;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 0), _mm256_permute2x128_si256(t0, t1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 8), _mm256_permute2x128_si256(t2, t3, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 16),
                        _mm256_permute2x128_si256(t0, t1, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + 24),
                        _mm256_permute2x128_si256(t2, t3, 0x31));
  }
}

inline MB_AVX2 __attribute__((noinline)) void stream_words_avx2(uint64_t first, const Keys& keys,
                                                                int64_t nblocks,
                                                                uint32_t* words) {
  int64_t i = 0;
  for (; i + 32 <= nblocks; i += 32) {
    blocks_avx2<4>(first + static_cast<uint64_t>(i), keys, words + 4 * i);
  }
  for (; i + 8 <= nblocks; i += 8) {
    blocks_avx2<1>(first + static_cast<uint64_t>(i), keys, words + 4 * i);
  }
  stream_words_scalar(first + static_cast<uint64_t>(i), keys, nblocks - i, words + 4 * i);
}

#undef MB_AVX512
#undef MB_AVX2
#pragma GCC diagnostic pop

// The widest kernel the CPU runs. MODELBATCH_PHILOX_ISA=avx2 or =scalar caps it (for
// tests and benchmarks; read per call, so callers read it once per op call).
inline Isa detect_isa() {
  static const Isa cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  const char* cap = std::getenv("MODELBATCH_PHILOX_ISA");
  if (cap && std::strcmp(cap, "scalar") == 0) return Isa::kScalar;
  if (cap && std::strcmp(cap, "avx2") == 0 && cpu == Isa::kAvx512) return Isa::kAvx2;
  return cpu;
}

inline void stream_words(Isa isa, uint64_t first, const Keys& keys, int64_t nblocks,
                         uint32_t* words) {
  switch (isa) {
    case Isa::kAvx512:
      return stream_words_avx512(first, keys, nblocks, words);
    case Isa::kAvx2:
      return stream_words_avx2(first, keys, nblocks, words);
    default:
      return stream_words_scalar(first, keys, nblocks, words);
  }
}

#else  // not x86-64 GCC: the scalar kernel only
#define MB_PHILOX_X86 0

namespace modelbatch {
namespace philox {

inline Isa detect_isa() { return Isa::kScalar; }

inline void stream_words(Isa, uint64_t first, const Keys& keys, int64_t nblocks,
                         uint32_t* words) {
  stream_words_scalar(first, keys, nblocks, words);
}

#endif

}  // namespace philox
}  // namespace modelbatch
