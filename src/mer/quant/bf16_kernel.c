/* One token through a bfloat16 weight: y [N] = W [N, K] @ x [K], both bfloat16, float32 out.
 *
 * Decode multiplies every dense matrix (attention projections, output head) by one token,
 * which is bound by reading W once; PyTorch's bf16 path reads it at about half the rate a
 * float32 GEMV reaches on an AVX512_BF16 CPU (it converts on the way). Here each row is a
 * run of vdpbf16ps over contiguous K (32 products an instruction, float32 sums), four rows
 * at a time for independent chains, reduced at the row's end; threads take contiguous row
 * ranges so each streams its part of W. K must be a multiple of 32. Only the AVX512_BF16
 * build computes anything: bf16_gemv_simd() says which this is.
 */
#include <stdint.h>

#ifdef __AVX512BF16__
#include <immintrin.h>

int bf16_gemv_simd(void) { return 512; }

static inline float row_dot(const uint16_t *w, const uint16_t *x, int64_t K) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                               (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
    return _mm512_reduce_add_ps(acc);
}

void bf16_gemv(const uint16_t *w, const uint16_t *x, float *y, int64_t N, int64_t K,
               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N / 4; n++) {
        const uint16_t *w0 = w + 4 * n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 32) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w0 + k)), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w0 + K + k)), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(w0 + 2 * K + k)), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(w0 + 3 * K + k)), xv);
        }
        y[4 * n] = _mm512_reduce_add_ps(a0);
        y[4 * n + 1] = _mm512_reduce_add_ps(a1);
        y[4 * n + 2] = _mm512_reduce_add_ps(a2);
        y[4 * n + 3] = _mm512_reduce_add_ps(a3);
    }
    for (int64_t n = N / 4 * 4; n < N; n++) y[n] = row_dot(w + n * K, x, K);
}

#else

int bf16_gemv_simd(void) { return 0; }

void bf16_gemv(const uint16_t *w, const uint16_t *x, float *y, int64_t N, int64_t K,
               int threads) {
    (void)w; (void)x; (void)y; (void)N; (void)K; (void)threads;
}

#endif
