/* One token through an int8 weight: y [N] = (W [N, K] int8 * scale [N]) @ x [K] float32.
 *
 * Decode multiplies each int8 dense matrix by a single token: one pass over W's bytes. x is
 * rounded per group of 64 to int8 with one float scale (as llama.cpp's Q8 activations, and
 * mer's c-int8 int4 path), and each group's products sum exactly in int32 with vpdpbusd (64
 * multiply-adds an instruction), which multiplies unsigned by signed bytes: x goes in as
 * |x| and its sign moves onto w (w negated where x < 0), so |x| * (sign(x) w) = x w. Four
 * rows at a time share each group's x; threads take contiguous row ranges so each streams
 * its part of W. K must be a multiple of 64. Only the AVX512_VNNI build computes anything:
 * int8_gemv_simd() says which this is.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

int int8_gemv_simd(void) { return 512; }

/* Rows n0..n0+R-1; xa |x| as uint8, xm its sign masks, sx the group scales. */
static inline __attribute__((always_inline)) void rows_dot(
    const int8_t *w, const float *scale, const uint8_t *xa, const __mmask64 *xm,
    const float *sx, float *y, int64_t n0, int64_t K, const int R) {
    __m512 acc[4];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t g = 0; g < K / 64; g++) {
        const __m512i xv = _mm512_loadu_si512((const void *)(xa + 64 * g));
        const __m512 s = _mm512_set1_ps(sx[g]);
        for (int i = 0; i < R; i++) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + (n0 + i) * K + 64 * g));
            wv = _mm512_mask_sub_epi8(wv, xm[g], zero, wv);
            const __m512i d = _mm512_dpbusd_epi32(zero, xv, wv);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i]);
        }
    }
    for (int i = 0; i < R; i++) y[n0 + i] = _mm512_reduce_add_ps(acc[i]) * scale[n0 + i];
}

void int8_gemv(const int8_t *w, const float *scale, const float *x, float *y, int64_t N,
               int64_t K, int threads) {
    const int64_t ng = K / 64;
    uint8_t *xa = aligned_alloc(64, (size_t)K);
    __mmask64 *xm = malloc((size_t)ng * sizeof(__mmask64));
    float *sx = malloc((size_t)ng * sizeof(float));
    if (!xa || !xm || !sx) { /* never expected for a row of x; y gets NaN, the caller's
                                 probe and checks would show it */
        for (int64_t n = 0; n < N; n++) y[n] = NAN;
        free(xa); free(xm); free(sx);
        return;
    }
    for (int64_t g = 0; g < ng; g++) {
        const float *xg = x + 64 * g;
        __m512 vmax = _mm512_setzero_ps();
        for (int k = 0; k < 64; k += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
        const float amax = _mm512_reduce_max_ps(vmax);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __mmask64 m = 0;
        for (int k = 0; k < 64; k += 16) { /* cvtps rounds to nearest even, as lrintf */
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xg + k), _mm512_set1_ps(inv));
            const __m512i q = _mm512_cvtps_epi32(v);
            _mm_storeu_si128((__m128i *)(xa + 64 * g + k),
                             _mm512_cvtepi32_epi8(_mm512_abs_epi32(q)));
            m |= (__mmask64)_mm512_cmplt_epi32_mask(q, _mm512_setzero_si512()) << k;
        }
        xm[g] = m;
        sx[g] = amax / 127.0f;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n4 = 0; n4 < N / 4; n4++) rows_dot(w, scale, xa, xm, sx, y, 4 * n4, K, 4);
    for (int64_t n = N / 4 * 4; n < N; n++) rows_dot(w, scale, xa, xm, sx, y, n, K, 1);
    free(xa);
    free(xm);
    free(sx);
}

#else

int int8_gemv_simd(void) { return 0; }

void int8_gemv(const int8_t *w, const float *scale, const float *x, float *y, int64_t N,
               int64_t K, int threads) {
    (void)w; (void)scale; (void)x; (void)y; (void)N; (void)K; (void)threads;
}

#endif
