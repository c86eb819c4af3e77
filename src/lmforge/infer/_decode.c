/* lmforge.infer._decode: one decode step of an lmforge Transformer in C (CPU, float32).
 *
 * Decode is memory-bound: each new token reads every weight once. PyTorch runs a
 * decode step as ~15 small operators per layer, each paying dispatch overhead and
 * a fresh start of its thread pool, so a small model spends most of its time
 * outside arithmetic and a larger one streams its weights at about half the
 * machine's bandwidth. Here the whole step (embedding, every block, final norm,
 * output head) is one call: matrix-vector products split by rows over a small
 * spinning thread pool, attention read straight from the (paged or contiguous)
 * KV cache through a block table, no allocation.
 *
 * It knows the math of lmforge.model.Transformer in eval mode (every variant of
 * ModelConfig) and raw buffers: float32, and for each linear (the four of a block,
 * the output head) optionally integer codes with scales as lmforge.quant's IntLinear
 * stores them (int8; 2..4 bits two per byte, symmetric or with zero points; see Lin),
 * dequantized in registers against float32 activations. It knows nothing about
 * tensors, sampling or scheduling. `infer/fastpath.py` is the bridge: it hands over the weights'
 * addresses and the cache layout, and checks the result against PyTorch in the tests.
 *
 * B rows decode one token each; row b's token goes to position pos[b] (its number of
 * cached tokens) of the sequence whose block table is tables[b * max_blocks ...]. Rows of
 * one sequence at consecutive positions are a prefill chunk: each layer writes every row's
 * key and value before any row attends, and a row reads positions up to its own. The output
 * head runs at every row, or only at the rows `heads` names (a chunk needs its last only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));   /* 8 int8 codes */
typedef uint8_t v8ub __attribute__((vector_size(8))); /* 8 bytes of 4-bit codes */

static inline __attribute__((always_inline)) v8 LOAD(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) void STORE(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* ------------------------------------------------------------------ thread pool */
/* A parallel region is cut into `chunks` pieces fn(ctx, c, chunks), c = 0..chunks-1 (a few per thread),
 * which the main thread and the n-1 workers claim one at a time from a shared ticket; the main thread
 * waits only for pieces that were claimed. On a machine shared with other work, a worker the OS has not
 * scheduled claims nothing and the running threads do its share (with a fixed split, every region would
 * wait for it: a time slice, milliseconds, per region). Every piece computes the same numbers whoever
 * runs it. Workers spin on a generation counter between regions (a decode step opens ~10 per layer) and
 * sleep on a condition variable after ~0.5 ms without work. */
#define MAX_THREADS 64
#define CHUNKS_PER_THREAD 4
typedef void (*task_fn)(void *ctx, int t, int n);
static struct {
    int n; /* threads, main included */
    pthread_t th[MAX_THREADS];
    atomic_int gen, sleeping, stop;
    atomic_ullong ticket; /* (region << 32) | next piece to claim */
    atomic_int done;      /* pieces of the current region finished */
    int start_gen;
    task_fn fn;
    void *ctx;
    int chunks;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t step_mu = PTHREAD_MUTEX_INITIALIZER; /* one step at a time */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* claim and run pieces of the current region until none is left (or the region is over) */
static void run_pieces(void) {
    for (;;) {
        unsigned long long t = atomic_load(&pool.ticket);
        unsigned c = (unsigned)(t & 0xffffffffu);
        /* read before the claim: a successful claim proves the region had not moved on */
        task_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int chunks = pool.chunks;
        if ((int)c >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) {
            if ((int)(t & 0xffffffffu) >= chunks) return;
            continue;
        }
        fn(ctx, (int)c, chunks);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    (void)arg;
    int seen = pool.start_gen; /* the generation before any task for this worker */
    for (;;) {
        int g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g == seen) {
            double t0 = now_s();
            long spins = 0;
            while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
                CPU_RELAX();
                if ((++spins & 255) == 0 && now_s() - t0 > 5e-4) break;
            }
            if (g == seen) {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleeping, 1);
                while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleeping, 1);
                pthread_mutex_unlock(&pool.mu);
            }
        }
        seen = g;
        if (atomic_load(&pool.stop)) return NULL;
        run_pieces();
    }
}

static void pool_stop(void) {
    if (pool.n <= 1) return;
    atomic_store(&pool.stop, 1);
    atomic_fetch_add(&pool.gen, 1);
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.n; i++) pthread_join(pool.th[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.n = 1;
}

static int pool_start(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n == pool.n) return 0;
    pool_stop();
    pool.start_gen = atomic_load(&pool.gen);
    for (int i = 1; i < n; i++) {
        if (pthread_create(&pool.th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
            pool.n = i;
            return -1;
        }
        pool.n = i + 1;
    }
    return 0;
}

static void parallel(task_fn fn, void *ctx) {
    if (pool.n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    int chunks = pool.n * CHUNKS_PER_THREAD;
    if (chunks > MAX_THREADS) chunks = MAX_THREADS; /* (att_task keeps one scores row per piece) */
    /* the previous region's pieces are all done: no worker reads these until the new ticket */
    pool.fn = fn;
    pool.ctx = ctx;
    pool.chunks = chunks;
    atomic_store(&pool.done, 0);
    unsigned long long region = (atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store(&pool.ticket, region << 32);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_seq_cst);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_pieces();
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) CPU_RELAX();
}

static void after_fork_child(void) { /* the workers did not survive the fork */
    pool.n = 1;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&step_mu, NULL);
}

/* ------------------------------------------------------------------ SIMD kernels */
static inline __attribute__((always_inline)) float hsum(v8 a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

static inline __attribute__((always_inline)) v8 vexp(v8 x) { /* exp on [-87, 88], relative error < 2e-7 */
    const v8 lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    const v8 hi = {88.f, 88.f, 88.f, 88.f, 88.f, 88.f, 88.f, 88.f};
    v8i below = x < lo; /* -1 where x < lo: a select without the C++-only vector ?: */
    x = (v8)((below & (v8i)lo) | (~below & (v8i)x));
    v8i above = x > hi;
    x = (v8)((above & (v8i)hi) | (~above & (v8i)x));
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    v8 n = (x * 1.4426950408889634f + magic) - magic;
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3333519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)e;
}

#define SUF(name) name##_plain
#define ATTR
#define KERN_AVX2 0
#include "_decode_kern.h"
#undef SUF
#undef ATTR
#undef KERN_AVX2
#if defined(__x86_64__) && defined(__GNUC__)
#define SUF(name) name##_avx2
#define ATTR __attribute__((target("avx2,fma")))
#define KERN_AVX2 1
#include "_decode_kern.h"
#undef SUF
#undef ATTR
#undef KERN_AVX2
static int has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define matmul_rows_avx2 matmul_rows_plain
#define swiglu_avx2 swiglu_plain
#define matvec_rows_avx2 matvec_rows_plain
#define qmat_rows_avx2 qmat_rows_plain
#define lane_sums_avx2 lane_sums_plain
#define attend_avx2 attend_plain
static int has_avx2(void) { return 0; }
#endif
static int use_avx2 = -1;

/* ------------------------------------------------------------------ the model */
enum { NORM_LAYER = 0, NORM_RMS = 1 };
enum { MLP_GELU_TANH = 0, MLP_GELU = 1, MLP_SWIGLU = 2, MLP_RELU2 = 3 };
enum { POS_LEARNED = 0, POS_ROPE = 1 };

/* A linear layer's weight: float32 rows, or integer codes with scales (see _decode_kern.h):
 *   W_F32: w float (O, I)
 *   W_I8:  w int8 (O, I) signed codes, w = q * s
 *   W_Q4:  w uint8 (O, I/2), codes of <= 4 bits, column 2j in the low nibble, 2j+1 in the high one;
 *          w = (u - z) * s with z = zeros[o, g] (asymmetric) or zc (symmetric, zeros NULL: 8 at 4 bits)
 * scales (and zeros) are (O, I/G): one per group of G consecutive stored columns (G = I: one per row).
 * perm (int64, I) or NULL: stored column j multiplies input column perm[j]. */
enum { W_F32 = 0, W_I8 = 1, W_Q4 = 2 };
typedef struct {
    int kind, G;
    const void *w;
    const float *scales, *zeros, *bias;
    const int64_t *perm;
    float zc; /* W_Q4 without zeros: the zero point of every group (2 ** (bits - 1): q = u - zc) */
} Lin;

typedef struct { /* one block's weights (NULL where the config has none) */
    const float *attn_norm_w, *attn_norm_b, *qkv_w, *qkv_b, *q_norm_w, *k_norm_w, *proj_w, *proj_b;
    const float *mlp_norm_w, *mlp_norm_b, *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
    float *k_cache, *v_cache; /* the cache's first block of this layer */
    Lin qkv, proj, fc, mlp_proj; /* the four linears (float32: the pointers above) */
} Layer;

typedef struct {
    int V, C, L, H, K, D, F, norm, mlp, pos, window; /* window 0: none */
    float eps, softcap;                               /* softcap 0: none */
    const float *tok_emb, *pos_emb, *norm_w, *norm_b, *head_w, *rope_cos, *rope_sin;
    int rope_len, max_pos;
    Layer *layers;
    Lin head; /* the output head (no bias) */
    long bstride; /* floats from one block to the next in the cache; heads are bs * D apart */
    int bs;
    /* scratch, for up to cap rows */
    int cap, score_cap;
    float *x, *h, *qkv, *att, *ff, *act, *scores; /* act: SwiGLU output; scores: one row per thread */
    float *xq; /* a quantized linear's input rows, gathered and reordered (cap rows of the widest input) */
} Model;

static void norm_rows(const Model *m, const float *x, float *out, const float *w, const float *b, int B, int C) {
    for (int r = 0; r < B; r++) {
        const float *xr = x + (size_t)r * C;
        float *o = out + (size_t)r * C;
        if (m->norm == NORM_RMS) {
            float ss = 0.f;
            for (int i = 0; i < C; i++) ss += xr[i] * xr[i];
            float s = 1.0f / sqrtf(ss / C + m->eps);
            for (int i = 0; i < C; i++) o[i] = xr[i] * s * w[i];
        } else {
            float mean = 0.f, var = 0.f;
            for (int i = 0; i < C; i++) mean += xr[i];
            mean /= C;
            for (int i = 0; i < C; i++) var += (xr[i] - mean) * (xr[i] - mean);
            float s = 1.0f / sqrtf(var / C + m->eps);
            for (int i = 0; i < C; i++) o[i] = (xr[i] - mean) * s * w[i] + (b ? b[i] : 0.f);
        }
    }
}

static void rms_head(float *x, const float *w, int D, float eps) {
    float ss = 0.f;
    for (int i = 0; i < D; i++) ss += x[i] * x[i];
    float s = 1.0f / sqrtf(ss / D + eps);
    for (int i = 0; i < D; i++) x[i] = x[i] * s * w[i];
}

static void rope_head(float *x, const float *cos_, const float *sin_, int D) {
    int d = D / 2;
    for (int i = 0; i < d; i++) {
        float a = x[i], b = x[i + d], c = cos_[i], s = sin_[i];
        x[i] = a * c - b * s;
        x[i + d] = b * c + a * s;
    }
}

/* parallel matmul: rows of W split over the threads in multiples of 4 */
typedef struct {
    const float *W, *bias, *X;
    float *Y;
    int B, I, O;
} MatJob;

static void mat_task(void *p, int t, int n) {
    MatJob *j = (MatJob *)p;
    int per = ((j->O + n - 1) / n + 3) & ~3;
    int r0 = t * per, r1 = r0 + per < j->O ? r0 + per : j->O;
    if (r0 >= r1) return;
    if (j->B == 1) { /* the single-stream decode: measured ~5% faster than 4 interleaved rows */
        if (use_avx2) matvec_rows_avx2(j->W, j->bias, j->X, j->Y, j->I, r0, r1);
        else matvec_rows_plain(j->W, j->bias, j->X, j->Y, j->I, r0, r1);
        return;
    }
    if (use_avx2) matmul_rows_avx2(j->W, j->bias, j->X, j->Y, j->B, j->I, j->O, r0, r1);
    else matmul_rows_plain(j->W, j->bias, j->X, j->Y, j->B, j->I, j->O, r0, r1);
}

static void matmul(const float *W, const float *bias, const float *X, float *Y, int B, int I, int O) {
    MatJob j = {W, bias, X, Y, B, I, O};
    if ((size_t)O * I * (B > 0 ? B : 1) < 16384) mat_task(&j, 0, 1); /* too small to share */
    else parallel(mat_task, &j);
}

typedef struct {
    const Lin *L;
    const float *X, *XS;
    float *Y;
    int B, I, O;
} QJob;

static void qmat_task(void *p, int t, int n) {
    QJob *j = (QJob *)p;
    int per = ((j->O + n - 1) / n + 3) & ~3;
    int r0 = t * per, r1 = r0 + per < j->O ? r0 + per : j->O;
    if (r0 >= r1) return;
    const Lin *L = j->L;
    if (use_avx2)
        qmat_rows_avx2(L->kind, L->w, L->scales, L->zeros, L->zc, L->bias, j->X, j->XS, j->Y, j->B, j->I, j->O, L->G, r0, r1);
    else
        qmat_rows_plain(L->kind, L->w, L->scales, L->zeros, L->zc, L->bias, j->X, j->XS, j->Y, j->B, j->I, j->O, L->G, r0, r1);
}

/* Y (B, O) = X (B, I) W^T + bias for any kind of weight; a quantized one first gathers each input row
 * by perm and, for 4-bit codes, puts each 16 columns evens first and sums x's lanes per group (into
 * m->xq: B rows of I, then B rows of I / G * 8 lane sums) */
static void lin_matmul(const Model *m, const Lin *L, const float *X, float *Y, int B, int I, int O) {
    if (L->kind == W_F32) {
        matmul((const float *)L->w, L->bias, X, Y, B, I, O);
        return;
    }
    float *xq = m->xq, *xs = xq + (size_t)B * I;
    for (int b = 0; b < B; b++) {
        const float *x = X + (size_t)b * I;
        float *o = xq + (size_t)b * I;
        if (L->kind == W_Q4) {
            for (int j = 0; j < I; j++) {
                int d = (j & ~15) + ((j & 1) ? 8 + ((j & 15) >> 1) : (j & 15) >> 1);
                o[d] = x[L->perm ? L->perm[j] : j];
            }
            if (use_avx2) lane_sums_avx2(o, xs + (size_t)b * (I / L->G) * 8, I, L->G);
            else lane_sums_plain(o, xs + (size_t)b * (I / L->G) * 8, I, L->G);
        } else if (L->perm) {
            for (int j = 0; j < I; j++) o[j] = x[L->perm[j]];
        } else {
            memcpy(o, x, sizeof(float) * I);
        }
    }
    QJob j = {L, xq, xs, Y, B, I, O};
    if ((size_t)O * I * (B > 0 ? B : 1) < 16384) qmat_task(&j, 0, 1);
    else parallel(qmat_task, &j);
}

typedef struct {
    const Model *m;
    const Layer *ly;
    const int32_t *pos, *tables;
    int B, max_blocks;
} AttJob;

static void att_task(void *p, int t, int n) {
    AttJob *j = (AttJob *)p;
    const Model *m = j->m;
    int H = m->H, K = m->K, D = m->D, QKV = (H + 2 * K) * D;
    float scale = 1.0f / sqrtf((float)D);
    float *scores = m->scores + (size_t)t * m->score_cap;
    int total = j->B * H;
    for (int task = t; task < total; task += n) {
        int b = task / H, h = task % H, kh = h / (H / K);
        int hi = j->pos[b];
        int lo = (m->window > 0 && hi - m->window + 1 > 0) ? hi - m->window + 1 : 0;
        const float *q = m->qkv + (size_t)b * QKV + (size_t)h * D;
        float *out = m->att + (size_t)b * H * D + (size_t)h * D;
        const int32_t *table = j->tables + (size_t)b * j->max_blocks;
        const float *kb = j->ly->k_cache + (size_t)kh * m->bs * D, *vb = j->ly->v_cache + (size_t)kh * m->bs * D;
        if (use_avx2) attend_avx2(q, kb, vb, table, m->bstride, m->bs, D, lo, hi, scale, scores, out);
        else attend_plain(q, kb, vb, table, m->bstride, m->bs, D, lo, hi, scale, scores, out);
    }
}

static float gelu_tanh1(float v) { return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))); }
static float gelu1(float v) { return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)); }

/* the MLP's activation, rows split over the threads; the result is packed F wide in place */
typedef struct {
    const Model *m;
    int B;
} ActJob;

static void act_task(void *p, int t, int n) {
    ActJob *j = (ActJob *)p;
    const Model *m = j->m;
    int F = m->F, FC = m->mlp == MLP_SWIGLU ? 2 * F : F;
    /* SwiGLU packs row b from offset b*FC down to b*F: rows must go in order, so it splits columns */
    if (m->mlp == MLP_SWIGLU) {
        int per = ((F + n - 1) / n + 7) & ~7;
        int c0 = t * per, c1 = c0 + per < F ? c0 + per : F;
        if (c0 >= c1) return;
        for (int b = 0; b < j->B; b++) {
            float *f = m->ff + (size_t)b * FC;
            float *tmp = m->act + (size_t)b * F;
            if (use_avx2) swiglu_avx2(f + c0, f + F + c0, tmp + c0, c1 - c0);
            else swiglu_plain(f + c0, f + F + c0, tmp + c0, c1 - c0);
        }
        return;
    }
    size_t total = (size_t)j->B * F, per = (total + n - 1) / n, i0 = t * per, i1 = i0 + per < total ? i0 + per : total;
    float *f = m->ff;
    for (size_t i = i0; i < i1; i++) {
        float v = f[i];
        if (m->mlp == MLP_GELU_TANH) f[i] = gelu_tanh1(v);
        else if (m->mlp == MLP_GELU) f[i] = gelu1(v);
        else {
            float r = v > 0.f ? v : 0.f;
            f[i] = r * r;
        }
    }
}

static void step(Model *m, int B, const int64_t *tokens, const int32_t *pos, const int32_t *tables, int max_blocks,
                 const int32_t *heads, int n_heads, float *logits) {
    const int C = m->C, H = m->H, K = m->K, D = m->D, F = m->F;
    const int QKV = (H + 2 * K) * D, FC = m->mlp == MLP_SWIGLU ? 2 * F : F;
    for (int b = 0; b < B; b++) {
        memcpy(m->x + (size_t)b * C, m->tok_emb + (size_t)tokens[b] * C, sizeof(float) * C);
        if (m->pos == POS_LEARNED)
            for (int i = 0; i < C; i++) m->x[(size_t)b * C + i] += m->pos_emb[(size_t)pos[b] * C + i];
    }
    for (int l = 0; l < m->L; l++) {
        const Layer *ly = &m->layers[l];
        norm_rows(m, m->x, m->h, ly->attn_norm_w, ly->attn_norm_b, B, C);
        lin_matmul(m, &ly->qkv, m->h, m->qkv, B, C, QKV);
        for (int b = 0; b < B; b++) {
            float *q = m->qkv + (size_t)b * QKV, *k = q + H * D, *v = k + K * D;
            int p = pos[b];
            for (int h = 0; h < H; h++) {
                if (ly->q_norm_w) rms_head(q + h * D, ly->q_norm_w, D, m->eps);
                if (m->pos == POS_ROPE) rope_head(q + h * D, m->rope_cos + (size_t)p * (D / 2), m->rope_sin + (size_t)p * (D / 2), D);
            }
            size_t slot = (size_t)tables[(size_t)b * max_blocks + p / m->bs] * m->bstride + (size_t)(p % m->bs) * D;
            for (int h = 0; h < K; h++) {
                if (ly->k_norm_w) rms_head(k + h * D, ly->k_norm_w, D, m->eps);
                if (m->pos == POS_ROPE) rope_head(k + h * D, m->rope_cos + (size_t)p * (D / 2), m->rope_sin + (size_t)p * (D / 2), D);
                memcpy(ly->k_cache + slot + (size_t)h * m->bs * D, k + h * D, sizeof(float) * D);
                memcpy(ly->v_cache + slot + (size_t)h * m->bs * D, v + h * D, sizeof(float) * D);
            }
        }
        AttJob aj = {m, ly, pos, tables, B, max_blocks};
        if (B * H > 1 && pool.n > 1) parallel(att_task, &aj);
        else att_task(&aj, 0, 1);
        lin_matmul(m, &ly->proj, m->att, m->h, B, H * D, C);
        for (size_t i = 0; i < (size_t)B * C; i++) m->x[i] += m->h[i];
        norm_rows(m, m->x, m->h, ly->mlp_norm_w, ly->mlp_norm_b, B, C);
        lin_matmul(m, &ly->fc, m->h, m->ff, B, C, FC);
        ActJob acj = {m, B};
        if ((size_t)B * F >= 4096 && pool.n > 1) parallel(act_task, &acj);
        else act_task(&acj, 0, 1);
        lin_matmul(m, &ly->mlp_proj, m->mlp == MLP_SWIGLU ? m->act : m->ff, m->h, B, F, C);
        for (size_t i = 0; i < (size_t)B * C; i++) m->x[i] += m->h[i];
    }
    if (heads) { /* the head only at the rows asked for (a prefill's last position), packed in that order */
        for (int i = 0; i < n_heads; i++)
            norm_rows(m, m->x + (size_t)heads[i] * C, m->h + (size_t)i * C, m->norm_w, m->norm_b, 1, C);
        B = n_heads;
    } else {
        norm_rows(m, m->x, m->h, m->norm_w, m->norm_b, B, C);
    }
    lin_matmul(m, &m->head, m->h, logits, B, C, m->V);
    if (m->softcap > 0.f) {
        float c = m->softcap;
        for (size_t i = 0; i < (size_t)B * m->V; i++) logits[i] = c * tanhf(logits[i] / c);
    }
}

/* ------------------------------------------------------------------ Python */
static void model_free(Model *m) {
    if (!m) return;
    free(m->layers);
    free(m->x);
    free(m->h);
    free(m->qkv);
    free(m->att);
    free(m->ff);
    free(m->act);
    free(m->scores);
    free(m->xq);
    free(m);
}

static void capsule_free(PyObject *cap) { model_free((Model *)PyCapsule_GetPointer(cap, "lmforge.decode.Model")); }

static int grow(Model *m, int B, int L) {
    int H = m->H, K = m->K, D = m->D, FC = m->mlp == MLP_SWIGLU ? 2 * m->F : m->F;
    if (B > m->cap) {
        int c = B > 2 * m->cap ? B : 2 * m->cap;
        free(m->x), free(m->h), free(m->qkv), free(m->att), free(m->ff), free(m->act), free(m->xq);
        m->x = malloc(sizeof(float) * c * m->C);
        m->h = malloc(sizeof(float) * c * m->C);
        m->qkv = malloc(sizeof(float) * c * (H + 2 * K) * D);
        m->att = malloc(sizeof(float) * c * H * D);
        m->ff = malloc(sizeof(float) * c * FC);
        m->act = malloc(sizeof(float) * c * m->F);
        int wide = m->C > H * D ? m->C : H * D;
        wide = wide > m->F ? wide : m->F;
        m->xq = malloc(sizeof(float) * c * wide * 2); /* rows, then (for 4-bit) lane sums: at most I / 4 per row */
        m->cap = c;
        if (!m->x || !m->h || !m->qkv || !m->att || !m->ff || !m->act || !m->xq) return -1;
    }
    if (L > m->score_cap) {
        int c = L > 2 * m->score_cap ? L : 2 * m->score_cap;
        free(m->scores);
        m->scores = malloc(sizeof(float) * (size_t)c * MAX_THREADS);
        m->score_cap = c;
        if (!m->scores) return -1;
    }
    return 0;
}

#define PTR(o) ((const float *)(uintptr_t)PyLong_AsUnsignedLongLong(o))

/* a quantized weight (kind, G, w, scales, zeros, perm, bias, zc) for an input width I, checked */
static int lin_parse(PyObject *e, Lin *L, int I, const char *where) {
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 8) {
        PyErr_Format(PyExc_ValueError, "%s: a quantized weight is (kind, group, w, scales, zeros, perm, bias, zc)",
                     where);
        return -1;
    }
    int kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(e, 0)), G = (int)PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
    if (PyErr_Occurred()) return -1;
    int step = kind == W_Q4 ? 32 : 8;
    if ((kind != W_I8 && kind != W_Q4) || G <= 0 || G % step || I % G) {
        PyErr_Format(PyExc_ValueError, "%s: weight kind %d with groups of %d columns over %d inputs: expected kind 1 "
                     "(int8) or 2 (4-bit) and a group that divides the inputs, a multiple of %d", where, kind, G, I, step);
        return -1;
    }
    L->kind = kind;
    L->G = G;
    L->w = PTR(PyTuple_GET_ITEM(e, 2));
    L->scales = PTR(PyTuple_GET_ITEM(e, 3));
    L->zeros = kind == W_Q4 ? PTR(PyTuple_GET_ITEM(e, 4)) : NULL;
    L->perm = (const int64_t *)PTR(PyTuple_GET_ITEM(e, 5));
    L->bias = PTR(PyTuple_GET_ITEM(e, 6));
    L->zc = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(e, 7));
    if (PyErr_Occurred()) return -1;
    if (!L->w || !L->scales) {
        PyErr_Format(PyExc_ValueError, "%s: a quantized weight needs its codes and scales", where);
        return -1;
    }
    return 0;
}

/* new(ints, floats, globals, layers) -> capsule
 *   ints = (V, C, L, H, K, D, F, norm, mlp, pos, window, rope_len, max_pos)
 *   floats = (eps, softcap)
 *   globals = (tok_emb, pos_emb, norm_w, norm_b, head_w, rope_cos, rope_sin): addresses, 0 = none
 *   layers = one 14-tuple of addresses per block (see Layer)
 *   quant (optional) = 4 * L + 1 entries, per layer qkv, proj, fc, mlp proj, then the head: None (the float32
 *       weight in layers/globals) or (kind, group, w, scales, zeros, perm, bias, zc): addresses but zc (see Lin; 0 = none;
 *       the head's bias is ignored) */
static PyObject *py_new(PyObject *mod, PyObject *args) {
    PyObject *ints, *floats, *globs, *layers, *quant = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!O!|O!", &PyTuple_Type, &ints, &PyTuple_Type, &floats, &PyTuple_Type, &globs,
                          &PyTuple_Type, &layers, &PyTuple_Type, &quant))
        return NULL;
    if (PyTuple_GET_SIZE(ints) != 13 || PyTuple_GET_SIZE(floats) != 2 || PyTuple_GET_SIZE(globs) != 7) {
        PyErr_SetString(PyExc_ValueError, "_decode.new: wrong tuple sizes");
        return NULL;
    }
    Model *m = calloc(1, sizeof(Model));
    if (!m) return PyErr_NoMemory();
    int *f[] = {&m->V, &m->C, &m->L, &m->H, &m->K, &m->D, &m->F, &m->norm, &m->mlp, &m->pos, &m->window,
                &m->rope_len, &m->max_pos};
    for (int i = 0; i < 13; i++) *f[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(ints, i));
    m->eps = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(floats, 0));
    m->softcap = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(floats, 1));
    const float **g[] = {&m->tok_emb, &m->pos_emb, &m->norm_w, &m->norm_b, &m->head_w, &m->rope_cos, &m->rope_sin};
    for (int i = 0; i < 7; i++) *g[i] = PTR(PyTuple_GET_ITEM(globs, i));
    if (PyTuple_GET_SIZE(layers) != m->L || m->H % m->K) {
        model_free(m);
        PyErr_SetString(PyExc_ValueError, "_decode.new: layers do not match the config");
        return NULL;
    }
    m->layers = calloc(m->L, sizeof(Layer));
    for (int l = 0; l < m->L; l++) {
        PyObject *t = PyTuple_GET_ITEM(layers, l);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 14) {
            model_free(m);
            PyErr_SetString(PyExc_ValueError, "_decode.new: a layer is a 14-tuple of addresses");
            return NULL;
        }
        const float **p = (const float **)&m->layers[l];
        for (int i = 0; i < 14; i++) p[i] = PTR(PyTuple_GET_ITEM(t, i));
        Layer *ly = &m->layers[l];
        ly->qkv = (Lin){W_F32, 0, ly->qkv_w, NULL, NULL, ly->qkv_b, NULL, 0.f};
        ly->proj = (Lin){W_F32, 0, ly->proj_w, NULL, NULL, ly->proj_b, NULL, 0.f};
        ly->fc = (Lin){W_F32, 0, ly->fc_w, NULL, NULL, ly->fc_b, NULL, 0.f};
        ly->mlp_proj = (Lin){W_F32, 0, ly->mlp_proj_w, NULL, NULL, ly->mlp_proj_b, NULL, 0.f};
    }
    m->head = (Lin){W_F32, 0, m->head_w, NULL, NULL, NULL, NULL, 0.f};
    if (quant && !PyErr_Occurred()) { /* per layer qkv, proj, fc, mlp proj, then the head: None or a quantized weight */
        const int FC = m->mlp == MLP_SWIGLU ? 2 * m->F : m->F, HD = m->H * m->D;
        if (PyTuple_GET_SIZE(quant) != 4 * m->L + 1) {
            model_free(m);
            PyErr_SetString(PyExc_ValueError, "_decode.new: quant is one entry per linear (4 per layer, then the head)");
            return NULL;
        }
        for (int i = 0; i < 4 * m->L + 1; i++) {
            PyObject *e = PyTuple_GET_ITEM(quant, i);
            if (e == Py_None) continue;
            Lin *L = i == 4 * m->L ? &m->head : i % 4 == 0 ? &m->layers[i / 4].qkv : i % 4 == 1 ? &m->layers[i / 4].proj
                     : i % 4 == 2 ? &m->layers[i / 4].fc : &m->layers[i / 4].mlp_proj;
            int I = i == 4 * m->L ? m->C : i % 4 == 0 ? m->C : i % 4 == 1 ? HD : i % 4 == 2 ? m->C : m->F;
            (void)FC;
            if (lin_parse(e, L, I, "_decode.new")) {
                model_free(m);
                return NULL;
            }
            if (i == 4 * m->L) L->bias = NULL;
        }
    }
    if (PyErr_Occurred() || grow(m, 1, 256)) {
        model_free(m);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    if (use_avx2 < 0) use_avx2 = has_avx2();
    return PyCapsule_New(m, "lmforge.decode.Model", capsule_free);
}

/* set_cache(model, k_addrs, v_addrs, block_stride, block_size): where each layer's keys and values
 * live; block b, head h, offset o is at base + b * block_stride + (h * block_size + o) * D */
static PyObject *py_set_cache(PyObject *mod, PyObject *args) {
    PyObject *cap, *ks, *vs;
    long bstride;
    int bs;
    if (!PyArg_ParseTuple(args, "OO!O!li", &cap, &PyTuple_Type, &ks, &PyTuple_Type, &vs, &bstride, &bs)) return NULL;
    Model *m = PyCapsule_GetPointer(cap, "lmforge.decode.Model");
    if (!m) return NULL;
    if (PyTuple_GET_SIZE(ks) != m->L || PyTuple_GET_SIZE(vs) != m->L) {
        PyErr_SetString(PyExc_ValueError, "set_cache: one address per layer");
        return NULL;
    }
    for (int l = 0; l < m->L; l++) {
        m->layers[l].k_cache = (float *)PTR(PyTuple_GET_ITEM(ks, l));
        m->layers[l].v_cache = (float *)PTR(PyTuple_GET_ITEM(vs, l));
    }
    m->bstride = bstride;
    m->bs = bs;
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* step(model, B, tokens_addr (int64), pos_addr (int32), tables_addr (int32), max_blocks, logits_addr, threads
 *      [, heads_addr (int32), n_heads]): logits (B, V), or (n_heads, V) of rows heads[0..n_heads) when
 * heads_addr is not 0 (rows of one sequence at consecutive positions in one call: a prefill chunk; each
 * row's key and value are written before any row attends) */
static PyObject *py_step(PyObject *mod, PyObject *args) {
    PyObject *cap;
    int B, max_blocks, threads, n_heads = 0;
    unsigned long long tp, pp, tb, lp, hp = 0;
    if (!PyArg_ParseTuple(args, "OiKKKiKi|Ki", &cap, &B, &tp, &pp, &tb, &max_blocks, &lp, &threads, &hp, &n_heads))
        return NULL;
    const int32_t *heads = (const int32_t *)(uintptr_t)hp;
    if (heads)
        for (int i = 0; i < n_heads; i++)
            if (heads[i] < 0 || heads[i] >= B) {
                PyErr_Format(PyExc_ValueError, "logits row %d is outside the batch of %d rows", heads[i], B);
                return NULL;
            }
    Model *m = PyCapsule_GetPointer(cap, "lmforge.decode.Model");
    if (!m) return NULL;
    const int64_t *tokens = (const int64_t *)(uintptr_t)tp;
    const int32_t *pos = (const int32_t *)(uintptr_t)pp;
    int maxp = 0;
    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->V) {
            PyErr_Format(PyExc_ValueError, "token id %lld is outside the vocabulary of %d", (long long)tokens[b], m->V);
            return NULL;
        }
        if (pos[b] < 0 || pos[b] >= m->max_pos || (m->pos == POS_ROPE && pos[b] >= m->rope_len)) {
            PyErr_Format(PyExc_ValueError, "position %d is beyond the model's tables", pos[b]);
            return NULL;
        }
        if (pos[b] > maxp) maxp = pos[b];
    }
    if (!m->layers[0].k_cache) {
        PyErr_SetString(PyExc_RuntimeError, "step: set_cache first");
        return NULL;
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_mu);
    err = grow(m, B, maxp + 1);
    if (!err) err = pool_start(threads);
    if (!err)
        step(m, B, tokens, pos, (const int32_t *)(uintptr_t)tb, max_blocks, heads, n_heads, (float *)(uintptr_t)lp);
    pthread_mutex_unlock(&step_mu);
    Py_END_ALLOW_THREADS
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_matmul(PyObject *mod, PyObject *args) {
    unsigned long long w, bias, x, y;
    int B, I, O, threads;
    if (!PyArg_ParseTuple(args, "KKKKiiii", &w, &bias, &x, &y, &B, &I, &O, &threads)) return NULL;
    if (use_avx2 < 0) use_avx2 = has_avx2();
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_mu);
    pool_start(threads);
    matmul((const float *)(uintptr_t)w, (const float *)(uintptr_t)bias, (const float *)(uintptr_t)x,
           (float *)(uintptr_t)y, B, I, O);
    pthread_mutex_unlock(&step_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* qmatmul((kind, group, w, scales, zeros, perm, bias, zc), X, Y, B, I, O, threads): Y = X W^T + bias for a quantized
 * weight, through the kernels of the step (addresses) */
static PyObject *py_qmatmul(PyObject *mod, PyObject *args) {
    PyObject *e;
    unsigned long long x, y;
    int B, I, O, threads;
    if (!PyArg_ParseTuple(args, "OKKiiii", &e, &x, &y, &B, &I, &O, &threads)) return NULL;
    Lin L;
    if (lin_parse(e, &L, I, "_decode.qmatmul")) return NULL;
    if (use_avx2 < 0) use_avx2 = has_avx2();
    Model m;
    memset(&m, 0, sizeof m);
    m.xq = malloc(sizeof(float) * (size_t)(B > 0 ? B : 1) * I * 2);
    if (!m.xq) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_mu);
    pool_start(threads);
    lin_matmul(&m, &L, (const float *)(uintptr_t)x, (float *)(uintptr_t)y, B, I, O);
    pthread_mutex_unlock(&step_mu);
    Py_END_ALLOW_THREADS
    free(m.xq);
    Py_RETURN_NONE;
}

/* simd(flag=-1) -> bool: whether the AVX2+FMA kernels run; flag 0/1 switches to the plain / AVX2 ones (1 only
 * where the CPU has them), for the tests that check the plain build against the same references */
static PyObject *py_simd(PyObject *mod, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
    pthread_mutex_lock(&step_mu);
    if (use_avx2 < 0) use_avx2 = has_avx2();
    if (flag == 0) use_avx2 = 0;
    else if (flag > 0) use_avx2 = has_avx2();
    int now = use_avx2;
    pthread_mutex_unlock(&step_mu);
    return PyBool_FromLong(now);
}

static PyMethodDef methods[] = {
    {"simd", py_simd, METH_VARARGS, "simd(flag=-1) -> bool: the AVX2 kernels in use (0: plain C, 1: AVX2 if present)"},
    {"qmatmul", py_qmatmul, METH_VARARGS,
     "qmatmul((kind, group, w, scales, zeros, perm, bias, zc), X, Y, B, I, O, threads): Y = X W^T + bias (addresses)"},

    {"new", py_new, METH_VARARGS, "new(ints, floats, globals, layers) -> model capsule"},
    {"set_cache", py_set_cache, METH_VARARGS, "set_cache(model, k_addrs, v_addrs, block_stride, block_size)"},
    {"step", py_step, METH_VARARGS,
     "step(model, B, tokens, positions, tables, max_blocks, logits, threads[, heads, n_heads]): one step (addresses)"},
    {"matmul", py_matmul, METH_VARARGS, "matmul(W, bias, X, Y, B, I, O, threads): Y = X W^T + bias (addresses)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) {
    pthread_atfork(NULL, NULL, after_fork_child);
    return PyModule_Create(&moddef);
}
