/* y = x @ W.T for an MXFP4 weight W [N, K], read straight from its checkpoint bytes.
 *
 * W is `blocks` uint8 [N, K/32, 16] (byte j of a block holds element 2j in its low nibble and
 * 2j+1 in its high one, each an E2M1 code) and `scales` uint8 [N, K/32] (E8M0: the block's
 * weights are multiplied by 2^(scale - 127)). x arrives as float32 [T, K] with each 32-element
 * block de-interleaved (its 16 even elements, then its 16 odd ones), so that the low and high
 * nibbles of 16 bytes line up with two contiguous vectors of x. y is float32 [T, N].
 *
 * The AVX-512 path looks each nibble up in a 16-entry table held in one register
 * (vpermps), scales it by the block's power of two (exact) and accumulates in float32,
 * a tile of rows times a tile of tokens at a time so a weight is decoded once per tile
 * of tokens and each x vector serves several rows. Without AVX-512 an AVX2 path does the
 * same in 8 lanes, and without AVX2 a portable loop computes the same sums. One token reads
 * each weight once, so the SIMD paths prefetch the next row tile's bytes. Rows are split
 * across `threads` OpenMP threads (torch's own runtime, which is already loaded under the
 * same soname).
 *
 * Where the CPU has AVX512_BF16, `mxfp4_linear_bf16` takes x in bfloat16 (same layout) and
 * multiplies with vdpbf16ps, 32 products an instruction where float32 FMAs do 16: it
 * decodes a block straight to bfloat16 through a table already scaled by the block's power
 * of two (an integer add to the exponent field of the non-zero entries), so it needs every
 * scale byte in 2..252, where each scaled value is a normal bfloat16; the caller checks.
 * Products of bfloat16s are exact in float32, so it computes what the float32 path computes
 * on the same (bfloat16) x, up to float32 rounding, except that vdpbf16ps flushes values
 * below 2^-126 to zero: an absolute error of a few 2^-126 per output, far below any
 * activation's scale. It pays at 2+ tokens; one token is bound by memory, where both
 * paths are alike.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* 2^(s - 127) for each E8M0 byte s: ldexpf gets s == 0 (a subnormal) and 255 (inf) right,
 * as transformers' ldexp does. */
static void scale_table(float sc[256]) {
    for (int s = 0; s < 256; s++) sc[s] = ldexpf(1.0f, s - 127);
}

#ifdef __AVX512F__
#define RT 4 /* rows per tile */
#define TT 4 /* tokens per tile */

static inline __attribute__((always_inline)) void tile(
    const uint8_t *blocks, const uint8_t *scales, const float *x, float *y, const float *sc,
    int64_t n0, int rows, int64_t t0, int toks, int64_t N, int64_t K) {
    const __m512 lut = _mm512_loadu_ps(FP4);
    const int64_t nb = K / 32;
    __m512 acc[RT][TT];
    for (int r = 0; r < RT; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 xe[TT], xo[TT];
        for (int t = 0; t < TT; t++) { /* zeros past `toks`: never used, never loaded */
            const float *xt = x + (t0 + t) * K + b * 32;
            xe[t] = t < toks ? _mm512_loadu_ps(xt) : _mm512_setzero_ps();
            xo[t] = t < toks ? _mm512_loadu_ps(xt + 16) : _mm512_setzero_ps();
        }
        for (int r = 0; r < RT; r++) {
            if (r >= rows) break;
            const int64_t n = n0 + r;
            /* One token reads each weight byte once: memory latency, not arithmetic, is the
             * bound, so fetch the next tile's bytes ahead (it halved the 1-token time here).
             * Prefetches never fault, past the end of `blocks` included. */
            _mm_prefetch((const char *)(blocks + ((n + RT) * nb + b) * 16), _MM_HINT_T0);
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(blocks + (n * nb + b) * 16));
            const __m512i v = _mm512_cvtepu8_epi32(bytes);
            __m512 s = _mm512_set1_ps(sc[scales[n * nb + b]]);
            __m512 lo = _mm512_permutexvar_ps(v, lut); /* vpermps reads 4 index bits */
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            if (toks == 1) { /* one token: scale the block's dot product, not its weights */
                __m512 p = _mm512_fmadd_ps(lo, xe[0], _mm512_mul_ps(hi, xo[0]));
                acc[r][0] = _mm512_fmadd_ps(p, s, acc[r][0]);
                continue;
            }
            lo = _mm512_mul_ps(lo, s); /* exact: s is a power of two */
            hi = _mm512_mul_ps(hi, s);
            for (int t = 0; t < TT; t++) {
                if (t < toks)
                    acc[r][t] = _mm512_fmadd_ps(lo, xe[t], _mm512_fmadd_ps(hi, xo[t], acc[r][t]));
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < toks; t++)
            y[(t0 + t) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][t]);
}

int mxfp4_simd(void) { return 512; } /* which path this build compiled */

void mxfp4_linear(const uint8_t *blocks, const uint8_t *scales, const float *x, float *y,
                  int64_t T, int64_t N, int64_t K, int threads) {
    float sc[256];
    scale_table(sc);
    const int64_t ntiles = (N + RT - 1) / RT;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < ntiles; i++) {
        const int64_t n0 = i * RT;
        const int rows = N - n0 < RT ? (int)(N - n0) : RT;
        for (int64_t t0 = 0; t0 < T; t0 += TT) {
            const int toks = T - t0 < TT ? (int)(T - t0) : TT;
            /* Constant tile bounds (always_inline) let the compiler unroll the tile and keep
             * its accumulators in registers; only the last, partial row tile is generic. */
            if (rows < RT)
                tile(blocks, scales, x, y, sc, n0, rows, t0, toks, N, K);
            else if (toks == 4)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 4, N, K);
            else if (toks == 3)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 3, N, K);
            else if (toks == 2)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 2, N, K);
            else
                tile(blocks, scales, x, y, sc, n0, RT, t0, 1, N, K);
        }
    }
}

#ifdef __AVX512BF16__
/* E2M1 code -> bfloat16 bits (16 used of the 32 entries vpermw indexes). */
static const uint16_t FP4_BF16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080,
                                      0x40C0, 0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040,
                                      0xC080, 0xC0C0};

static inline __attribute__((always_inline)) void tile_bf16(
    const uint8_t *blocks, const uint8_t *scales, const uint16_t *x, float *y, int64_t n0,
    int rows, int64_t t0, int toks, int64_t N, int64_t K) {
    const __m512i lut = _mm512_loadu_si512(FP4_BF16);
    const __mmask32 nonzero = 0xFEFE; /* codes 0 and 8 are zeros: no exponent to shift */
    const int64_t nb = K / 32;
    __m512 acc[RT][TT];
    for (int r = 0; r < RT; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xv[TT];
        for (int t = 0; t < TT; t++) {
            const uint16_t *xt = x + (t0 + t) * K + b * 32;
            xv[t] = t < toks ? _mm512_loadu_si512(xt) : _mm512_setzero_si512();
        }
        for (int r = 0; r < RT; r++) {
            if (r >= rows) break;
            const int64_t n = n0 + r;
            _mm_prefetch((const char *)(blocks + ((n + RT) * nb + b) * 16), _MM_HINT_T0);
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(blocks + (n * nb + b) * 16));
            const __m256i w16 = _mm256_cvtepu8_epi16(bytes);
            const __m256i lo = _mm256_and_si256(w16, _mm256_set1_epi16(15));
            const __m256i hi = _mm256_srli_epi16(w16, 4);
            const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            const int16_t shift = (int16_t)((scales[n * nb + b] - 127) * 128); /* exponent += */
            const __m512i scaled =
                _mm512_mask_add_epi16(lut, nonzero, lut, _mm512_set1_epi16(shift));
            const __m512i w = _mm512_permutexvar_epi16(idx, scaled);
            for (int t = 0; t < TT; t++)
                if (t < toks)
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w, (__m512bh)xv[t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < toks; t++)
            y[(t0 + t) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][t]);
}

void mxfp4_linear_bf16(const uint8_t *blocks, const uint8_t *scales, const uint16_t *x, float *y,
                       int64_t T, int64_t N, int64_t K, int threads) {
    const int64_t ntiles = (N + RT - 1) / RT;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < ntiles; i++) {
        const int64_t n0 = i * RT;
        const int rows = N - n0 < RT ? (int)(N - n0) : RT;
        for (int64_t t0 = 0; t0 < T; t0 += TT) {
            const int toks = T - t0 < TT ? (int)(T - t0) : TT;
            if (rows < RT)
                tile_bf16(blocks, scales, x, y, n0, rows, t0, toks, N, K);
            else if (toks == 4)
                tile_bf16(blocks, scales, x, y, n0, RT, t0, 4, N, K);
            else if (toks == 3)
                tile_bf16(blocks, scales, x, y, n0, RT, t0, 3, N, K);
            else if (toks == 2)
                tile_bf16(blocks, scales, x, y, n0, RT, t0, 2, N, K);
            else
                tile_bf16(blocks, scales, x, y, n0, RT, t0, 1, N, K);
        }
    }
}
#endif

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2: the same scheme in 8 lanes. vpermps indexes 8 entries, so the table holds the
 * magnitudes and bit 3 of the code becomes the sign bit; 16 registers hold 2 rows x 4
 * tokens of accumulators. */
#define RT 2
#define TT 4

static inline __attribute__((always_inline)) __m256 decode8(__m256i codes, __m256 mags) {
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(mags, codes), _mm256_castsi256_ps(sign));
}

static inline __attribute__((always_inline)) void tile(
    const uint8_t *blocks, const uint8_t *scales, const float *x, float *y, const float *sc,
    int64_t n0, int rows, int64_t t0, int toks, int64_t N, int64_t K) {
    const __m256 mags = _mm256_loadu_ps(FP4);
    const int64_t nb = K / 32;
    __m256 acc[RT][TT];
    for (int r = 0; r < RT; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < RT; r++) {
            if (r >= rows) break;
            const int64_t n = n0 + r;
            const uint8_t *q = blocks + (n * nb + b) * 16;
            _mm_prefetch((const char *)(q + RT * nb * 16), _MM_HINT_T0);
            const __m256 s = _mm256_set1_ps(sc[scales[n * nb + b]]);
            __m256 w[4]; /* the even elements of bytes 0-7, 8-15, then the odd ones */
            for (int h = 0; h < 2; h++) {
                const __m128i bytes = _mm_loadl_epi64((const __m128i *)(q + 8 * h));
                const __m256i v = _mm256_cvtepu8_epi32(bytes);
                w[h] = _mm256_mul_ps(decode8(v, mags), s); /* exact: s is a power of two */
                w[2 + h] = _mm256_mul_ps(decode8(_mm256_srli_epi32(v, 4), mags), s);
            }
            for (int t = 0; t < TT; t++) {
                if (t >= toks) break;
                const float *xt = x + (t0 + t) * K + b * 32;
                __m256 a = acc[r][t];
                for (int i = 0; i < 4; i++)
                    a = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xt + 8 * i), a);
                acc[r][t] = a;
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < toks; t++) {
            const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]),
                                        _mm256_extractf128_ps(acc[r][t], 1));
            const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
            y[(t0 + t) * N + n0 + r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
        }
}

int mxfp4_simd(void) { return 256; }

void mxfp4_linear(const uint8_t *blocks, const uint8_t *scales, const float *x, float *y,
                  int64_t T, int64_t N, int64_t K, int threads) {
    float sc[256];
    scale_table(sc);
    const int64_t ntiles = (N + RT - 1) / RT;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < ntiles; i++) {
        const int64_t n0 = i * RT;
        const int rows = N - n0 < RT ? (int)(N - n0) : RT;
        for (int64_t t0 = 0; t0 < T; t0 += TT) {
            const int toks = T - t0 < TT ? (int)(T - t0) : TT;
            if (rows < RT)
                tile(blocks, scales, x, y, sc, n0, rows, t0, toks, N, K);
            else if (toks == 4)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 4, N, K);
            else if (toks == 3)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 3, N, K);
            else if (toks == 2)
                tile(blocks, scales, x, y, sc, n0, RT, t0, 2, N, K);
            else
                tile(blocks, scales, x, y, sc, n0, RT, t0, 1, N, K);
        }
    }
}

#else

int mxfp4_simd(void) { return 0; }

void mxfp4_linear(const uint8_t *blocks, const uint8_t *scales, const float *x, float *y,
                  int64_t T, int64_t N, int64_t K, int threads) {
    float sc[256];
    scale_table(sc);
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t t = 0; t < T; t++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = blocks + (n * nb + b) * 16;
                const float *xb = x + t * K + b * 32;
                float part = 0.0f;
                for (int j = 0; j < 16; j++)
                    part += FP4[q[j] & 15] * xb[j] + FP4[q[j] >> 4] * xb[16 + j];
                acc += part * sc[scales[n * nb + b]];
            }
            y[t * N + n] = acc;
        }
    }
}

#endif
