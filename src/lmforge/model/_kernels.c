/* lmforge.model._kernels: CPU kernels PyTorch runs slowly here.
 *
 * GELU with the tanh approximation (GPT-2's "gelu_new"):
 *   y = 0.5 x (1 + tanh(z)) = x s,   s = sigmoid(2 z),   z = sqrt(2/pi) (x + 0.044715 x^3)
 *   dy/dx = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 *         = s + y (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2),   x = y / s
 * PyTorch's CPU kernel for it evaluates tanh element by element (3-4x slower than
 * its exact-erf GELU on AVX2 machines); here s = 1 / (1 + exp(-2z)) with a
 * polynomial exp that the compiler vectorizes (an AVX2+FMA clone is picked at run
 * time). Error < 1e-6 relative to libm. The forward also writes s, and the
 * backward works from (y, s): y is kept anyway by the next layer (the MLP's
 * output projection saves its input), so the backward needs no exp and no more
 * memory than one that recomputes from x. Where z is clamped at -40, s is set
 * to 0 (y = 0, dy/dx = 0, as in float the exact values round there).
 *
 * Cross-entropy of float32 logits (N, V) against int64 targets, fused:
 *   forward   lse_i = log sum_j exp(x_ij),  loss_i = lse_i - x_i,t_i   (one read of the logits)
 *   backward  dx_ij = scale (exp(x_ij - lse_i) - [j = t_i])           (one read, one write)
 * PyTorch runs log_softmax (a read and a write of N x V), nll_loss, then in the
 * backward zero-fills N x V, scatters, and runs log_softmax's backward (two reads
 * and a write): at a 2k vocabulary that was a quarter of a small model's step.
 * Rows whose target is ignore_index give 0 and get a zero gradient.
 *
 * Rows (elements for GELU) are split over PyTorch's OpenMP threads (`_parallel.h`).
 * Knows nothing about tensors: it takes raw buffers and releases the GIL;
 * `model/kernels.py` is the bridge.
 */
#define _GNU_SOURCE
#include "_parallel.h"
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define K0 0.7978845608028654f /* sqrt(2/pi) */
#define K1 0.044715f

static inline float exp_poly(float x) {
    /* exp(x) for x in [-80, 80]: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial */
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.4426950408889634f + round_magic) - round_magic;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3333519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static inline float tanh_fast(float z) {
    z = z < 40.0f ? z : 40.0f; /* tanh is 1 in float long before; keeps exp(2z) in range */
    z = z > -40.0f ? z : -40.0f;
    return 1.0f - 2.0f / (1.0f + exp_poly(2.0f * z));
}

#define GELU_FWD_BODY                                                      \
    for (Py_ssize_t i = 0; i < n; i++) {                                   \
        float v = x[i];                                                    \
        float z = K0 * (v + K1 * v * v * v);                               \
        z = z < 40.0f ? z : 40.0f; /* keeps exp(-2z) in range */           \
        z = z > -40.0f ? z : -40.0f;                                       \
        float sg = 1.0f / (1.0f + exp_poly(-2.0f * z));                    \
        sg = z > -40.0f ? sg : 0.0f;                                       \
        s[i] = sg;                                                         \
        y[i] = v * sg;                                                     \
    }
#define GELU_BWD_BODY                                                                      \
    for (Py_ssize_t i = 0; i < n; i++) {                                                   \
        float sg = s[i], yv = y[i];                                                        \
        float v = yv / (sg > 0.0f ? sg : 1.0f);                                            \
        float d = sg + yv * (1.0f - sg) * (2.0f * K0) * (1.0f + 3.0f * K1 * v * v);        \
        out[i] = g[i] * d;                                                                 \
    }

static void fwd_plain(const float *restrict x, float *restrict y, float *restrict s, Py_ssize_t n) { GELU_FWD_BODY }
static void bwd_plain(const float *restrict y, const float *restrict s, const float *restrict g, float *restrict out,
                      Py_ssize_t n) {
    GELU_BWD_BODY
}
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) static void fwd_avx2(const float *restrict x, float *restrict y, float *restrict s,
                                                           Py_ssize_t n) {
    GELU_FWD_BODY
}
__attribute__((target("avx2,fma"))) static void bwd_avx2(const float *restrict y, const float *restrict s,
                                                           const float *restrict g, float *restrict out, Py_ssize_t n) {
    GELU_BWD_BODY
}
static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int has_avx2(void) { return 0; }
#define fwd_avx2 fwd_plain
#define bwd_avx2 bwd_plain
#endif

/* ---- cross-entropy ---- */
/* 8 running maxima and sums: the loops vectorize without reassociation flags, and the
 * sums are more accurate than one sequential accumulator at large vocabularies */
#define CE_FWD_BODY                                                                            \
    for (Py_ssize_t i = 0; i < n; i++) {                                                       \
        const float *x = logits + i * V;                                                       \
        int64_t t = tg[i];                                                                     \
        if (t == ignore) { lse[i] = 0.0f; loss[i] = 0.0f; continue; }                          \
        if (t < 0 || t >= V) return i + 1;                                                     \
        Py_ssize_t V8 = V & ~(Py_ssize_t)7, j;                                                 \
        float mv[8], av[8];                                                                    \
        uint32_t bad[8]; /* NaN or +inf, by integer tests (kept under finite-math) */          \
        for (int k = 0; k < 8; k++) { mv[k] = x[0]; av[k] = 0.0f; bad[k] = 0; }                \
        for (j = 0; j < V8; j += 8)                                                            \
            for (int k = 0; k < 8; k++) {                                                      \
                uint32_t u;                                                                    \
                memcpy(&u, x + j + k, sizeof u);                                               \
                bad[k] |= ((u & 0x7fffffffu) > 0x7f800000u) | (u == 0x7f800000u);              \
                mv[k] = x[j + k] > mv[k] ? x[j + k] : mv[k];                                   \
            }                                                                                  \
        float m = mv[0];                                                                       \
        uint32_t nonfinite = 0;                                                                \
        for (int k = 0; k < 8; k++) { m = mv[k] > m ? mv[k] : m; nonfinite |= bad[k]; }        \
        for (; j < V; j++) {                                                                   \
            uint32_t u;                                                                        \
            memcpy(&u, x + j, sizeof u);                                                       \
            nonfinite |= ((u & 0x7fffffffu) > 0x7f800000u) | (u == 0x7f800000u);               \
            m = x[j] > m ? x[j] : m;                                                           \
        }                                                                                      \
        if (nonfinite) { /* a NaN or +inf logit: the loss is NaN, as PyTorch's is (-inf is fine) */ \
            uint32_t qnan = 0x7fc00000u;                                                       \
            memcpy(loss + i, &qnan, sizeof qnan);                                              \
            memcpy(lse + i, &qnan, sizeof qnan);                                               \
            continue;                                                                          \
        }                                                                                      \
        for (j = 0; j < V8; j += 8)                                                            \
            for (int k = 0; k < 8; k++) {                                                      \
                float d = x[j + k] - m;                                                        \
                av[k] += exp_poly(d > -80.0f ? d : -80.0f);                                    \
            }                                                                                  \
        float acc = ((av[0] + av[4]) + (av[2] + av[6])) + ((av[1] + av[5]) + (av[3] + av[7])); \
        for (; j < V; j++) {                                                                   \
            float d = x[j] - m;                                                                \
            acc += exp_poly(d > -80.0f ? d : -80.0f);                                          \
        }                                                                                      \
        float l = m + logf(acc);                                                               \
        lse[i] = l;                                                                            \
        loss[i] = l - x[t];                                                                    \
    }                                                                                          \
    return 0;
#define CE_BWD_BODY                                                                            \
    for (Py_ssize_t i = 0; i < n; i++) {                                                       \
        const float *x = logits + i * V;                                                       \
        float *g = grad + i * V;                                                               \
        int64_t t = tg[i];                                                                     \
        if (t == ignore) { memset(g, 0, (size_t)V * sizeof(float)); continue; }                \
        float l = lse[i];                                                                      \
        for (Py_ssize_t j = 0; j < V; j++) {                                                   \
            float d = x[j] - l;                                                                \
            g[j] = scale * exp_poly(d > -80.0f ? d : -80.0f);                                  \
        }                                                                                      \
        g[t] -= scale;                                                                         \
    }

static Py_ssize_t ce_fwd_plain(const float *restrict logits, const int64_t *restrict tg, Py_ssize_t n, Py_ssize_t V,
                               int64_t ignore, float *restrict lse, float *restrict loss) { CE_FWD_BODY }
static void ce_bwd_plain(const float *restrict logits, const int64_t *restrict tg, const float *restrict lse,
                         Py_ssize_t n, Py_ssize_t V, int64_t ignore, float scale, float *restrict grad) { CE_BWD_BODY }
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) static Py_ssize_t ce_fwd_avx2(const float *restrict logits,
                                                                   const int64_t *restrict tg, Py_ssize_t n,
                                                                   Py_ssize_t V, int64_t ignore, float *restrict lse,
                                                                   float *restrict loss) { CE_FWD_BODY }
__attribute__((target("avx2,fma"))) static void ce_bwd_avx2(const float *restrict logits, const int64_t *restrict tg,
                                                            const float *restrict lse, Py_ssize_t n, Py_ssize_t V,
                                                            int64_t ignore, float scale, float *restrict grad) {
    CE_BWD_BODY
}
#else
#define ce_fwd_avx2 ce_fwd_plain
#define ce_bwd_avx2 ce_bwd_plain
#endif

static int use_avx2 = -1;

typedef struct {
    const float *x, *a, *b; /* GELU: x | y, s, g;  CE: logits, lse */
    float *y, *s;           /* GELU: y, s | out;    CE: lse, loss | grad */
    const int64_t *tg;
    Py_ssize_t n, V, bad[64];
    int64_t ignore;
    float scale;
} job;

static void gelu_fwd_job(void *p, int t, int nt) {
    job *j = (job *)p;
    long lo, hi;
    par_share(j->n, t, nt, &lo, &hi);
    if (lo < hi) (use_avx2 ? fwd_avx2 : fwd_plain)(j->x + lo, j->y + lo, j->s + lo, hi - lo);
}

static void gelu_bwd_job(void *p, int t, int nt) {
    job *j = (job *)p;
    long lo, hi;
    par_share(j->n, t, nt, &lo, &hi);
    if (lo < hi) (use_avx2 ? bwd_avx2 : bwd_plain)(j->x + lo, j->a + lo, j->b + lo, j->y + lo, hi - lo);
}

static void ce_fwd_job(void *p, int t, int nt) {
    job *j = (job *)p;
    long lo, hi;
    par_share(j->n, t, nt, &lo, &hi);
    if (lo >= hi) return;
    Py_ssize_t bad = (use_avx2 ? ce_fwd_avx2 : ce_fwd_plain)(j->x + lo * j->V, j->tg + lo, hi - lo, j->V, j->ignore,
                                                            j->y + lo, j->s + lo);
    j->bad[t] = bad ? lo + bad : 0;
}

static void ce_bwd_job(void *p, int t, int nt) {
    job *j = (job *)p;
    long lo, hi;
    par_share(j->n, t, nt, &lo, &hi);
    if (lo < hi)
        (use_avx2 ? ce_bwd_avx2 : ce_bwd_plain)(j->x + lo * j->V, j->tg + lo, j->a + lo, hi - lo, j->V, j->ignore,
                                                j->scale, j->y + lo * j->V);
}

static void run(par_fn fn, job *j, int nthreads) {
    if (use_avx2 < 0) use_avx2 = has_avx2();
    par_init();
    nthreads = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
    Py_BEGIN_ALLOW_THREADS
    par_run(fn, j, nthreads);
    Py_END_ALLOW_THREADS
}

/* ce_fwd(logits_ptr, targets_ptr, n, V, ignore_index, lse_ptr, loss_ptr, nthreads) -> 0, or 1 + the first row
 * whose target is outside [0, V) (and not ignore_index) */
static PyObject *py_ce_fwd(PyObject *mod, PyObject *args) {
    unsigned long long xp, tp, lp, op;
    long long ignore;
    int nthreads;
    job j = {0};
    if (!PyArg_ParseTuple(args, "KKnnLKKi", &xp, &tp, &j.n, &j.V, &ignore, &lp, &op, &nthreads)) return NULL;
    j.x = (const float *)(uintptr_t)xp, j.tg = (const int64_t *)(uintptr_t)tp, j.ignore = (int64_t)ignore;
    j.y = (float *)(uintptr_t)lp, j.s = (float *)(uintptr_t)op;
    run(ce_fwd_job, &j, nthreads);
    for (int t = 0; t < 64; t++)
        if (j.bad[t]) return PyLong_FromSsize_t(j.bad[t]); /* shares are in row order: the first is the lowest */
    return PyLong_FromLong(0);
}

/* ce_bwd(logits_ptr, targets_ptr, lse_ptr, n, V, ignore_index, scale, grad_ptr, nthreads) */
static PyObject *py_ce_bwd(PyObject *mod, PyObject *args) {
    unsigned long long xp, tp, lp, gp;
    long long ignore;
    int nthreads;
    job j = {0};
    if (!PyArg_ParseTuple(args, "KKKnnLfKi", &xp, &tp, &lp, &j.n, &j.V, &ignore, &j.scale, &gp, &nthreads))
        return NULL;
    j.x = (const float *)(uintptr_t)xp, j.tg = (const int64_t *)(uintptr_t)tp, j.a = (const float *)(uintptr_t)lp;
    j.ignore = (int64_t)ignore, j.y = (float *)(uintptr_t)gp;
    run(ce_bwd_job, &j, nthreads);
    Py_RETURN_NONE;
}

/* gelu_tanh_fwd(x_ptr, y_ptr, s_ptr, n, nthreads) */
static PyObject *py_fwd(PyObject *mod, PyObject *args) {
    unsigned long long xp, yp, sp;
    int nthreads;
    job j = {0};
    if (!PyArg_ParseTuple(args, "KKKni", &xp, &yp, &sp, &j.n, &nthreads)) return NULL;
    j.x = (const float *)(uintptr_t)xp, j.y = (float *)(uintptr_t)yp, j.s = (float *)(uintptr_t)sp;
    run(gelu_fwd_job, &j, nthreads);
    Py_RETURN_NONE;
}

/* gelu_tanh_bwd(y_ptr, s_ptr, grad_ptr, out_ptr, n, nthreads) */
static PyObject *py_bwd(PyObject *mod, PyObject *args) {
    unsigned long long yp, sp, gp, op;
    int nthreads;
    job j = {0};
    if (!PyArg_ParseTuple(args, "KKKKni", &yp, &sp, &gp, &op, &j.n, &nthreads)) return NULL;
    j.x = (const float *)(uintptr_t)yp, j.a = (const float *)(uintptr_t)sp, j.b = (const float *)(uintptr_t)gp;
    j.y = (float *)(uintptr_t)op;
    run(gelu_bwd_job, &j, nthreads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gelu_tanh_fwd", py_fwd, METH_VARARGS, "gelu_tanh_fwd(x_ptr, y_ptr, s_ptr, n, nthreads): y = gelu_tanh(x), s = sigmoid(2z); float32 buffers"},
    {"gelu_tanh_bwd", py_bwd, METH_VARARGS, "gelu_tanh_bwd(y_ptr, s_ptr, grad_ptr, out_ptr, n, nthreads): float32 buffers"},
    {"ce_fwd", py_ce_fwd, METH_VARARGS, "ce_fwd(logits, targets, n, V, ignore, lse, loss, nthreads) -> 0 or 1 + bad row"},
    {"ce_bwd", py_ce_bwd, METH_VARARGS, "ce_bwd(logits, targets, lse, n, V, ignore, scale, grad, nthreads)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&moddef); }
