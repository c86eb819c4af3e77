/* Run a C kernel on PyTorch's own OpenMP thread team.
 *
 * After each parallel operator, PyTorch's OpenMP worker threads spin for a while
 * waiting for the next one. Threads of our own (a Python pool, pthreads) then
 * compete with spinning workers for the same cores: measured on 2 cores, the
 * attention kernel ran 2x slower inside a training step than alone. So the
 * kernels here hand their work to the OpenMP runtime PyTorch has already loaded
 * (libgomp, or LLVM/Intel OpenMP through their GOMP_* entry points), found with
 * dl_iterate_phdr and called through GOMP_parallel, the entry point gcc emits for
 * `#pragma omp parallel`: the same spinning workers pick the work up at once.
 * Without a loaded OpenMP runtime (or with LMFORGE_NO_OPENMP=1) it falls back to pthreads.
 *
 * Include after `#define _GNU_SOURCE` and before any other header.
 */
#ifndef LMFORGE_PARALLEL_H
#define LMFORGE_PARALLEL_H
#include <pthread.h>
#if defined(__linux__) || defined(__FreeBSD__)
#include <dlfcn.h>
#include <link.h>
#define PAR_FIND_OPENMP 1
#else /* macOS and others: no dl_iterate_phdr here; pthreads */
#define PAR_FIND_OPENMP 0
#endif
#include <stdlib.h>
#include <string.h>

typedef void (*par_fn)(void *job, int tid, int nthreads); /* does share tid of nthreads */

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_t)(void);
static gomp_parallel_t par_gomp;
static omp_int_t par_tid, par_nt;
static int par_state = -1; /* -1 not looked up yet, 0 none, 1 found */

#if PAR_FIND_OPENMP
static int par_find(struct dl_phdr_info *info, size_t size, void *out) {
    const char *n = info->dlpi_name;
    (void)size;
    if (n && (strstr(n, "libgomp") || strstr(n, "libiomp") || strstr(n, "libomp"))) {
        strncpy((char *)out, n, 4095);
        return 1;
    }
    return 0;
}

#endif

/* call with the GIL held (the lookup runs once) */
static int par_init(void) {
    if (par_state >= 0) return par_state;
#if !PAR_FIND_OPENMP
    par_state = 0;
    return 0;
#else
    char path[4096] = {0};
    par_state = 0;
    const char *off = getenv("LMFORGE_NO_OPENMP");
    if (off && strcmp(off, "1") == 0) return 0;
    dl_iterate_phdr(par_find, path);
    if (!path[0]) return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) return 0;
    par_gomp = (gomp_parallel_t)dlsym(h, "GOMP_parallel");
    par_tid = (omp_int_t)dlsym(h, "omp_get_thread_num");
    par_nt = (omp_int_t)dlsym(h, "omp_get_num_threads");
    par_state = par_gomp && par_tid && par_nt;
    return par_state;
#endif
}

typedef struct {
    par_fn fn;
    void *job;
    int tid, nt;
} par_call;

static void par_omp_body(void *p) {
    par_call *c = (par_call *)p;
    c->fn(c->job, par_tid(), par_nt());
}

static void *par_thread_body(void *p) {
    par_call *c = (par_call *)p;
    c->fn(c->job, c->tid, c->nt);
    return NULL;
}

/* fn(job, t, n) for t < n, n <= nthreads, on n threads (the caller's among them); the GIL may be released */
static void par_run(par_fn fn, void *job, int nthreads) {
    if (nthreads <= 1) {
        fn(job, 0, 1);
        return;
    }
    if (par_state == 1) {
        par_call c = {fn, job, 0, 0};
        par_gomp(par_omp_body, &c, (unsigned)nthreads, 0);
        return;
    }
    enum { MAXT = 64 };
    pthread_t th[MAXT];
    par_call calls[MAXT];
    int n = nthreads < MAXT ? nthreads : MAXT, started = 1;
    for (int t = 0; t < n; t++) calls[t] = (par_call){fn, job, t, n};
    for (int t = 1; t < n; t++) {
        if (pthread_create(&th[t], NULL, par_thread_body, &calls[t]) != 0) break;
        started++;
    }
    if (started < n) { /* could not start them all: the caller does the rest */
        for (int t = started; t < n; t++) fn(job, t, n);
    }
    fn(job, 0, n);
    for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
}

/* the share [lo, hi) of n items for thread t of nt */
static inline void par_share(long n, int t, int nt, long *lo, long *hi) {
    long step = (n + nt - 1) / nt;
    *lo = (long)t * step < n ? (long)t * step : n;
    *hi = *lo + step < n ? *lo + step : n;
}
#endif
