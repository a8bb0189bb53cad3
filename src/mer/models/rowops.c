/* A decode layer's small bfloat16 operations, one call each instead of a chain of PyTorch ops.
 *
 * Between its matrix multiplications a decode token runs norms, the rotary embedding and
 * attention over a short cache: a few microseconds of arithmetic each, but PyTorch spends
 * 30-50 us on every op of such a chain once the weights have swept the caches. Here:
 *
 *   rms_norm_bf16  y = w * bf16(x * rsqrt(mean(x^2) + eps)), per row, in float32: the
 *                  reference formula's roundings (its sum may be ordered otherwise).
 *   rope_bf16      y = bf16(x * cos) + bf16(roll(x, D/2) * sin) rounded, per head: bit for
 *                  bit the PyTorch formula of `apply_rotary` (sin's first half negated).
 *   attend_one_bf16  one query's GQA attention over S cached keys and values, in float32,
 *                  with an optional mask and per-head sink logits (gpt-oss).
 *   attend_decode_bf16  a lone decode token's attention from its q, k, v projections:
 *                  the QK norms, the rotary embedding, its k and v into the cache and
 *                  attend_one_bf16, in one call (the steps' own bits).
 *   route_bf16     the router: logits rounded to bf16 (as F.linear's output is), softmax in
 *                  float32, the top k (largest first, the lower id among equals), their
 *                  weights renormalised if asked.
 *   argmax_f32     torch.argmax of a float32 vector (a NaN counts as the largest).
 *   decode_attention_bf16  a lone decode token through a layer's attention half: norm, the
 *                  fused q, k, v projection, attend_decode_bf16, o, the residual, the FFN
 *                  norm and the router, in one call (each step the bits of its own call).
 *
 * Every function computes each row (or head) alone, so its result never depends on how
 * many rows share the call. Only the AVX512 build computes: rowops_simd() says which.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; finite inputs */
    union { float f; uint32_t u; } c = {.f = f};
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* One head: o = rope(x), o and x apart. */
static inline void rope_row(const uint16_t *xr, const uint16_t *c, const uint16_t *s,
                            uint16_t *o, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) {
        const float a = round_bf16(bf16_to_f32(xr[i]) * bf16_to_f32(c[i]));
        const float r = bf16_to_f32(xr[i < half ? i + half : i - half]);
        o[i] = f32_to_bf16(a + round_bf16(r * bf16_to_f32(s[i])));
    }
}

void rope_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out,
               int64_t T, int64_t heads, int64_t D) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < heads; h++)
            rope_row(x + (t * heads + h) * D, cos + t * D, sin + t * D,
                     out + (t * heads + h) * D, D);
}

#ifdef __AVX512F__
#include <immintrin.h>

int rowops_simd(void) { return 512; }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* One row: o = rms_norm(x) * w. */
static inline void norm_row(const uint16_t *xr, const uint16_t *w, uint16_t *o, int64_t n,
                            float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = load_bf16(xr + i, tail(n - i));
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        o[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(xr[i]) * scale));
}

void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows,
                   int64_t n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * n, w, out + r * n, n, eps);
}

/* e^x for x <= 0 to float32 rounding (a degree-6 polynomial on [-ln2/2, ln2/2], scaled by 2^n);
 * -inf gives 0. */
static inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-103.0f);
    const __mmask16 dead = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(lo, x); /* a NaN x stays NaN (max returns its second operand then) */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~dead, _mm512_scalef_ps(p, n));
}

#ifndef KV_AHEAD
#define KV_AHEAD 16
#endif
/* Ask the cache for the row KV_AHEAD rows after `row` (n values, rows `stride` apart): a head's
 * keys and values lie a row of every head apart, and a long cache read cold from RAM kept
 * attention waiting on each row in turn. */
static inline void rows_ahead(const uint16_t *row, int64_t stride, int64_t n) {
    const char *p = (const char *)(row + KV_AHEAD * stride);
    for (int64_t b = 0; b < n * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

/* q [Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] (bf16, contiguous); allowed [S] or NULL; sinks [Hq]
 * float or NULL; scores: float scratch [Hq, S]; out [Hq, Dv] bf16. D, Dv <= 512.
 *
 * Work goes by key-value head, each key and value row read and widened once for all the
 * query heads that share it (split between threads when there are fewer kv heads). */
void attend_one_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                     const uint8_t *allowed, const float *sinks, float scale, float *scores,
                     uint16_t *out, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t Dv,
                     int threads) {
    const int64_t group = Hq / Hkv;
    const int64_t split = Hkv >= threads ? 1 : (threads + Hkv - 1) / Hkv;
    const int64_t per = (group + split - 1) / split;
    const int64_t nd = (D + 15) / 16, nv = (Dv + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t u = 0; u < Hkv * split; u++) {
        const int64_t kvh = u / split, h0 = kvh * group + (u % split) * per;
        const int64_t h1 = h0 + per < (kvh + 1) * group ? h0 + per : (kvh + 1) * group;
        if (h0 >= h1) continue;
        const int64_t G = h1 - h0;
        float qf[64 * 512] __attribute__((aligned(64)));
        float best[64], total[64];
        if (G > 64) continue; /* never: the caller caps the group */
        for (int64_t g = 0; g < G; g++) {
            for (int64_t j = 0; j < nd; j++)
                _mm512_store_ps(qf + g * 16 * nd + 16 * j,
                                load_bf16(q + (h0 + g) * D + 16 * j, tail(D - 16 * j)));
            best[g] = sinks ? sinks[h0 + g] : -INFINITY;
        }
        for (int64_t s = 0; s < S; s++) {
            if (allowed && !allowed[s]) {
                for (int64_t g = 0; g < G; g++) scores[(h0 + g) * S + s] = -INFINITY;
                continue;
            }
            const uint16_t *kr = k + (s * Hkv + kvh) * D;
            rows_ahead(kr, Hkv * D, D);
            __m512 kv[32];
            for (int64_t j = 0; j < nd; j++) kv[j] = load_bf16(kr + 16 * j, tail(D - 16 * j));
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qf + g * 16 * nd;
                __m512 acc = _mm512_mul_ps(kv[0], _mm512_load_ps(qg));
                for (int64_t j = 1; j < nd; j++)
                    acc = _mm512_fmadd_ps(kv[j], _mm512_load_ps(qg + 16 * j), acc);
                const float sc = _mm512_reduce_add_ps(acc) * scale;
                scores[(h0 + g) * S + s] = sc;
                best[g] = sc > best[g] ? sc : best[g];
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *sc = scores + (h0 + g) * S;
            const __m512 top = _mm512_set1_ps(best[g]);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t s = 0; s < S; s += 16) {
                const __mmask16 m = tail(S - s);
                const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + s), top));
                _mm512_mask_storeu_ps(sc + s, m, e);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
            }
            total[g] = _mm512_reduce_add_ps(sum) + (sinks ? expf(sinks[h0 + g] - best[g]) : 0.0f);
        }
        float *acc = qf; /* the queries are done with: G x Dv float sums */
        for (int64_t i = 0; i < G * 16 * nv; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
        for (int64_t s = 0; s < S; s++) {
            const uint16_t *vr = v + (s * Hkv + kvh) * Dv;
            rows_ahead(vr, Hkv * Dv, Dv);
            __m512 vv[32];
            for (int64_t j = 0; j < nv; j++) vv[j] = load_bf16(vr + 16 * j, tail(Dv - 16 * j));
            for (int64_t g = 0; g < G; g++) {
                const float p = scores[(h0 + g) * S + s];
                if (p == 0.0f) continue;
                const __m512 pv = _mm512_set1_ps(p);
                float *ag = acc + g * 16 * nv;
                for (int64_t j = 0; j < nv; j++)
                    _mm512_store_ps(ag + 16 * j,
                                    _mm512_fmadd_ps(pv, vv[j], _mm512_load_ps(ag + 16 * j)));
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const float inv = 1.0f / total[g];
            for (int64_t i = 0; i < Dv; i++)
                out[(h0 + g) * Dv + i] = f32_to_bf16(acc[g * 16 * nv + i] * inv);
        }
    }
}

/* A lone decode token's attention from its projections on: q [Hq, D], k [Hkv, D],
 * v [Hkv, Dv]; each head of q and k RMS-normed by qn, kn [D] where given (NULL: not), both
 * rotated by the token's cos, sin [D]; k and v written at row `pos` of the layer's cache
 * kc [cap, Hkv, D], vc [cap, Hkv, Dv]; then q against the cache's rows 0..pos as
 * attend_one_bf16. Each step is the one its own call makes, so the bits are those of
 * rms_norm_bf16, rope_bf16, the cache copy and attend_one_bf16 in turn. qr: bf16 scratch
 * [Hq, D] for the rotated queries. */
void attend_decode_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                        const uint16_t *qn, const uint16_t *kn, float eps, const uint16_t *cos,
                        const uint16_t *sin, uint16_t *kc, uint16_t *vc, int64_t pos,
                        const uint8_t *allowed, const float *sinks, float scale, uint16_t *qr,
                        float *scores, uint16_t *out, int64_t Hq, int64_t Hkv, int64_t D,
                        int64_t Dv, int threads) {
    uint16_t normed[512];
    for (int64_t h = 0; h < Hq + Hkv; h++) {
        const int is_q = h < Hq;
        const uint16_t *src = is_q ? q + h * D : k + (h - Hq) * D;
        const uint16_t *w = is_q ? qn : kn;
        if (w) {
            norm_row(src, w, normed, D, eps);
            src = normed;
        }
        rope_row(src, cos, sin, is_q ? qr + h * D : kc + (pos * Hkv + h - Hq) * D, D);
    }
    for (int64_t i = 0; i < Hkv * Dv; i++) vc[pos * Hkv * Dv + i] = v[i];
    attend_one_bf16(qr, kc, vc, allowed, sinks, scale, scores, out, Hq, Hkv, pos + 1, D, Dv,
                    threads);
}

/* logits: float scratch [T, E]. The dot products are shared out by (row, expert), so one
 * token's router still uses every thread; each dot is one thread's, in one order. */
void route_bf16(const uint16_t *x, const uint16_t *w, float *logits, float *weights,
                int64_t *ids, int64_t T, int64_t E, int64_t H, int64_t k, int renormalise,
                int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t te = 0; te < T * E; te++) {
            const uint16_t *xr = x + (te / E) * H, *wr = w + (te % E) * H;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < H; i += 16) {
                const __mmask16 m = tail(H - i);
                acc = _mm512_fmadd_ps(load_bf16(xr + i, m), load_bf16(wr + i, m), acc);
            }
            logits[te] = round_bf16(_mm512_reduce_add_ps(acc));
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float *p = logits + t * E;
            float top = -INFINITY;
            for (int64_t e = 0; e < E; e++) top = p[e] > top ? p[e] : top;
            float sum = 0.0f;
            for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - top));
            for (int64_t e = 0; e < E; e++) p[e] /= sum;
            float kept = 0.0f;
            uint8_t taken[E];
            for (int64_t e = 0; e < E; e++) taken[e] = 0;
            for (int64_t j = 0; j < k; j++) { /* NaN counts as the largest, as in torch.topk */
                int64_t best = -1;
                for (int64_t e = 0; e < E; e++)
                    if (!taken[e] && (best < 0 || p[e] > p[best] || (isnan(p[e]) && !isnan(p[best]))))
                        best = e;
                taken[best] = 1;
                ids[t * k + j] = best;
                weights[t * k + j] = p[best];
                kept += p[best];
            }
            if (renormalise)
                for (int64_t j = 0; j < k; j++) weights[t * k + j] /= kept;
        }
    }
}

/* The index of the largest of x[0..n) (the first among equals), or of the first NaN: what
 * torch.argmax gives (it takes a NaN for the largest), at vector speed (its reduction over a
 * 151936-entry vocabulary took ~100 us, most of a greedy step's sampling). n < 2^31. */
int64_t argmax_f32(const float *x, int64_t n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 best = ninf;
    __m512i at = idx;
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_mask_loadu_ps(ninf, tail(n - i), x + i);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nan) return i + __builtin_ctz(nan);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, v);
        at = _mm512_mask_mov_epi32(at, gt, idx);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    /* lanes never raised hold their own first index, which is where a -inf maximum lies */
    return _mm512_mask_reduce_min_epi32(tops, at);
}

/* A dense linear of one bfloat16 row by the int4 library's int8-activation kernel
 * (int4_linear_i8_bf16, handed over as a pointer: that library is built apart, once per
 * int4 scheme). */
typedef void (*linear_i8_fn)(const void *packed, const void *scales, const uint16_t *x,
                             float *xf, int8_t *xq, float *sx, float *xs, float *y,
                             uint16_t *out, int64_t T, int64_t N, int64_t K, int64_t G,
                             int threads);

/* What one layer's decode_attention_bf16 reads, set once per layer and thread (mirrored by
 * mer.models.decode_layer.DecodeLayer); the scratch is that thread's. */
typedef struct {
    const uint16_t *attn_norm, *ffn_norm, *q_norm, *k_norm, *router; /* norms, router: NULL = none */
    const void *qkv_packed, *qkv_scales, *o_packed, *o_scales;
    linear_i8_fn qkv_linear, o_linear;
    int64_t qkv_group, o_group, qkv_threads, o_threads, route_threads;
    int64_t H, Hq, Hkv, D, Dv, E, top_k, renormalise;
    float eps, scale;
    float *xf, *sx, *xs, *y, *logits;
    int8_t *xq;
    uint16_t *qkv, *qr, *attn, *o;
} decode_layer;

/* A lone decode token through the attention half of a layer: h = rms_norm(x); q, k, v from
 * one fused projection; attend_decode_bf16; x += o(attention) in place; h = rms_norm(x) by
 * the FFN norm; and, where the layer routes, the router's top k of h. Each step is the call
 * the Python path makes for it, so the bits are those. */
void decode_attention_bf16(const decode_layer *L, uint16_t *x, uint16_t *h,
                           const uint16_t *cos, const uint16_t *sin, uint16_t *kc,
                           uint16_t *vc, int64_t pos, const uint8_t *allowed, float *scores,
                           float *weights, int64_t *ids, int attn_threads) {
    const int64_t H = L->H, nq = L->Hq * L->D, nk = L->Hkv * L->D, nv = L->Hkv * L->Dv;
    norm_row(x, L->attn_norm, h, H, L->eps);
    L->qkv_linear(L->qkv_packed, L->qkv_scales, h, L->xf, L->xq, L->sx, L->xs, L->y, L->qkv, 1,
                  nq + nk + nv, H, L->qkv_group, (int)L->qkv_threads);
    attend_decode_bf16(L->qkv, L->qkv + nq, L->qkv + nq + nk, L->q_norm, L->k_norm, L->eps, cos,
                       sin, kc, vc, pos, allowed, NULL, L->scale, L->qr, scores, L->attn, L->Hq,
                       L->Hkv, L->D, L->Dv, attn_threads);
    L->o_linear(L->o_packed, L->o_scales, L->attn, L->xf, L->xq, L->sx, L->xs, L->y, L->o, 1, H,
                L->Hq * L->Dv, L->o_group, (int)L->o_threads);
    for (int64_t i = 0; i < H; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(L->o[i]));
    norm_row(x, L->ffn_norm, h, H, L->eps);
    if (L->router && weights)
        route_bf16(h, L->router, L->logits, weights, ids, 1, L->E, H, L->top_k,
                   (int)L->renormalise, (int)L->route_threads);
}

#else /* rowops_simd() 0: the library is never used (so attend_decode_bf16, argmax_f32 and
       * decode_attention_bf16 need no stub) */

int rowops_simd(void) { return 0; }

void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows,
                   int64_t n, float eps, int threads) {
    (void)x; (void)w; (void)out; (void)rows; (void)n; (void)eps; (void)threads;
}

void attend_one_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                     const uint8_t *allowed, const float *sinks, float scale, float *scores,
                     uint16_t *out, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t Dv,
                     int threads) {
    (void)q; (void)k; (void)v; (void)allowed; (void)sinks; (void)scale; (void)scores;
    (void)out; (void)Hq; (void)Hkv; (void)S; (void)D; (void)Dv; (void)threads;
}

void route_bf16(const uint16_t *x, const uint16_t *w, float *logits, float *weights,
                int64_t *ids, int64_t T, int64_t E, int64_t H, int64_t k, int renormalise,
                int threads) {
    (void)x; (void)w; (void)logits; (void)weights; (void)ids; (void)T; (void)E; (void)H;
    (void)k; (void)renormalise; (void)threads;
}

#endif
