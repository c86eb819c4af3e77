/* The hot loops of lmforge.infer._decode, compiled twice: once for the baseline
 * x86-64 (or any other) target and once with AVX2+FMA, picked at run time.
 * Included by _decode.c with SUF(name) and ATTR defined.
 *
 * v8 is GCC's 8 x float vector: one ymm register with AVX2, two xmm without. */

/* y[b, o] = sum_i x[b, i] W[o, i] (+ bias[o]) for rows o in [r0, r1) and b in [0, B).
 * Every (o, b) sums into one vector accumulator in the same order, whatever B and the
 * row split are: a row's result does not depend on the batch it is in. */
ATTR static void SUF(matmul_rows)(const float *restrict W, const float *restrict bias, const float *restrict X,
                                  float *restrict Y, int B, int I, int O, int r0, int r1) {
    const int I8 = I & ~7;
    int o = r0;
    for (; o + 4 <= r1; o += 4) {
        const float *w0 = W + (size_t)o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        int b = 0;
        /* several tokens: compute-bound per block of rows, so fetch the next block from memory
         * while the first pair of tokens works on this one */
        const float *nx = o + 8 <= r1 ? w3 + I : NULL;
        for (; b + 2 <= B; b += 2) {
            const float *x0 = X + (size_t)b * I, *x1 = x0 + I;
            v8 a00 = {0}, a10 = {0}, a20 = {0}, a30 = {0}, a01 = {0}, a11 = {0}, a21 = {0}, a31 = {0};
            for (int i = 0; i < I8; i += 8) {
                if (b == 0 && nx && (i & 15) == 0) {
                    __builtin_prefetch(nx + i);
                    __builtin_prefetch(nx + I + i);
                    __builtin_prefetch(nx + 2 * I + i);
                    __builtin_prefetch(nx + 3 * I + i);
                }
                v8 u0 = LOAD(w0 + i), u1 = LOAD(w1 + i), u2 = LOAD(w2 + i), u3 = LOAD(w3 + i);
                v8 p = LOAD(x0 + i), q = LOAD(x1 + i);
                a00 += u0 * p; a10 += u1 * p; a20 += u2 * p; a30 += u3 * p;
                a01 += u0 * q; a11 += u1 * q; a21 += u2 * q; a31 += u3 * q;
            }
            float *y0 = Y + (size_t)b * O + o, *y1 = y0 + O;
            y0[0] = hsum(a00); y0[1] = hsum(a10); y0[2] = hsum(a20); y0[3] = hsum(a30);
            y1[0] = hsum(a01); y1[1] = hsum(a11); y1[2] = hsum(a21); y1[3] = hsum(a31);
            for (int i = I8; i < I; i++) {
                y0[0] += w0[i] * x0[i]; y0[1] += w1[i] * x0[i]; y0[2] += w2[i] * x0[i]; y0[3] += w3[i] * x0[i];
                y1[0] += w0[i] * x1[i]; y1[1] += w1[i] * x1[i]; y1[2] += w2[i] * x1[i]; y1[3] += w3[i] * x1[i];
            }
        }
        for (; b < B; b++) {
            const float *x0 = X + (size_t)b * I;
            v8 a00 = {0}, a10 = {0}, a20 = {0}, a30 = {0};
            for (int i = 0; i < I8; i += 8) {
                v8 p = LOAD(x0 + i);
                a00 += LOAD(w0 + i) * p; a10 += LOAD(w1 + i) * p; a20 += LOAD(w2 + i) * p; a30 += LOAD(w3 + i) * p;
            }
            float *y0 = Y + (size_t)b * O + o;
            y0[0] = hsum(a00); y0[1] = hsum(a10); y0[2] = hsum(a20); y0[3] = hsum(a30);
            for (int i = I8; i < I; i++) {
                y0[0] += w0[i] * x0[i]; y0[1] += w1[i] * x0[i]; y0[2] += w2[i] * x0[i]; y0[3] += w3[i] * x0[i];
            }
        }
    }
    for (; o < r1; o++) { /* the last O % 4 rows */
        const float *w0 = W + (size_t)o * I;
        for (int b = 0; b < B; b++) {
            const float *x0 = X + (size_t)b * I;
            v8 a = {0};
            for (int i = 0; i < I8; i += 8) a += LOAD(w0 + i) * LOAD(x0 + i);
            float s = hsum(a);
            for (int i = I8; i < I; i++) s += w0[i] * x0[i];
            Y[(size_t)b * O + o] = s;
        }
    }
    if (bias)
        for (int b = 0; b < B; b++)
            for (int o2 = r0; o2 < r1; o2++) Y[(size_t)b * O + o2] += bias[o2];
}

/* B = 1: rows one after another (memory read strictly in order, which the prefetchers
 * follow best when rows are short), each summed exactly as matmul_rows sums it. */
ATTR static void SUF(matvec_rows)(const float *restrict W, const float *restrict bias, const float *restrict x,
                                  float *restrict y, int I, int r0, int r1) {
    const int I8 = I & ~7;
    for (int o = r0; o < r1; o++) {
        const float *w0 = W + (size_t)o * I;
        v8 a = {0};
        for (int i = 0; i < I8; i += 8) a += LOAD(w0 + i) * LOAD(x + i);
        float s = hsum(a);
        for (int i = I8; i < I; i++) s += w0[i] * x[i];
        y[o] = bias ? s + bias[o] : s;
    }
}

/* One query head over keys lo..hi (inclusive) of one sequence: softmax(q k^T * scale) v.
 * key(t) and value(t) live at kbase/vbase + table[t / bs] * bstride + (t % bs) * D. */
ATTR static void SUF(attend)(const float *restrict q, const float *kbase, const float *vbase, const int32_t *table,
                             long bstride, int bs, int D, int lo, int hi, float scale, float *restrict scores,
                             float *restrict out) {
    const int D8 = D & ~7;
    float mx = -INFINITY;
    for (int t = lo; t <= hi; t++) {
        const float *k = kbase + (size_t)table[t / bs] * bstride + (size_t)(t % bs) * D;
        v8 a = {0};
        for (int i = 0; i < D8; i += 8) a += LOAD(q + i) * LOAD(k + i);
        float s = hsum(a);
        for (int i = D8; i < D; i++) s += q[i] * k[i];
        s *= scale;
        scores[t - lo] = s;
        mx = s > mx ? s : mx;
    }
    int n = hi - lo + 1, n8 = n & ~7;
    v8 vs = {0};
    v8 vmx = {mx, mx, mx, mx, mx, mx, mx, mx};
    for (int j = 0; j < n8; j += 8) {
        v8 e = vexp(LOAD(scores + j) - vmx);
        STORE(scores + j, e);
        vs += e;
    }
    float sum = hsum(vs);
    for (int j = n8; j < n; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < D; i++) out[i] = 0.0f;
    for (int t = lo; t <= hi; t++) {
        const float *v = vbase + (size_t)table[t / bs] * bstride + (size_t)(t % bs) * D;
        float p = scores[t - lo] * inv;
        v8 pv = {p, p, p, p, p, p, p, p};
        for (int i = 0; i < D8; i += 8) STORE(out + i, LOAD(out + i) + pv * LOAD(v + i));
        for (int i = D8; i < D; i++) out[i] += p * v[i];
    }
}

/* SwiGLU on one row: o[i] = silu(g[i]) * u[i] (o may alias g) */
ATTR static void SUF(swiglu)(const float *g, const float *u, float *o, int n) {
    int n8 = n & ~7;
    const v8 one = {1, 1, 1, 1, 1, 1, 1, 1};
    for (int i = 0; i < n8; i += 8) {
        v8 x = LOAD(g + i);
        STORE(o + i, x / (one + vexp(-x)) * LOAD(u + i));
    }
    for (int i = n8; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ---- quantized weights: integer codes dequantized in registers, fp32 activations ----
 * One row against one activation row. A row is G-column groups with one scale each (G = I:
 * one scale per row); a group's products sum into two vector partials (8 lanes each, in a
 * fixed pattern), which are added and scaled into the row's vector accumulator:
 *     y = lanes of sum_g s_g * (sum_{i in g} q_i x_i), the lanes summed as hsum sums them.
 * Every (row, activation row) pair runs this one function whatever the batch or the row split,
 * so a result does not depend on either. */

/* 8 codes widened to int32 lanes (one vpmovsxbd / vpmovzxbd with AVX2) */
ATTR static inline __attribute__((always_inline)) v8i SUF(widen_s8)(const int8_t *p) {
#if KERN_AVX2
    return (v8i)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8i v = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    return v;
#endif
}
ATTR static inline __attribute__((always_inline)) v8i SUF(widen_u8)(const uint8_t *p) {
#if KERN_AVX2
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8i v = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    return v;
#endif
}

/* int8 codes q (signed): w = q * s. I and G multiples of 8. A group's products go into two partials,
 * p0 over columns 32k + 0..7 and 16..23, p1 over 8..15 and 24..31 (a tail of 8: p0), summed p0 + p1. */
ATTR static float SUF(dot_i8)(const int8_t *restrict w, const float *restrict s, const float *restrict x, int I,
                              int G) {
    v8 acc = {0};
    if (G == 32) { /* the common case (Q8_0's layout): one straight step per group */
        for (int g0 = 0; g0 < I; g0 += 32, s++) {
            const int8_t *wp = w + g0;
            const float *xp = x + g0;
            v8 a = __builtin_convertvector(SUF(widen_s8)(wp), v8) * LOAD(xp);
            v8 b = __builtin_convertvector(SUF(widen_s8)(wp + 8), v8) * LOAD(xp + 8);
            a += __builtin_convertvector(SUF(widen_s8)(wp + 16), v8) * LOAD(xp + 16);
            b += __builtin_convertvector(SUF(widen_s8)(wp + 24), v8) * LOAD(xp + 24);
            v8 sv = {*s, *s, *s, *s, *s, *s, *s, *s};
            acc += (a + b) * sv;
        }
        return hsum(acc);
    }
    for (int g0 = 0; g0 < I; g0 += G, s++) {
        v8 a = {0}, b = {0};
        const int8_t *wp = w + g0, *we = wp + G;
        const float *xp = x + g0;
        for (; wp + 16 <= we; wp += 16, xp += 16) {
            a += __builtin_convertvector(SUF(widen_s8)(wp), v8) * LOAD(xp);
            b += __builtin_convertvector(SUF(widen_s8)(wp + 8), v8) * LOAD(xp + 8);
        }
        if (wp < we) a += __builtin_convertvector(SUF(widen_s8)(wp), v8) * LOAD(xp);
        v8 sv = {*s, *s, *s, *s, *s, *s, *s, *s};
        acc += (a + b) * sv;
    }
    return hsum(acc);
}

/* codes u of <= 4 bits, two per byte (column 2j in the low nibble, 2j+1 in the high one): w = (u - z) * s,
 * z = zeros[g] (asymmetric) or zc (symmetric: q = u - zc, zc = 8 at 4 bits). x is the activation row with
 * each 16 columns reordered evens first (x0 x2 .. x14 x1 x3 .. x15), so that a byte's low nibble meets
 * lane j of the first half and its high nibble lane j of the second. The zero point comes out of the sum:
 * sum_i (u_i - z) x_i = sum_i u_i x_i - z sum_i x_i per lane, xs holding the group's lane sums of x (8 per
 * group; see lane_sums). A group's products go into two partials (low nibbles, high nibbles), summed.
 * I and G multiples of 32. */
#define Q4_GROUP(ZK)                                                                   \
    {                                                                                  \
        v8 a = {0}, b = {0};                                                           \
        for (const uint8_t *we = wp + G / 2; wp < we; wp += 16, xp += 32) {            \
            v8i u = SUF(widen_u8)(wp), v = SUF(widen_u8)(wp + 8);                      \
            a += __builtin_convertvector(u & lo4, v8) * LOAD(xp);                      \
            b += __builtin_convertvector(u >> 4, v8) * LOAD(xp + 8);                   \
            a += __builtin_convertvector(v & lo4, v8) * LOAD(xp + 16);                 \
            b += __builtin_convertvector(v >> 4, v8) * LOAD(xp + 24);                  \
        }                                                                              \
        float zk = (ZK);                                                               \
        v8 zv = {zk, zk, zk, zk, zk, zk, zk, zk}, sv = {*s, *s, *s, *s, *s, *s, *s, *s}; \
        acc += ((a + b) - zv * LOAD(xs)) * sv;                                         \
    }
#define Q4_GROUP32(ZK)                                                                 \
    {                                                                                  \
        v8i u = SUF(widen_u8)(wp), v = SUF(widen_u8)(wp + 8);                          \
        v8 a = __builtin_convertvector(u & lo4, v8) * LOAD(xp);                        \
        v8 b = __builtin_convertvector(u >> 4, v8) * LOAD(xp + 8);                     \
        a += __builtin_convertvector(v & lo4, v8) * LOAD(xp + 16);                     \
        b += __builtin_convertvector(v >> 4, v8) * LOAD(xp + 24);                      \
        float zk = (ZK);                                                               \
        v8 zv = {zk, zk, zk, zk, zk, zk, zk, zk}, sv = {*s, *s, *s, *s, *s, *s, *s, *s}; \
        acc += ((a + b) - zv * LOAD(xs)) * sv;                                         \
        wp += 16, xp += 32;                                                            \
    }
ATTR static float SUF(dot_q4)(const uint8_t *restrict w, const float *restrict s, const float *restrict z, float zc,
                              const float *restrict x, const float *restrict xs, int I, int G) {
    v8 acc = {0};
    const v8i lo4 = {15, 15, 15, 15, 15, 15, 15, 15};
    const uint8_t *wp = w;
    const float *xp = x;
    const int ng = I / G;
    if (G == 32) { /* the common case (Q4_0's layout) */
        if (z)
            for (int k = 0; k < ng; k++, s++, xs += 8) Q4_GROUP32(z[k])
        else
            for (int k = 0; k < ng; k++, s++, xs += 8) Q4_GROUP32(zc)
    } else {
        if (z)
            for (int k = 0; k < ng; k++, s++, xs += 8) Q4_GROUP(z[k])
        else
            for (int k = 0; k < ng; k++, s++, xs += 8) Q4_GROUP(zc)
    }
    return hsum(acc);
}
#undef Q4_GROUP
#undef Q4_GROUP32

/* the lane sums of x for dot_q4: 8 per group of G columns (x already reordered) */
ATTR static void SUF(lane_sums)(const float *restrict x, float *restrict xs, int I, int G) {
    for (int g0 = 0; g0 < I; g0 += G, xs += 8) {
        v8 a = {0}, b = {0}, c = {0}, d = {0};
        for (int i = g0; i < g0 + G; i += 32) {
            a += LOAD(x + i);
            b += LOAD(x + i + 8);
            c += LOAD(x + i + 16);
            d += LOAD(x + i + 24);
        }
        STORE(xs, (a + b) + (c + d));
    }
}

#ifndef PF_ROWS
#define PF_ROWS 4
#endif
/* rows o in [r0, r1) of a quantized linear for activation rows b in [0, B) (X already gathered and,
 * for 4-bit, reordered: see dot_q4); a row's weights stay in L1 across the activation rows */
ATTR static void SUF(qmat_rows)(int kind, const void *W, const float *S, const float *Z, float zc, const float *bias,
                                const float *X, const float *XS, float *Y, int B, int I, int O, int G, int r0, int r1) {
    const int ng = I / G;
    const size_t rowb = kind == 1 ? (size_t)I : (size_t)I / 2; /* bytes of codes per row */
    for (int o = r0; o < r1; o++) {
        const float *s = S + (size_t)o * ng, *z = Z ? Z + (size_t)o * ng : NULL;
        float bo = bias ? bias[o] : 0.0f;
        if (o + PF_ROWS < r1) { /* the codes and scales of a row a few ahead: more misses in flight */
            const char *pw = (const char *)W + (size_t)(o + PF_ROWS) * rowb;
            for (size_t c = 0; c < rowb; c += 64) __builtin_prefetch(pw + c);
            const char *ps = (const char *)(S + (size_t)(o + PF_ROWS) * ng);
            for (size_t c = 0; c < (size_t)ng * 4; c += 64) __builtin_prefetch(ps + c);
        }
        if (kind == 1) {
            const int8_t *w = (const int8_t *)W + (size_t)o * I;
            for (int b = 0; b < B; b++) Y[(size_t)b * O + o] = SUF(dot_i8)(w, s, X + (size_t)b * I, I, G) + bo;
        } else {
            const uint8_t *w = (const uint8_t *)W + (size_t)o * (I / 2);
            for (int b = 0; b < B; b++)
                Y[(size_t)b * O + o] = SUF(dot_q4)(w, s, z, zc, X + (size_t)b * I, XS + (size_t)b * (I / G) * 8, I, G) + bo;
        }
    }
}
