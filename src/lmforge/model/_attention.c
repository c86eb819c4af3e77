/* lmforge.model._attention: causal self-attention forward and backward on CPU (float32, AVX2+FMA).
 *
 * For one (batch, head) pair with queries Q, keys K, values V (T x D each) and
 * s = 1/sqrt(D) (or the caller's scale):
 *
 *   forward   S = s Q K^T,  P_ij = exp(S_ij - lse_i) for j <= i (0 above the diagonal),
 *             lse_i = log sum_{j<=i} exp(S_ij),  O = P V
 *   backward  Di = sum_d dO_id O_id,  dP = dO V^T,  dS = P * (dP - Di)
 *             dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO
 *
 * Only O and lse (T floats) are kept for the backward, which recomputes S: memory
 * stays O(T) per row as in FlashAttention. What differs from PyTorch's CPU flash
 * kernel is the shape of the work: every product is a 6 x 16 register tile
 * (12 AVX2 accumulators, one broadcast and two loads per 12 FMAs) run only over
 * the keys a tile of 6 queries can see, so the causal half above the diagonal is
 * skipped to within 16 columns; a row of S is at most T floats, so the softmax
 * is exact in one pass (no online rescaling). The backward walks query blocks
 * of 48 rows so the dK and dV updates are products with 48-long inner loops.
 *
 * Layouts: inputs are (B, H, T, D) views with any batch/head/time strides and unit
 * stride in D; O, dQ, dK and dV are written in (B, T, H, D) order (contiguous), so
 * that the attention output is already the (B, T, H*D) matrix the output
 * projection multiplies and the gradients are the layout the qkv projection's
 * backward wants. D must be a multiple of 16.
 *
 * Masked scores become exact zeros in P; a NaN or inf in a value row still reaches
 * the earlier queries of its own 6-row tile (0 * NaN), so non-finite inputs give
 * NaN outputs a few rows earlier than PyTorch's, never finite ones where it has NaN.
 *
 * The (batch, head) pairs are split over PyTorch's OpenMP threads (`_parallel.h`).
 * Knows nothing about tensors: raw buffers, the GIL released; `model/kernels.py` is
 * the bridge.
 */
#define _GNU_SOURCE
#include "_parallel.h"
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
#else
#define HAVE_X86 0
#endif

#define MB 48 /* query rows per backward block (a multiple of 6) */

static int has_avx2(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#if HAVE_X86

static inline long r16(long n) { return (n + 15) & ~15L; }

/* C[i, 0:16] (+)= alpha sum_p A(i, p) B(p, 0:16) for i < m <= 6, where A(i, p) = a[i ars + p acs] and
 * row p of B starts at b + p ldb. Rows of a short tile reuse the last row's address and are not stored. */
AVX2 static inline void tile6x16(long kc, const float *a, long ars, long acs, const float *b, long ldb, float *c,
                                 long ldc, int m, float alpha, int acc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *a0 = a, *a1 = a + (m > 1 ? 1 : 0) * ars, *a2 = a + (m > 2 ? 2 : m - 1) * ars;
    const float *a3 = a + (m > 3 ? 3 : m - 1) * ars, *a4 = a + (m > 4 ? 4 : m - 1) * ars;
    const float *a5 = a + (m > 5 ? 5 : m - 1) * ars;
    for (long p = 0; p < kc; p++) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), t;
        b += ldb;
        long o = p * acs;
        t = _mm256_broadcast_ss(a0 + o); c00 = _mm256_fmadd_ps(t, b0, c00); c01 = _mm256_fmadd_ps(t, b1, c01);
        t = _mm256_broadcast_ss(a1 + o); c10 = _mm256_fmadd_ps(t, b0, c10); c11 = _mm256_fmadd_ps(t, b1, c11);
        t = _mm256_broadcast_ss(a2 + o); c20 = _mm256_fmadd_ps(t, b0, c20); c21 = _mm256_fmadd_ps(t, b1, c21);
        t = _mm256_broadcast_ss(a3 + o); c30 = _mm256_fmadd_ps(t, b0, c30); c31 = _mm256_fmadd_ps(t, b1, c31);
        t = _mm256_broadcast_ss(a4 + o); c40 = _mm256_fmadd_ps(t, b0, c40); c41 = _mm256_fmadd_ps(t, b1, c41);
        t = _mm256_broadcast_ss(a5 + o); c50 = _mm256_fmadd_ps(t, b0, c50); c51 = _mm256_fmadd_ps(t, b1, c51);
    }
    __m256 al = _mm256_set1_ps(alpha);
#define STORE_ROW(i, x0, x1)                                                   \
    if (i < m) {                                                               \
        float *r = c + (long)i * ldc;                                          \
        __m256 y0 = _mm256_mul_ps(x0, al), y1 = _mm256_mul_ps(x1, al);        \
        if (acc) {                                                             \
            y0 = _mm256_add_ps(y0, _mm256_loadu_ps(r));                        \
            y1 = _mm256_add_ps(y1, _mm256_loadu_ps(r + 8));                    \
        }                                                                      \
        _mm256_storeu_ps(r, y0);                                               \
        _mm256_storeu_ps(r + 8, y1);                                           \
    }
    STORE_ROW(0, c00, c01) STORE_ROW(1, c10, c11) STORE_ROW(2, c20, c21)
    STORE_ROW(3, c30, c31) STORE_ROW(4, c40, c41) STORE_ROW(5, c50, c51)
#undef STORE_ROW
}

/* C[0:m, 0:n] (+)= alpha A B, n a multiple of 16 */
AVX2 static void gemm(long m, long n, long kc, const float *a, long ars, long acs, const float *b, long ldb, float *c,
                      long ldc, float alpha, int acc) {
    for (long i = 0; i < m; i += 6)
        for (long j = 0; j < n; j += 16)
            tile6x16(kc, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, (int)(m - i < 6 ? m - i : 6),
                     alpha, acc);
}

/* exp(x) for x <= 0 (clamped at -80), 8 lanes: x = n ln2 + r, e^r by a degree-6 polynomial */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-80.0f), x); /* this operand order keeps a NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3333519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* lanes j0 + l < n keep x, the rest become 0 */
AVX2 static inline __m256 keep_below(__m256 x, long j0, long n) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i lim = _mm256_set1_epi32((int)n);
    return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, idx)));
}

/* kt[d * ldt + t] = K[t, d] for t < T, 0 for T <= t < ldt */
static void transpose_in(const float *k, long skt, long T, long D, float *kt, long ldt) {
    for (long d = 0; d < D; d++) memset(kt + d * ldt + T, 0, (size_t)(ldt - T) * sizeof(float));
    for (long t0 = 0; t0 < T; t0 += 16)
        for (long d = 0; d < D; d++) {
            long t1 = t0 + 16 < T ? t0 + 16 : T;
            for (long t = t0; t < t1; t++) kt[d * ldt + t] = k[t * skt + d];
        }
}

typedef struct {
    const float *q, *k, *v;
    long sq[3], sk[3], sv[3]; /* batch, head, time strides (elements) */
    long H, T, D;
    float scale;
} attn_in;

/* forward for pairs [p0, p1): o (B, T, H, D), lse (B H, T) */
AVX2 static int fwd_pairs(const attn_in *in, float *o, float *lse, long p0, long p1) {
    long H = in->H, T = in->T, D = in->D, T16 = r16(T), od = H * D;
    float *kt = malloc(sizeof(float) * (size_t)(D * T16)), *s = malloc(sizeof(float) * (size_t)(6 * T16));
    if (!kt || !s) { free(kt); free(s); return -1; }
    for (long pr = p0; pr < p1; pr++) {
        long b = pr / H, h = pr % H;
        const float *q = in->q + b * in->sq[0] + h * in->sq[1], *k = in->k + b * in->sk[0] + h * in->sk[1];
        const float *v = in->v + b * in->sv[0] + h * in->sv[1];
        float *ob = o + b * T * od + h * D, *lb = lse + pr * T;
        transpose_in(k, in->sk[2], T, D, kt, T16);
        for (long i0 = 0; i0 < T; i0 += 6) {
            long m = T - i0 < 6 ? T - i0 : 6, nt = i0 + m; /* the tile's rows see keys [0, nt) */
            gemm(m, r16(nt), D, q + i0 * in->sq[2], in->sq[2], 1, kt, T16, s, T16, in->scale, 0);
            float inv[6];
            for (long r = 0; r < m; r++) {
                float *sr = s + r * T16;
                long n = i0 + r + 1, j;
                __m256 mx = _mm256_set1_ps(-3.0e38f);
                for (j = 0; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + j));
                float mxs[8], mv;
                _mm256_storeu_ps(mxs, mx);
                mv = mxs[0];
                for (int l = 1; l < 8; l++) mv = mxs[l] > mv ? mxs[l] : mv;
                for (; j < n; j++) mv = sr[j] > mv ? sr[j] : mv;
                __m256 acc = _mm256_setzero_ps(), mb = _mm256_set1_ps(mv);
                for (j = 0; j < nt; j += 8) { /* up to nt (a multiple of 8 past it is inside the row) */
                    __m256 e = keep_below(exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mb)), j, n);
                    _mm256_storeu_ps(sr + j, e);
                    acc = _mm256_add_ps(acc, e);
                }
                float as[8], sum = 0.0f;
                _mm256_storeu_ps(as, acc);
                for (int l = 0; l < 8; l++) sum += as[l];
                lb[i0 + r] = mv + logf(sum);
                inv[r] = 1.0f / sum;
            }
            float *orow = ob + i0 * od;
            gemm(m, D, nt, s, T16, 1, v, in->sv[2], orow, od, 1.0f, 0);
            for (long r = 0; r < m; r++) {
                __m256 w = _mm256_set1_ps(inv[r]);
                for (long d = 0; d < D; d += 8)
                    _mm256_storeu_ps(orow + r * od + d, _mm256_mul_ps(w, _mm256_loadu_ps(orow + r * od + d)));
            }
        }
    }
    free(kt);
    free(s);
    return 0;
}

/* backward for pairs [p0, p1): do_ (B, H, T, D) strides sdo; o, dq, dk, dv (B, T, H, D) */
AVX2 static int bwd_pairs(const attn_in *in, const float *o, const float *lse, const float *dout, const long *sdo,
                          float *dq, float *dk, float *dv, long p0, long p1) {
    long H = in->H, T = in->T, D = in->D, T16 = r16(T), od = H * D;
    float *kt = malloc(sizeof(float) * (size_t)(D * T16)), *vt = malloc(sizeof(float) * (size_t)(D * T16));
    float *P = malloc(sizeof(float) * (size_t)(MB * T16)), *dS = malloc(sizeof(float) * (size_t)(MB * T16));
    float *Di = malloc(sizeof(float) * MB);
    if (!kt || !vt || !P || !dS || !Di) { free(kt); free(vt); free(P); free(dS); free(Di); return -1; }
    float s = in->scale;
    for (long pr = p0; pr < p1; pr++) {
        long b = pr / H, h = pr % H;
        const float *q = in->q + b * in->sq[0] + h * in->sq[1], *k = in->k + b * in->sk[0] + h * in->sk[1];
        const float *v = in->v + b * in->sv[0] + h * in->sv[1], *g = dout + b * sdo[0] + h * sdo[1];
        long sqt = in->sq[2], skt = in->sk[2], sgt = sdo[2];
        const float *ob = o + b * T * od + h * D, *lb = lse + pr * T;
        float *dqb = dq + b * T * od + h * D, *dkb = dk + b * T * od + h * D, *dvb = dv + b * T * od + h * D;
        transpose_in(k, skt, T, D, kt, T16);
        transpose_in(v, in->sv[2], T, D, vt, T16);
        for (long t = 0; t < T; t++) {
            memset(dkb + t * od, 0, sizeof(float) * (size_t)D);
            memset(dvb + t * od, 0, sizeof(float) * (size_t)D);
        }
        for (long r0 = 0; r0 < T; r0 += MB) {
            long rows = T - r0 < MB ? T - r0 : MB, nb = r0 + rows, nb16 = r16(nb);
            for (long r = 0; r < rows; r++) {
                const float *gr = g + (r0 + r) * sgt, *orow = ob + (r0 + r) * od;
                __m256 a = _mm256_setzero_ps();
                for (long d = 0; d < D; d += 8)
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(gr + d), _mm256_loadu_ps(orow + d), a);
                float as[8], sum = 0.0f;
                _mm256_storeu_ps(as, a);
                for (int l = 0; l < 8; l++) sum += as[l];
                Di[r] = sum;
            }
            for (long t0 = 0; t0 < rows; t0 += 6) {
                long i0 = r0 + t0, m = rows - t0 < 6 ? rows - t0 : 6, nt = i0 + m;
                float *Pt = P + t0 * T16, *dSt = dS + t0 * T16;
                gemm(m, r16(nt), D, q + i0 * sqt, sqt, 1, kt, T16, Pt, T16, s, 0);  /* S */
                gemm(m, r16(nt), D, g + i0 * sgt, sgt, 1, vt, T16, dSt, T16, 1.0f, 0); /* dP */
                for (long r = 0; r < m; r++) {
                    float *pr_ = Pt + r * T16, *dr = dSt + r * T16;
                    long n = i0 + r + 1, j;
                    __m256 l = _mm256_set1_ps(lb[i0 + r]), di = _mm256_set1_ps(Di[t0 + r]);
                    for (j = 0; j < r16(nt); j += 8) {
                        __m256 p = keep_below(exp8(_mm256_sub_ps(_mm256_loadu_ps(pr_ + j), l)), j, n);
                        _mm256_storeu_ps(pr_ + j, p);
                        _mm256_storeu_ps(dr + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dr + j), di)));
                    }
                    for (; j < nb16; j += 8) { /* the block's later rows see further: zeros here */
                        _mm256_storeu_ps(pr_ + j, _mm256_setzero_ps());
                        _mm256_storeu_ps(dr + j, _mm256_setzero_ps());
                    }
                }
                gemm(m, D, nt, dSt, T16, 1, k, skt, dqb + i0 * od, od, s, 0); /* dQ = s dS K */
            }
            /* dK[j] += s sum_i dS[i, j] Q[i],  dV[j] += sum_i P[i, j] dO[i], over the block's rows i >= j */
            for (long j0 = 0; j0 < nb; j0 += 6) {
                long m = nb - j0 < 6 ? nb - j0 : 6, first = j0 > r0 ? j0 - r0 : 0, kc = rows - first;
                for (long c = 0; c < D; c += 16) {
                    tile6x16(kc, dS + first * T16 + j0, 1, T16, q + (r0 + first) * sqt + c, sqt, dkb + j0 * od + c,
                             od, (int)m, s, 1);
                    tile6x16(kc, P + first * T16 + j0, 1, T16, g + (r0 + first) * sgt + c, sgt, dvb + j0 * od + c,
                             od, (int)m, 1.0f, 1);
                }
            }
        }
    }
    free(kt); free(vt); free(P); free(dS); free(Di);
    return 0;
}
#endif

static int parse_in(attn_in *in, unsigned long long q, unsigned long long k, unsigned long long v, PyObject *strides,
                    long H, long T, long D, float scale) {
    long st[9];
    if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != 9) {
        PyErr_SetString(PyExc_ValueError, "strides: a tuple of 9 ints (q, k, v: batch, head, time)");
        return -1;
    }
    for (int i = 0; i < 9; i++) {
        st[i] = PyLong_AsLong(PyTuple_GET_ITEM(strides, i));
        if (st[i] == -1 && PyErr_Occurred()) return -1;
    }
    if (D % 16 != 0 || D <= 0 || T <= 0 || H <= 0) {
        PyErr_SetString(PyExc_ValueError, "causal attention kernel: needs T, H > 0 and D a multiple of 16");
        return -1;
    }
    in->q = (const float *)(uintptr_t)q;
    in->k = (const float *)(uintptr_t)k;
    in->v = (const float *)(uintptr_t)v;
    for (int i = 0; i < 3; i++) {
        in->sq[i] = st[i];
        in->sk[i] = st[3 + i];
        in->sv[i] = st[6 + i];
    }
    in->H = H, in->T = T, in->D = D, in->scale = scale;
    return 0;
}

typedef struct {
    attn_in in;
    const float *o, *lse, *g;
    long sg[3];
    float *out, *out_lse, *dq, *dk, *dv;
    long pairs;
    int failed;
} attn_job;

#if HAVE_X86
static void fwd_job(void *p, int t, int nt) {
    attn_job *j = (attn_job *)p;
    long lo, hi;
    par_share(j->pairs, t, nt, &lo, &hi);
    if (lo < hi && fwd_pairs(&j->in, j->out, j->out_lse, lo, hi)) j->failed = 1;
}

static void bwd_job(void *p, int t, int nt) {
    attn_job *j = (attn_job *)p;
    long lo, hi;
    par_share(j->pairs, t, nt, &lo, &hi);
    if (lo < hi && bwd_pairs(&j->in, j->o, j->lse, j->g, j->sg, j->dq, j->dk, j->dv, lo, hi)) j->failed = 1;
}
#endif

static PyObject *run(par_fn fn, attn_job *j, int nthreads) {
    if (!has_avx2()) {
        PyErr_SetString(PyExc_RuntimeError, "causal attention kernel: this CPU has no AVX2+FMA");
        return NULL;
    }
    par_init();
    Py_BEGIN_ALLOW_THREADS
    par_run(fn, j, nthreads);
    Py_END_ALLOW_THREADS
    if (j->failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* fwd(q, k, v, strides9, B, H, T, D, scale, o, lse, nthreads) */
static PyObject *py_fwd(PyObject *mod, PyObject *args) {
    unsigned long long q, k, v, o, lse;
    PyObject *strides;
    long B, H, T, D;
    float scale;
    int nthreads;
    if (!PyArg_ParseTuple(args, "KKKO!llllfKKi", &q, &k, &v, &PyTuple_Type, &strides, &B, &H, &T, &D, &scale, &o,
                          &lse, &nthreads))
        return NULL;
    attn_job j = {0};
    if (parse_in(&j.in, q, k, v, strides, H, T, D, scale)) return NULL;
    j.out = (float *)(uintptr_t)o, j.out_lse = (float *)(uintptr_t)lse, j.pairs = B * H;
#if HAVE_X86
    return run(fwd_job, &j, nthreads);
#else
    return run(NULL, &j, nthreads);
#endif
}

/* bwd(q, k, v, strides9, B, H, T, D, scale, o, lse, dout, dout_strides3, dq, dk, dv, nthreads) */
static PyObject *py_bwd(PyObject *mod, PyObject *args) {
    unsigned long long q, k, v, o, lse, g, dq, dk, dv;
    PyObject *strides;
    long B, H, T, D;
    float scale;
    int nthreads;
    attn_job j = {0};
    if (!PyArg_ParseTuple(args, "KKKO!llllfKKK(lll)KKKi", &q, &k, &v, &PyTuple_Type, &strides, &B, &H, &T, &D,
                          &scale, &o, &lse, &g, &j.sg[0], &j.sg[1], &j.sg[2], &dq, &dk, &dv, &nthreads))
        return NULL;
    if (parse_in(&j.in, q, k, v, strides, H, T, D, scale)) return NULL;
    j.o = (const float *)(uintptr_t)o, j.lse = (const float *)(uintptr_t)lse, j.g = (const float *)(uintptr_t)g;
    j.dq = (float *)(uintptr_t)dq, j.dk = (float *)(uintptr_t)dk, j.dv = (float *)(uintptr_t)dv, j.pairs = B * H;
#if HAVE_X86
    return run(bwd_job, &j, nthreads);
#else
    return run(NULL, &j, nthreads);
#endif
}

static PyObject *py_available(PyObject *mod, PyObject *noargs) { return PyBool_FromLong(has_avx2()); }

static PyObject *py_threads(PyObject *mod, PyObject *noargs) {
    return PyUnicode_FromString(par_init() ? "openmp" : "pthreads");
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "available() -> True where the CPU has AVX2 and FMA"},
    {"threads", py_threads, METH_NOARGS, "threads() -> 'openmp' (PyTorch's OpenMP team) or 'pthreads'"},
    {"fwd", py_fwd, METH_VARARGS,
     "fwd(q, k, v, strides9, B, H, T, D, scale, o, lse, nthreads): causal attention, O and lse"},
    {"bwd", py_bwd, METH_VARARGS,
     "bwd(q, k, v, strides9, B, H, T, D, scale, o, lse, dout, dout_strides, dq, dk, dv, nthreads)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_attention", NULL, -1, methods};

PyMODINIT_FUNC PyInit__attention(void) { return PyModule_Create(&moddef); }
