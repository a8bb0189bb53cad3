/* Int4 expert kernels on the bytes the store holds, in PyTorch's AVX-512 tinygemm layout.
 *
 * A weight W [N, K] (out, in) with N a multiple of 64 is `packed` uint8 [N/64, K, 32]: for
 * each block of 64 output rows and each input column k, 32 bytes whose low nibbles are
 * rows 0..31 of the block and whose high nibbles are rows 32..63 ("tinygemm-avx512",
 * quant/int4.py). `sz` is the bf16 [K/G, N, 2] (scale, zero) table, read here as one
 * uint32 per row and group: w = (q - 8) * scale + zero. x is float32 [T, K], y float32.
 *
 * Per block and group the kernel sums q * x in float32 (exact integers times x) and adds
 * scale * dot + (zero - 8 * scale) * sum(x over the group) once per group, so the inner
 * loop is: 32 bytes -> 64 nibbles -> 64 floats -> one FMA per token and row. Tokens go in
 * tiles of TT, so a weight is decoded once per tile; a block's bytes stay in L2 across
 * tiles. `int4_ffn` is the whole SwiGLU expert in one call: gate and up rows of the same
 * block of ffn units in one pass (gate_up holds gate rows first, then up rows), SiLU and
 * product in registers, then down over the product, in one OpenMP region with a barrier
 * between the two. Blocks are handed out dynamically, two at a time: on a busy machine a
 * descheduled thread's blocks go to the others instead of holding the barrier. One token's
 * calls (the group calls of a decode step's experts) and the int8-activation linear hand them
 * out guided instead: each thread first takes a long contiguous run (half the blocks, on
 * two), then smaller ones to balance. A thread streaming one long run reads faster than
 * two interleaving pairs of blocks: the Qwen3-30B-A3B shape (8 experts of 2.8 MiB a
 * layer, int4 dense) decoded x1.057 faster (median of 30 alternated rounds, 20 ahead;
 * static halves x1.066), the Mixtral width alike (x0.998, static). Only the
 * AVX-512 build computes anything; int4_simd() says which build
 * this is, and the caller uses the kernel only where it is 512 and its probe passes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef INT4_SYMMETRIC
/* The symmetric build: `sz` is float16 [K/G, N], a scale per row and group and no zero,
 * w = (q - 8) * scale, which is GGUF's Q4_0 block (d, 32 nibbles) as it lies: 4.5 bits a
 * weight at group 32 where a bf16 (scale, zero) pair makes 5. */
typedef uint16_t sz_t;
int int4_symmetric(void) { return 1; }
#else
typedef uint32_t sz_t;
int int4_symmetric(void) { return 0; }
#endif

#ifdef __AVX512F__
#include <immintrin.h>

#define TT 4 /* tokens per tile */
#ifndef PREFETCH
/* Bytes ahead in a block's weights that a tile asks the cache for (and SZ_AHEAD below, the
 * groups of scales ahead): the hardware prefetcher alone left a decode step of 8 experts of
 * 2.8 MiB reading at 14 GB/s where the same kernel ran at ~30 from cache; with 1024 bytes and
 * the next group's scales, 17-18 (and a Mixtral expert's 105 MiB 19-21 -> 22-23); 2048 bytes
 * and 4 groups decoded whole models x1.05 faster than that (Qwen3-30B-A3B shape and
 * Mixtral-width, experts and int4 dense matrices in RAM, alternated rounds in one process). */
#define PREFETCH 2048
#endif

int int4_simd(void) { return 512; }

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c = {(uint32_t)v << 16};
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; finite inputs */
    union { float f; uint32_t u; } c = {f};
    return (uint16_t)((c.u + 0x7FFF + ((c.u >> 16) & 1)) >> 16);
}

#ifndef SZ_AHEAD
#define SZ_AHEAD 4
#endif
/* Ask the cache for the scales SZ_AHEAD groups ahead of group g of the block at row n0 (and
 * at its first group, for those before): a group's 64 scales lie N entries past the last
 * group's, a stride no hardware prefetcher follows. */
static inline __attribute__((always_inline)) void prefetch_sz(const sz_t *sz, int64_t g,
                                                              int64_t N, int64_t n0) {
    for (int64_t a = g == 0 ? 1 : g + SZ_AHEAD; a <= g + SZ_AHEAD; a++)
        for (int i = 0; i < 4; i++)
            _mm_prefetch((const char *)(sz + a * N + n0 + 16 * i), _MM_HINT_T0);
}

/* Ask the cache for a weight line ahead. A block that one tile of tokens reads (a decode
 * step's) is read once, and which hint streams it best depends on the machine: on an AMD
 * EPYC NTA, which keeps its lines out of the outer caches where they would evict what runs
 * between the kernels (a decode token's Python and PyTorch code and data: whole-model decode
 * x1.05 on the Qwen3-30B-A3B shape, x1.02 Mixtral-width); on a Xeon T0 (x1.08 and x1.04,
 * all int4 weights in RAM, alternated rounds in one process). The caller measures which
 * (mer.quant.stream_hint) and sets it here. A block that several tiles read stays (T0) for
 * the next tile. */
static int stream_nta = 1;
void int4_stream_nta(int on) { stream_nta = on; }

static inline __attribute__((always_inline)) void prefetch_w(const uint8_t *p, const int once) {
    if (once)
        _mm_prefetch((const char *)p, _MM_HINT_NTA);
    else
        _mm_prefetch((const char *)p, _MM_HINT_T0);
}

/* Scale and zero of 64 rows (sz: the first's, in one group), 16 rows a vector, in row order. */
static inline __attribute__((always_inline)) void load_sz(const sz_t *sz, __m512 s[4],
                                                          __m512 z[4]) {
    for (int i = 0; i < 4; i++) {
#ifdef INT4_SYMMETRIC
        s[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sz + 16 * i)));
        z[i] = _mm512_setzero_ps();
#else
        const __m512i v = _mm512_loadu_si512((const void *)(sz + 16 * i));
        s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        z[i] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
#endif
    }
}

/* Rows n0..n0+63 of W times tokens t0..t0+toks-1 of x -> out[t * ldo + r], r in 0..63. */
static inline __attribute__((always_inline)) void block_tile(
    const uint8_t *packed, const sz_t *sz, const float *x, const float *xs, float *out,
    int64_t ldo, int64_t n0, int64_t N, int64_t K, int64_t G, int64_t t0, const int toks,
    const int once) {
    const uint8_t *pb = packed + n0 * (K / 2); /* the block's K * 32 bytes */
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int64_t ng = K / G;
    __m512 acc[TT][4];
    for (int t = 0; t < TT; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512 dot[TT][4];
        for (int t = 0; t < TT; t++)
            for (int i = 0; i < 4; i++) dot[t][i] = _mm512_setzero_ps();
        prefetch_sz(sz, g, N, n0);
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            if (k % 2 == 0) prefetch_w(pb + k * 32 + PREFETCH, once);
            const __m256i b = _mm256_loadu_si256((const __m256i *)(pb + k * 32));
            const __m256i lo = _mm256_and_si256(b, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
            __m512 w[4];
            w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
            w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
            w[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
            w[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const __m512 xb = _mm512_set1_ps(x[(t0 + t) * K + k]);
                for (int i = 0; i < 4; i++) dot[t][i] = _mm512_fmadd_ps(w[i], xb, dot[t][i]);
            }
        }
        __m512 s[4], z[4];
        load_sz(sz + g * N + n0, s, z);
        for (int i = 0; i < 4; i++) {
            const __m512 bz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s[i], z[i]); /* z - 8 s */
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const __m512 xsum = _mm512_set1_ps(xs[(t0 + t) * ng + g]);
                acc[t][i] = _mm512_fmadd_ps(s[i], dot[t][i], acc[t][i]);
                acc[t][i] = _mm512_fmadd_ps(bz, xsum, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        if (t >= toks) break;
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + t * ldo + 16 * i, acc[t][i]);
    }
}

/* All tokens through one block of rows, TT at a time; out[t * ldo + r]. */
static void block_rows(const uint8_t *packed, const sz_t *sz, const float *x,
                       const float *xs, float *out, int64_t ldo, int64_t n0, int64_t N,
                       int64_t K, int64_t G, int64_t T) {
    int64_t t0 = 0;
    const int once = T <= TT && stream_nta;
#define TILE(n) block_tile(packed, sz, x, xs, out + t0 * ldo, ldo, n0, N, K, G, t0, n, once)
    for (; t0 + TT <= T; t0 += TT) TILE(TT);
    switch (T - t0) {
    case 1: TILE(1); break;
    case 2: TILE(2); break;
    case 3: TILE(3); break;
    default: break;
    }
#undef TILE
}

/* xs[t * (K/G) + g] = sum of x[t, g*G .. g*G+G-1]. */
static void group_sums(const float *x, float *xs, int64_t T, int64_t K, int64_t G) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < K / G; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[t * K + k];
            xs[t * (K / G) + g] = s;
        }
}

/* y [T, N] = x [T, K] @ W.T. xs: scratch of T * K/G floats. */
void int4_linear(const uint8_t *packed, const sz_t *sz, const float *x, float *xs, float *y,
                 int64_t T, int64_t N, int64_t K, int64_t G, int threads) {
    group_sums(x, xs, T, K, G);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t nb = 0; nb < N / 64; nb++)
        block_rows(packed, sz, x, xs, y + nb * 64, N, nb * 64, N, K, G, T);
}

/* y [T, H] = down(silu(gate(x)) * up(x)) for gate_up [2F, H] (gate rows first), down [H, F].
 * Scratch: h [T, F], gu [threads, T, 128], xs [T, H/Gu], hs [threads, T, F/Gd] floats. */
void int4_ffn(const uint8_t *p_gu, const sz_t *sz_gu, const uint8_t *p_d,
              const sz_t *sz_d, const float *x, float *h, float *gu, float *xs, float *hs,
              float *y, int64_t T, int64_t H, int64_t F, int64_t Gu, int64_t Gd, int threads) {
    group_sums(x, xs, T, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * T * 128;
#endif
#pragma omp for schedule(dynamic, 2)
        for (int64_t fb = 0; fb < F / 64; fb++) {
            /* gate rows fb*64.. into mine[t*128 + 0..63], up rows F + fb*64.. into +64. */
            block_rows(p_gu, sz_gu, x, xs, mine, 128, fb * 64, 2 * F, H, Gu, T);
            block_rows(p_gu, sz_gu, x, xs, mine + 64, 128, F + fb * 64, 2 * F, H, Gu, T);
            for (int64_t t = 0; t < T; t++)
                for (int r = 0; r < 64; r++) {
                    const float g = mine[t * 128 + r], u = mine[t * 128 + 64 + r];
                    h[t * F + fb * 64 + r] = g / (1.0f + expf(-g)) * u;
                }
        }
        /* Each thread sums h's groups itself: cheaper than one more barrier. */
        float *my_hs = hs;
#ifdef _OPENMP
        my_hs = hs + (int64_t)omp_get_thread_num() * T * (F / Gd);
#endif
        group_sums(h, my_hs, T, F, Gd);
#pragma omp for schedule(dynamic, 2)
        for (int64_t nb = 0; nb < H / 64; nb++)
            block_rows(p_d, sz_d, h, my_hs, y + nb * 64, H, nb * 64, H, F, Gd, T);
    }
}

/* One token through E experts of one shape in one call (a decode step's experts of a layer):
 * y [E, H], row e bit for bit int4_ffn of x through expert e (the same blocks, each summed by
 * one thread in the same order), with one parallel region for all of them instead of one per
 * expert. p_gu, sz_gu, p_d, sz_d: E pointers each. Scratch: xs [H/Gu]; h [E, F];
 * hs [E, F/Gd]; gu [threads, 128]. */
void int4_ffn_group(int64_t E, const uint8_t *const *p_gu, const sz_t *const *sz_gu,
                    const uint8_t *const *p_d, const sz_t *const *sz_d, const float *x,
                    float *h, float *gu, float *xs, float *hs, float *y, int64_t H, int64_t F,
                    int64_t Gu, int64_t Gd, int threads) {
    const int64_t nf = F / 64, nh = H / 64;
    group_sums(x, xs, 1, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * 128;
#endif
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nf; i++) {
            const int64_t e = i / nf, fb = i % nf;
            block_rows(p_gu[e], sz_gu[e], x, xs, mine, 128, fb * 64, 2 * F, H, Gu, 1);
            block_rows(p_gu[e], sz_gu[e], x, xs, mine + 64, 128, F + fb * 64, 2 * F, H, Gu, 1);
            for (int r = 0; r < 64; r++) {
                const float g = mine[r], u = mine[64 + r];
                h[e * F + fb * 64 + r] = g / (1.0f + expf(-g)) * u;
            }
        }
#pragma omp for
        for (int64_t e = 0; e < E; e++) group_sums(h + e * F, hs + e * (F / Gd), 1, F, Gd);
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nh; i++) {
            const int64_t e = i / nh, nb = i % nh;
            block_rows(p_d[e], sz_d[e], h + e * F, hs + e * (F / Gd), y + e * H + nb * 64, H,
                       nb * 64, H, F, Gd, 1);
        }
    }
}

/* Rows n0..n0+rows-1 (rows a multiple of 64) of W, transposed: out [K, rows] float32, or
 * bf16 rounded to nearest even, for dequantize-then-GEMM (y = x @ out). */
void int4_dequant(const uint8_t *packed, const sz_t *sz, void *out, int bf16, int64_t n0,
                  int64_t rows, int64_t N, int64_t K, int64_t G, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t bl = 0; bl < rows / 64; bl++) {
        const uint8_t *pb = packed + (n0 + bl * 64) * (K / 2);
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t g = 0; g < K / G; g++) {
            __m512 s[4], bz[4];
            load_sz(sz + g * N + n0 + bl * 64, s, bz);
            for (int i = 0; i < 4; i++) bz[i] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s[i], bz[i]);
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(pb + k * 32));
                const __m256i lo = _mm256_and_si256(b, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
                const __m128i q[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                      _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
                for (int i = 0; i < 4; i++) {
                    const __m512 w =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q[i])), s[i], bz[i]);
                    const int64_t at = k * rows + bl * 64 + 16 * i;
                    if (bf16) {
                        const __m512i u = _mm512_castps_si512(w);
                        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                             _mm512_set1_epi32(1));
                        const __m512i r = _mm512_add_epi32(
                            u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at),
                                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
                    } else {
                        _mm512_storeu_ps((float *)out + at, w);
                    }
                }
            }
        }
    }
}

#ifdef __AVX512BF16__
/* The same sums with vdpbf16ps: 2 k-steps x 16 rows a instruction (float32 FMAs do 1 x 16).
 * A nibble q becomes the bfloat16 128 + q by OR-ing 0x4300 (exponent 7, q as mantissa), so
 * no conversion instruction is needed; each group's dot then carries 128 * sum(x), taken
 * off with the scale: w x = s * dot + (z - 136 s) * sum(x). x is bfloat16 [T, K], read as
 * (x[k], x[k+1]) pairs; products of bfloat16s are exact in float32. Lanes hold rows in the
 * order the byte unpacking leaves them (0-7 16-23 | 8-15 24-31 | 32-39 48-55 | 40-47 56-63),
 * so scales are permuted to match and outputs are stored back in row order. */
int int4_has_bf16(void) { return 1; }

static inline __attribute__((always_inline)) void block_tile_bf16(
    const uint8_t *packed, const sz_t *sz, const uint16_t *x, const float *xs, float *out,
    int64_t ldo, int64_t n0, int64_t N, int64_t K, int64_t G, int64_t t0, const int toks,
    const int once) {
    const uint8_t *pb = packed + n0 * (K / 2);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m512i bias = _mm512_set1_epi16(0x4300);
    const __m512i pa = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i pbx = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                          30, 31);
    const int64_t ng = K / G;
    __m512 acc[TT][4];
    for (int t = 0; t < TT; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512 dot[TT][4];
        for (int t = 0; t < TT; t++)
            for (int i = 0; i < 4; i++) dot[t][i] = _mm512_setzero_ps();
        prefetch_sz(sz, g, N, n0);
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            prefetch_w(pb + k * 32 + PREFETCH, once);
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(pb + k * 32));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(pb + k * 32 + 32));
            const __m256i lo0 = _mm256_and_si256(b0, low4), lo1 = _mm256_and_si256(b1, low4);
            const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low4);
            const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low4);
            __m512bh w[4];
            w[0] = (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(lo0, lo1)), bias);
            w[1] = (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(lo0, lo1)), bias);
            w[2] = (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(hi0, hi1)), bias);
            w[3] = (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(hi0, hi1)), bias);
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const uint32_t pair = *(const uint32_t *)(x + (t0 + t) * K + k);
                const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int i = 0; i < 4; i++) dot[t][i] = _mm512_dpbf16_ps(dot[t][i], w[i], xb);
            }
        }
        __m512 s[4], z[4];
        load_sz(sz + g * N + n0, s, z);
        const __m512 sp[4] = {_mm512_permutex2var_ps(s[0], pa, s[1]),
                              _mm512_permutex2var_ps(s[0], pbx, s[1]),
                              _mm512_permutex2var_ps(s[2], pa, s[3]),
                              _mm512_permutex2var_ps(s[2], pbx, s[3])};
        const __m512 zp[4] = {_mm512_permutex2var_ps(z[0], pa, z[1]),
                              _mm512_permutex2var_ps(z[0], pbx, z[1]),
                              _mm512_permutex2var_ps(z[2], pa, z[3]),
                              _mm512_permutex2var_ps(z[2], pbx, z[3])};
        for (int i = 0; i < 4; i++) {
            const __m512 sc = sp[i], z = zp[i];
            const __m512 bz = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), sc, z);
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const __m512 xsum = _mm512_set1_ps(xs[(t0 + t) * ng + g]);
                acc[t][i] = _mm512_fmadd_ps(sc, dot[t][i], acc[t][i]);
                acc[t][i] = _mm512_fmadd_ps(bz, xsum, acc[t][i]);
            }
        }
    }
    static const int base[4] = {0, 8, 32, 40};
    for (int t = 0; t < TT; t++) {
        if (t >= toks) break;
        float *o = out + t * ldo;
        for (int i = 0; i < 4; i++) { /* lanes 0-7 -> rows base..+7, lanes 8-15 -> +16 */
            _mm256_storeu_ps(o + base[i], _mm512_castps512_ps256(acc[t][i]));
            _mm256_storeu_ps(o + base[i] + 16, _mm512_extractf32x8_ps(acc[t][i], 1));
        }
    }
}

static void block_rows_bf16(const uint8_t *packed, const sz_t *sz, const uint16_t *x,
                            const float *xs, float *out, int64_t ldo, int64_t n0, int64_t N,
                            int64_t K, int64_t G, int64_t T) {
    int64_t t0 = 0;
    const int once = T <= TT && stream_nta;
#define TILE(n) block_tile_bf16(packed, sz, x, xs, out + t0 * ldo, ldo, n0, N, K, G, t0, n, once)
    for (; t0 + TT <= T; t0 += TT) TILE(TT);
    switch (T - t0) {
    case 1: TILE(1); break;
    case 2: TILE(2); break;
    case 3: TILE(3); break;
    default: break;
    }
#undef TILE
}

static void group_sums_bf16(const uint16_t *x, float *xs, int64_t T, int64_t K, int64_t G) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < K / G; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(x[t * K + k]);
            xs[t * (K / G) + g] = s;
        }
}

/* int4_ffn on bfloat16 activations: x [T, H] bf16; the SiLU product h is rounded to bf16
 * (h16 [T, F] scratch) before down, as a bf16 model rounds it; y float32. */
void int4_ffn_bf16(const uint8_t *p_gu, const sz_t *sz_gu, const uint8_t *p_d,
                   const sz_t *sz_d, const uint16_t *x, uint16_t *h16, float *gu, float *xs,
                   float *hs, float *y, int64_t T, int64_t H, int64_t F, int64_t Gu, int64_t Gd,
                   int threads) {
    group_sums_bf16(x, xs, T, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu, *my_hs = hs;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * T * 128;
        my_hs = hs + (int64_t)omp_get_thread_num() * T * (F / Gd);
#endif
#pragma omp for schedule(dynamic, 2)
        for (int64_t fb = 0; fb < F / 64; fb++) {
            block_rows_bf16(p_gu, sz_gu, x, xs, mine, 128, fb * 64, 2 * F, H, Gu, T);
            block_rows_bf16(p_gu, sz_gu, x, xs, mine + 64, 128, F + fb * 64, 2 * F, H, Gu, T);
            for (int64_t t = 0; t < T; t++)
                for (int r = 0; r < 64; r++) {
                    const float g = mine[t * 128 + r], u = mine[t * 128 + 64 + r];
                    h16[t * F + fb * 64 + r] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
                }
        }
        group_sums_bf16(h16, my_hs, T, F, Gd);
#pragma omp for schedule(dynamic, 2)
        for (int64_t nb = 0; nb < H / 64; nb++)
            block_rows_bf16(p_d, sz_d, h16, my_hs, y + nb * 64, H, nb * 64, H, F, Gd, T);
    }
}

/* int4_ffn_group on a bfloat16 token, bit for bit int4_ffn_bf16 per expert. Scratch: xs
 * [H/Gu]; h16 [E, F] bf16; hs [E, F/Gd]; gu [threads, 128]. */
void int4_ffn_bf16_group(int64_t E, const uint8_t *const *p_gu, const sz_t *const *sz_gu,
                         const uint8_t *const *p_d, const sz_t *const *sz_d,
                         const uint16_t *x, uint16_t *h16, float *gu, float *xs, float *hs,
                         float *y, int64_t H, int64_t F, int64_t Gu, int64_t Gd, int threads) {
    const int64_t nf = F / 64, nh = H / 64;
    group_sums_bf16(x, xs, 1, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * 128;
#endif
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nf; i++) {
            const int64_t e = i / nf, fb = i % nf;
            block_rows_bf16(p_gu[e], sz_gu[e], x, xs, mine, 128, fb * 64, 2 * F, H, Gu, 1);
            block_rows_bf16(p_gu[e], sz_gu[e], x, xs, mine + 64, 128, F + fb * 64, 2 * F, H, Gu,
                            1);
            for (int r = 0; r < 64; r++) {
                const float g = mine[r], u = mine[64 + r];
                h16[e * F + fb * 64 + r] = f32_to_bf16(g / (1.0f + expf(-g)) * u);
            }
        }
#pragma omp for
        for (int64_t e = 0; e < E; e++)
            group_sums_bf16(h16 + e * F, hs + e * (F / Gd), 1, F, Gd);
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nh; i++) {
            const int64_t e = i / nh, nb = i % nh;
            block_rows_bf16(p_d[e], sz_d[e], h16 + e * F, hs + e * (F / Gd), y + e * H + nb * 64,
                            H, nb * 64, H, F, Gd, 1);
        }
    }
}
#endif /* __AVX512BF16__ */

#ifdef __AVX512VNNI__
/* The same sums with vpdpbusd on int8 activations, as llama.cpp computes Q4 x Q8: each token's
 * x is rounded per group to int8 with one float scale (sx), and nibbles times int8 x sum
 * exactly in int32, 4 k-steps x 16 rows an instruction (twice vdpbf16ps' work). Per group:
 * w x = s * sx * dot + (z - 8 s) * sx * sum(xq). The nibbles of k..k+3 are
 * interleaved into (row: k, k+1, k+2, k+3) byte quads: with AVX512_VBMI in row order, else in
 * 4-row pieces that a 4x4 transpose of 128-bit lanes turns into row order (and scales into
 * lane order). */
int int4_has_vnni(void) { return 1; }

static inline void lanes_4x4(__m512i v[4]) { /* v[L].lane[i] <-> v[i].lane[L] */
    const __m512i t0 = _mm512_shuffle_i32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t1 = _mm512_shuffle_i32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i t2 = _mm512_shuffle_i32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t3 = _mm512_shuffle_i32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2));
    v[0] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0));
    v[1] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1));
    v[2] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0));
    v[3] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1));
}

#ifdef __AVX512VBMI__
/* The nibbles of columns k..k+3 of a block (p: its bytes at column k) as (k, k+1, k+2, k+3)
 * byte quads, rows in order: q[i] holds rows 16 i .. 16 i + 15. One byte permutation a pair
 * of columns puts each row's bytes of k and k+1 side by side (lane L: rows 4 L .. 4 L + 3,
 * then 16 + 4 L ..), a 16-bit unpack of the two pairs makes the quads, and a byte's low and
 * high nibbles are rows r and r + 32: 4 shuffles for 256 weights where the unpacks alone
 * below take 12 (the expert at one token from RAM x1.05 on a Xeon, the same bits). */
#define ROWS_IN_ORDER 1
int int4_permutes_bytes(void) { return 1; }
static const uint8_t PAIR_ROWS[64] __attribute__((aligned(64))) = {
    0,  32, 1,  33, 2,  34, 3,  35, 16, 48, 17, 49, 18, 50, 19, 51, 4,  36, 5,  37, 6,  38,
    7,  39, 20, 52, 21, 53, 22, 54, 23, 55, 8,  40, 9,  41, 10, 42, 11, 43, 24, 56, 25, 57,
    26, 58, 27, 59, 12, 44, 13, 45, 14, 46, 15, 47, 28, 60, 29, 61, 30, 62, 31, 63};

static inline __attribute__((always_inline)) void interleave4(const uint8_t *p, __m512i q[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i idx = _mm512_load_si512((const void *)PAIR_ROWS);
    const __m512i p01 = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512((const void *)p));
    const __m512i p23 = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512((const void *)(p + 64)));
    const __m512i lo = _mm512_unpacklo_epi16(p01, p23), hi = _mm512_unpackhi_epi16(p01, p23);
    q[0] = _mm512_and_si512(lo, low4);
    q[1] = _mm512_and_si512(hi, low4);
    q[2] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), low4);
    q[3] = _mm512_and_si512(_mm512_srli_epi16(hi, 4), low4);
}
#else /* AVX-512 without VBMI (Skylake-X, Cascade Lake) */
int int4_permutes_bytes(void) { return 0; }
/* The nibbles of columns k..k+3 of a block (p: its bytes at column k) as (k, k+1, k+2, k+3)
 * byte quads, q[i] lane L holding rows 16 L + 4 i .. + 3. */
static inline __attribute__((always_inline)) void interleave4(const uint8_t *p, __m512i q[4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m512i w[4];
    for (int j = 0; j < 4; j++) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(p + j * 32));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
        w[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)), hi, 1);
    }
    const __m512i a = _mm512_unpacklo_epi8(w[0], w[1]), b = _mm512_unpackhi_epi8(w[0], w[1]);
    const __m512i c = _mm512_unpacklo_epi8(w[2], w[3]), d = _mm512_unpackhi_epi8(w[2], w[3]);
    q[0] = _mm512_unpacklo_epi16(a, c);
    q[1] = _mm512_unpackhi_epi16(a, c);
    q[2] = _mm512_unpacklo_epi16(b, d);
    q[3] = _mm512_unpackhi_epi16(b, d);
}
#endif

/* qb: the block interleaved by interleave_block (K vectors), or NULL to interleave here. */
static inline __attribute__((always_inline)) void block_tile_i8(
    const uint8_t *packed, const __m512i *qb, const sz_t *sz, const int8_t *xq,
    const float *sx, const float *xs, float *out, int64_t ldo, int64_t n0, int64_t N, int64_t K,
    int64_t G, int64_t t0, const int toks, const int once) {
    const uint8_t *pb = packed + n0 * (K / 2);
    const int64_t ng = K / G;
    __m512 acc[TT][4];
    for (int t = 0; t < TT; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i dot[TT][4];
        for (int t = 0; t < TT; t++)
            for (int i = 0; i < 4; i++) dot[t][i] = _mm512_setzero_si512();
        prefetch_sz(sz, g, N, n0);
        for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
            __m512i q[4];
            prefetch_w(pb + k * 32 + PREFETCH, once);
            prefetch_w(pb + k * 32 + PREFETCH + 64, once);
            if (qb) { /* interleaved already (interleave_block) */
                for (int i = 0; i < 4; i++) q[i] = _mm512_load_si512((const void *)(qb + k + i));
            } else {
                interleave4(pb + k * 32, q);
            }
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(xq + (t0 + t) * K + k));
                for (int i = 0; i < 4; i++) dot[t][i] = _mm512_dpbusd_epi32(dot[t][i], q[i], xb);
            }
        }
        __m512 s[4], z[4];
        load_sz(sz + g * N + n0, s, z);
        __m512i vs[4], vz[4]; /* rows in the lanes the dot products hold them in */
        for (int i = 0; i < 4; i++) vs[i] = _mm512_castps_si512(s[i]), vz[i] = _mm512_castps_si512(z[i]);
#ifndef ROWS_IN_ORDER
        lanes_4x4(vs);
        lanes_4x4(vz);
#endif
        for (int i = 0; i < 4; i++) {
            const __m512 sc = _mm512_castsi512_ps(vs[i]), z = _mm512_castsi512_ps(vz[i]);
            const __m512 bz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, z);
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const __m512 ssx = _mm512_mul_ps(sc, _mm512_set1_ps(sx[(t0 + t) * ng + g]));
                const __m512 xsum = _mm512_set1_ps(xs[(t0 + t) * ng + g]);
                acc[t][i] = _mm512_fmadd_ps(ssx, _mm512_cvtepi32_ps(dot[t][i]), acc[t][i]);
                acc[t][i] = _mm512_fmadd_ps(bz, xsum, acc[t][i]);
            }
        }
    }
    for (int t = 0; t < TT; t++) {
        if (t >= toks) break;
        __m512i r[4];
        for (int i = 0; i < 4; i++) r[i] = _mm512_castps_si512(acc[t][i]);
#ifndef ROWS_IN_ORDER
        lanes_4x4(r);
#endif
        for (int i = 0; i < 4; i++) _mm512_storeu_si512((void *)(out + t * ldo + 16 * i), r[i]);
    }
}

/* From MANY tokens on, a block is interleaved once into a per-thread buffer (K * 64 bytes,
 * in L2) that every token tile reads, instead of once per tile of TT tokens (TT = 6
 * spills and runs 2x slower). */
#define MANY 8
static __thread __m512i *qbuf = NULL; /* kept for the thread's life: one block's worth */
static __thread int64_t qcap = 0;

static const __m512i *interleave_block(const uint8_t *pb, int64_t K) {
    if (K > qcap) {
        free(qbuf);
        qbuf = aligned_alloc(64, (size_t)K * 64);
        qcap = qbuf ? K : 0;
    }
    if (!qbuf) return NULL;
    for (int64_t k = 0; k < K; k += 4) interleave4(pb + k * 32, qbuf + k);
    return qbuf;
}

static void block_rows_i8(const uint8_t *packed, const sz_t *sz, const int8_t *xq,
                          const float *sx, const float *xs, float *out, int64_t ldo, int64_t n0,
                          int64_t N, int64_t K, int64_t G, int64_t T) {
    const __m512i *qb = T >= MANY ? interleave_block(packed + n0 * (K / 2), K) : NULL;
    int64_t t0 = 0;
    const int once = T <= TT && stream_nta;
#define TILE(n)                                                                               \
    (qb ? block_tile_i8(packed, qb, sz, xq, sx, xs, out + t0 * ldo, ldo, n0, N, K, G, t0, n,  \
                        once)                                                                 \
        : block_tile_i8(packed, NULL, sz, xq, sx, xs, out + t0 * ldo, ldo, n0, N, K, G, t0, n,\
                        once))
    for (; t0 + TT <= T; t0 += TT) TILE(TT);
    switch (T - t0) {
    case 1: TILE(1); break;
    case 2: TILE(2); break;
    case 3: TILE(3); break;
    default: break;
    }
#undef TILE
}

/* Row t of x [T, K] -> int8 xq, per group of G: scale sx = max|x| / 127, and xs the sum of
 * the rounded group (sx * sum xq), not of x: the zero-point term then has the same rounding
 * as the nibble term and their errors cancel (the weights' offset z - 8 s is large). */
static void quant_row_i8(const float *x, int8_t *xq, float *sx, float *xs, int64_t t, int64_t K,
                         int64_t G) {
    for (int64_t g = 0; g < K / G; g++) {
        const float *xg = x + t * K + g * G;
        int8_t *qg = xq + t * K + g * G;
        int64_t k = 0;
        __m512 vmax = _mm512_setzero_ps();
        for (; k + 16 <= G; k += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
        float amax = _mm512_reduce_max_ps(vmax);
        for (; k < G; k++) amax = fmaxf(amax, fabsf(xg[k]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        /* cvtps rounds to nearest even (the default mode), as lrintf: the same int8 steps */
        __m512i vsum = _mm512_setzero_si512();
        for (k = 0; k + 16 <= G; k += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xg + k), _mm512_set1_ps(inv));
            const __m512i q = _mm512_cvtps_epi32(v);
            _mm_storeu_si128((__m128i *)(qg + k), _mm512_cvtepi32_epi8(q));
            vsum = _mm512_add_epi32(vsum, q);
        }
        int32_t sum = _mm512_reduce_add_epi32(vsum);
        for (; k < G; k++) {
            const int8_t q = (int8_t)lrintf(xg[k] * inv);
            qg[k] = q;
            sum += q;
        }
        sx[t * (K / G) + g] = amax / 127.0f;
        xs[t * (K / G) + g] = (float)sum * (amax / 127.0f);
    }
}

/* y [T, N] = x [T, K] @ W.T with int8 activations, and y rounded to bfloat16 into out16
 * where given. Scratch: xq [T, K] int8, sx, xs [T, K/G]. */
static void linear_i8(const uint8_t *packed, const sz_t *sz, const int8_t *xq, const float *sx,
                      const float *xs, float *y, uint16_t *out16, int64_t T, int64_t N,
                      int64_t K, int64_t G, int threads) {
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t nb = 0; nb < N / 64; nb++) {
        block_rows_i8(packed, sz, xq, sx, xs, y + nb * 64, N, nb * 64, N, K, G, T);
        if (out16)
            for (int64_t t = 0; t < T; t++)
                for (int64_t r = nb * 64; r < nb * 64 + 64; r++)
                    out16[t * N + r] = f32_to_bf16(y[t * N + r]);
    }
}

void int4_linear_i8(const uint8_t *packed, const sz_t *sz, const float *x, int8_t *xq,
                    float *sx, float *xs, float *y, int64_t T, int64_t N, int64_t K, int64_t G,
                    int threads) {
    for (int64_t t = 0; t < T; t++) quant_row_i8(x, xq, sx, xs, t, K, G);
    linear_i8(packed, sz, xq, sx, xs, y, NULL, T, N, K, G, threads);
}

/* int4_linear_i8 of bfloat16 rows x [T, K] (xf: float scratch [T, K] they are widened
 * into), its y [T, N] rounded to bfloat16 into out as `.to(bfloat16)` rounds it: what a
 * bf16 model takes, with no conversions around the call. */
void int4_linear_i8_bf16(const uint8_t *packed, const sz_t *sz, const uint16_t *x, float *xf,
                         int8_t *xq, float *sx, float *xs, float *y, uint16_t *out, int64_t T,
                         int64_t N, int64_t K, int64_t G, int threads) {
    for (int64_t i = 0; i < T * K; i++) xf[i] = bf16_to_f32(x[i]);
    for (int64_t t = 0; t < T; t++) quant_row_i8(xf, xq, sx, xs, t, K, G);
    linear_i8(packed, sz, xq, sx, xs, y, out, T, N, K, G, threads);
}

void int4_ffn_i8_group(int64_t E, const uint8_t *const *p_gu, const sz_t *const *sz_gu,
                       const uint8_t *const *p_d, const sz_t *const *sz_d, const float *x,
                       int8_t *xq, float *sx, float *xs, float *h, int8_t *hq, float *hsx,
                       float *hs, float *gu, float *y, int64_t H, int64_t F, int64_t Gu,
                       int64_t Gd, int threads);

/* int4_ffn with int8 activations: x [T, H] float32, y float32. Scratch: xq [T, H] and hq
 * [T, F] int8; sx, xs [T, H/Gu] and hsx, hs [T, F/Gd] floats; h [T, F] and gu
 * [threads, T, 128] floats. */
void int4_ffn_i8(const uint8_t *p_gu, const sz_t *sz_gu, const uint8_t *p_d,
                 const sz_t *sz_d, const float *x, int8_t *xq, float *sx, float *xs,
                 float *h, int8_t *hq, float *hsx, float *hs, float *gu, float *y, int64_t T,
                 int64_t H, int64_t F, int64_t Gu, int64_t Gd, int threads) {
    if (T == 1) { /* as a decode step's group call: guided blocks (x1.09-1.11 on a Xeon, from
                   * RAM), its scratch the same shapes at one expert and one token */
        const uint8_t *pg[1] = {p_gu}, *pd[1] = {p_d};
        const sz_t *sg[1] = {sz_gu}, *sd[1] = {sz_d};
        int4_ffn_i8_group(1, pg, sg, pd, sd, x, xq, sx, xs, h, hq, hsx, hs, gu, y, H, F, Gu, Gd,
                          threads);
        return;
    }
    for (int64_t t = 0; t < T; t++) quant_row_i8(x, xq, sx, xs, t, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * T * 128;
#endif
#pragma omp for schedule(dynamic, 2)
        for (int64_t fb = 0; fb < F / 64; fb++) {
            block_rows_i8(p_gu, sz_gu, xq, sx, xs, mine, 128, fb * 64, 2 * F, H, Gu, T);
            block_rows_i8(p_gu, sz_gu, xq, sx, xs, mine + 64, 128, F + fb * 64, 2 * F, H, Gu, T);
            for (int64_t t = 0; t < T; t++)
                for (int r = 0; r < 64; r++) {
                    const float g = mine[t * 128 + r], u = mine[t * 128 + 64 + r];
                    h[t * F + fb * 64 + r] = g / (1.0f + expf(-g)) * u;
                }
        }
#pragma omp for
        for (int64_t t = 0; t < T; t++) quant_row_i8(h, hq, hsx, hs, t, F, Gd);
#pragma omp for schedule(dynamic, 2)
        for (int64_t nb = 0; nb < H / 64; nb++)
            block_rows_i8(p_d, sz_d, hq, hsx, hs, y + nb * 64, H, nb * 64, H, F, Gd, T);
    }
}

/* int4_ffn_group with int8 activations, bit for bit int4_ffn_i8 per expert. Scratch: xq [H]
 * int8, sx, xs [H/Gu]; h [E, F] float, hq [E, F] int8, hsx, hs [E, F/Gd]; gu [threads, 128]. */
void int4_ffn_i8_group(int64_t E, const uint8_t *const *p_gu, const sz_t *const *sz_gu,
                       const uint8_t *const *p_d, const sz_t *const *sz_d, const float *x,
                       int8_t *xq, float *sx, float *xs, float *h, int8_t *hq, float *hsx,
                       float *hs, float *gu, float *y, int64_t H, int64_t F, int64_t Gu,
                       int64_t Gd, int threads) {
    const int64_t nf = F / 64, nh = H / 64, ng = F / Gd;
    quant_row_i8(x, xq, sx, xs, 0, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * 128;
#endif
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nf; i++) {
            const int64_t e = i / nf, fb = i % nf;
            block_rows_i8(p_gu[e], sz_gu[e], xq, sx, xs, mine, 128, fb * 64, 2 * F, H, Gu, 1);
            block_rows_i8(p_gu[e], sz_gu[e], xq, sx, xs, mine + 64, 128, F + fb * 64, 2 * F, H,
                          Gu, 1);
            for (int r = 0; r < 64; r++) {
                const float g = mine[r], u = mine[64 + r];
                h[e * F + fb * 64 + r] = g / (1.0f + expf(-g)) * u;
            }
        }
#pragma omp for
        for (int64_t e = 0; e < E; e++)
            quant_row_i8(h + e * F, hq + e * F, hsx + e * ng, hs + e * ng, 0, F, Gd);
#pragma omp for schedule(guided)
        for (int64_t i = 0; i < E * nh; i++) {
            const int64_t e = i / nh, nb = i % nh;
            block_rows_i8(p_d[e], sz_d[e], hq + e * F, hsx + e * ng, hs + e * ng,
                          y + e * H + nb * 64, H, nb * 64, H, F, Gd, 1);
        }
    }
}
#endif /* __AVX512VNNI__ */

#else /* no AVX-512: these are never chosen (the caller checks int4_simd) */

void int4_stream_nta(int on) { (void)on; } /* prefetches nothing non-temporal */

#if defined(__AVX2__) && defined(__FMA__)
int int4_simd(void) { return 256; }
#else
int int4_simd(void) { return 0; }
#endif

void int4_linear(const uint8_t *packed, const sz_t *sz, const float *x, float *xs, float *y,
                 int64_t T, int64_t N, int64_t K, int64_t G, int threads) {
    (void)packed; (void)sz; (void)x; (void)xs; (void)y; (void)T; (void)N; (void)K; (void)G;
    (void)threads;
}

void int4_ffn(const uint8_t *p_gu, const sz_t *sz_gu, const uint8_t *p_d,
              const sz_t *sz_d, const float *x, float *h, float *gu, float *xs, float *hs,
              float *y, int64_t T, int64_t H, int64_t F, int64_t Gu, int64_t Gd, int threads) {
    (void)p_gu; (void)sz_gu; (void)p_d; (void)sz_d; (void)x; (void)h; (void)gu; (void)xs;
    (void)hs; (void)y; (void)T; (void)H; (void)F; (void)Gu; (void)Gd; (void)threads;
}

void int4_dequant(const uint8_t *packed, const sz_t *sz, void *out, int bf16, int64_t n0,
                  int64_t rows, int64_t N, int64_t K, int64_t G, int threads) {
    (void)packed; (void)sz; (void)out; (void)bf16; (void)n0; (void)rows; (void)N; (void)K;
    (void)G; (void)threads;
}

#endif

#if defined(__AVX2__) && defined(__FMA__) && (defined(__F16C__) || !defined(INT4_SYMMETRIC))
/* The AVX2 + FMA kernels (no AVX-512 instruction when built with -mno-avx512f: the path of
 * CPUs without AVX-512; they run on AVX-512 CPUs too, so they are measured and tested on
 * them). They read either "halves" layout: a block of B = 64 ("tinygemm-avx512") or 32
 * ("tinygemm-avx2", what PyTorch packs on such CPUs) rows holds, per column k, B/2 bytes
 * whose low nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1. One token at a time
 * (16 ymm registers hold B/8 accumulators and their decoded weights), float32 FMAs. */
#include <immintrin.h>

static inline __attribute__((always_inline)) void block_token_avx2(
    const uint8_t *packed, const sz_t *sz, const float *x, const float *xs, float *out,
    int64_t n0, int64_t N, int64_t K, int64_t G, const int B) {
    const uint8_t *pb = packed + n0 * (K / 2);
    const __m128i low4 = _mm_set1_epi8(0x0F);
#ifndef INT4_SYMMETRIC
    const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
#endif
    const int64_t ng = K / G;
    __m256 acc[8];
    for (int i = 0; i < B / 8; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 dot[8];
        for (int i = 0; i < B / 8; i++) dot[i] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            const __m256 xb = _mm256_set1_ps(x[k]);
            for (int c = 0; c < B / 32; c++) { /* 16 bytes: rows 16c.. (low), B/2 + 16c.. (high) */
                const __m128i b = _mm_loadu_si128((const __m128i *)(pb + k * (B / 2) + 16 * c));
                const __m128i lo = _mm_and_si128(b, low4);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                const int r0 = 2 * c, r1 = B / 16 + 2 * c; /* vector index of 8 rows */
                dot[r0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), xb, dot[r0]);
                dot[r0 + 1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), xb, dot[r0 + 1]);
                dot[r1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), xb, dot[r1]);
                dot[r1 + 1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), xb, dot[r1 + 1]);
            }
        }
        const __m256 xsum = _mm256_set1_ps(xs[g]);
        for (int i = 0; i < B / 8; i++) {
#ifdef INT4_SYMMETRIC
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sz + g * N + n0 + 8 * i)));
            const __m256 z = _mm256_setzero_ps();
#else
            const __m256i v = _mm256_loadu_si256((const __m256i *)(sz + g * N + n0 + 8 * i));
            const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
#endif
            const __m256 bz = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z); /* z - 8 s */
            acc[i] = _mm256_fmadd_ps(s, dot[i], acc[i]);
            acc[i] = _mm256_fmadd_ps(bz, xsum, acc[i]);
        }
    }
    for (int i = 0; i < B / 8; i++) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

/* All T tokens through one block of B rows; out[t * ldo + r]. */
static void block_rows_avx2(const uint8_t *packed, const sz_t *sz, const float *x,
                            const float *xs, float *out, int64_t ldo, int64_t n0, int64_t N,
                            int64_t K, int64_t G, int64_t T, int64_t B) {
    for (int64_t t = 0; t < T; t++) {
        if (B == 64)
            block_token_avx2(packed, sz, x + t * K, xs + t * (K / G), out + t * ldo, n0, N, K, G, 64);
        else
            block_token_avx2(packed, sz, x + t * K, xs + t * (K / G), out + t * ldo, n0, N, K, G, 32);
    }
}

static void group_sums_avx2(const float *x, float *xs, int64_t T, int64_t K, int64_t G) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < K / G; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[t * K + k];
            xs[t * (K / G) + g] = s;
        }
}

/* int4_linear for a layout of B-row blocks (64 or 32). */
void int4_linear_avx2(const uint8_t *packed, const sz_t *sz, const float *x, float *xs,
                      float *y, int64_t T, int64_t N, int64_t K, int64_t G, int64_t B,
                      int threads) {
    group_sums_avx2(x, xs, T, K, G);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 2)
    for (int64_t nb = 0; nb < N / B; nb++)
        block_rows_avx2(packed, sz, x, xs, y + nb * B, N, nb * B, N, K, G, T, B);
}

/* int4_ffn for a layout of B-row blocks (64 or 32); scratch as int4_ffn's, gu [threads, T, 2B]. */
void int4_ffn_avx2(const uint8_t *p_gu, const sz_t *sz_gu, const uint8_t *p_d,
                   const sz_t *sz_d, const float *x, float *h, float *gu, float *xs,
                   float *hs, float *y, int64_t T, int64_t H, int64_t F, int64_t Gu, int64_t Gd,
                   int64_t B, int threads) {
    group_sums_avx2(x, xs, T, H, Gu);
#pragma omp parallel num_threads(threads)
    {
        float *mine = gu, *my_hs = hs;
#ifdef _OPENMP
        mine = gu + (int64_t)omp_get_thread_num() * T * 2 * B;
        my_hs = hs + (int64_t)omp_get_thread_num() * T * (F / Gd);
#endif
#pragma omp for schedule(dynamic, 2)
        for (int64_t fb = 0; fb < F / B; fb++) {
            block_rows_avx2(p_gu, sz_gu, x, xs, mine, 2 * B, fb * B, 2 * F, H, Gu, T, B);
            block_rows_avx2(p_gu, sz_gu, x, xs, mine + B, 2 * B, F + fb * B, 2 * F, H, Gu, T, B);
            for (int64_t t = 0; t < T; t++)
                for (int64_t r = 0; r < B; r++) {
                    const float g = mine[t * 2 * B + r], u = mine[t * 2 * B + B + r];
                    h[t * F + fb * B + r] = g / (1.0f + expf(-g)) * u;
                }
        }
        group_sums_avx2(h, my_hs, T, F, Gd);
#pragma omp for schedule(dynamic, 2)
        for (int64_t nb = 0; nb < H / B; nb++)
            block_rows_avx2(p_d, sz_d, h, my_hs, y + nb * B, H, nb * B, H, F, Gd, T, B);
    }
}
#endif /* __AVX2__ && __FMA__ */

/* A decode token's MoE output from its experts' float32 outputs y [n, H] and router weights
 * w [n], in expert order, rounded as PyTorch rounds the same steps in the model's dtype:
 * each expert's row to that dtype, times its weight in float32, back to the dtype, then a
 * running sum rounded after every add (as `layers.moe` sums a token's experts, alone or in
 * a batch). So a token's output is the same bits through this, the one-expert-at-a-time
 * path and a batch. Built without FMA contraction: a fused multiply-add rounds once where PyTorch
 * rounds twice. */
static inline float round_bf16(float f) { /* to the nearest bf16, ties to even; finite f */
    union { float f; uint32_t u; } c = {f};
    c.u = (c.u + 0x7FFF + ((c.u >> 16) & 1)) & 0xFFFF0000u;
    return c.f;
}

/* Experts outer and elements inner, in strips of MOE_SUM_STRIP kept in L1, so the compiler
 * vectorises across elements (the per-element order of adds is the same). */
#define MOE_SUM_STRIP 256
__attribute__((optimize("fp-contract=off"))) void moe_sum_bf16(const float *y, const float *w,
                                                                uint16_t *out, int64_t n,
                                                                int64_t H) {
    for (int64_t j0 = 0; j0 < H; j0 += MOE_SUM_STRIP) {
        const int64_t m = H - j0 < MOE_SUM_STRIP ? H - j0 : MOE_SUM_STRIP;
        float acc[MOE_SUM_STRIP];
        for (int64_t j = 0; j < m; j++) acc[j] = round_bf16(round_bf16(y[j0 + j]) * w[0]);
        for (int64_t i = 1; i < n; i++) {
            const float *yi = y + i * H + j0;
            for (int64_t j = 0; j < m; j++)
                acc[j] = round_bf16(acc[j] + round_bf16(round_bf16(yi[j]) * w[i]));
        }
        for (int64_t j = 0; j < m; j++) {
            union { float f; uint32_t u; } c = {acc[j]};
            out[j0 + j] = (uint16_t)(c.u >> 16);
        }
    }
}

__attribute__((optimize("fp-contract=off"))) void moe_sum_f32(const float *y, const float *w,
                                                               float *out, int64_t n, int64_t H) {
    for (int64_t j = 0; j < H; j++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float p = y[i * H + j] * w[i];
            acc = i ? acc + p : p;
        }
        out[j] = acc;
    }
}
