/* lmforge tokenizer hot loops in C.
 *
 * What this file knows: UTF-8, the GPT-2 and cl100k pre-tokenization rules
 * (hand-written matchers that give the same chunks as the regexes in
 * pretokenize.py), BPE merging over a pair table, the BPE training merge
 * loop, and Unigram lattices (Viterbi in float32 as sentencepiece does,
 * forward-backward for EM). What it does not know: files, special tokens,
 * vocabularies' meaning. Every function has a pure-Python twin in the
 * package, which is the readable reference; tests check that both agree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_unicode_tables.h"

#define CL_L 1
#define CL_N 2
#define CL_S 4

/* ------------------------------------------------------------------ UTF-8 */

static inline uint32_t dec_utf8(const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int *len) {
    unsigned char c = s[i];
    if (c < 0x80) { *len = 1; return c; }
    if ((c >> 5) == 6 && i + 1 < n) { *len = 2; return ((c & 0x1F) << 6) | (s[i + 1] & 0x3F); }
    if ((c >> 4) == 14 && i + 2 < n) {
        *len = 3; return ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    }
    if ((c >> 3) == 30 && i + 3 < n) {
        *len = 4;
        return ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
    }
    *len = 1; return 0xFFFD;
}

static inline int ucls(uint32_t cp) {
    if (cp >= 0x110000) return 0;
    return lmf_cls_blocks[lmf_cls_index[cp >> 8]][cp & 0xFF];
}

/* character at byte i: class and length; at end: class -1 */
typedef struct { const unsigned char *s; Py_ssize_t n; } Text;

static inline int cls_at(const Text *t, Py_ssize_t i, uint32_t *cp, int *len) {
    if (i >= t->n) { *len = 0; *cp = 0; return -1; }
    *cp = dec_utf8(t->s, t->n, i, len);
    return ucls(*cp);
}

/* ------------------------------------------------------ pre-tokenization */
/* Each matcher returns the byte length of the chunk starting at i (> 0). */

static Py_ssize_t ws_rule(const Text *t, Py_ssize_t i, int cl100k) {
    /* whitespace run starting at i */
    Py_ssize_t j = i, last_nl = -1, prev = i;
    int nchars = 0, len; uint32_t cp;
    while (1) {
        int c = cls_at(t, j, &cp, &len);
        if (c < 0 || !(c & CL_S)) break;
        if (cp == '\r' || cp == '\n') last_nl = j + len;
        prev = j; j += len; nchars++;
    }
    if (j >= t->n) return j - i;                 /* \s++$ */
    if (cl100k && last_nl > 0) return last_nl - i; /* \s*[\r\n] */
    if (nchars >= 2) return prev - i;            /* \s+(?!\S) */
    return j - i;                                /* \s */
}

static inline int is_contraction(const Text *t, Py_ssize_t i, int ci) {
    /* i points at the apostrophe; returns length in bytes of the contraction or 0 */
    int len; uint32_t a, b;
    if (cls_at(t, i + 1, &a, &len) < 0) return 0;
    if (ci) {
        if (a == 's' || a == 'S' || a == 'd' || a == 'D' || a == 'm' || a == 'M' || a == 't' || a == 'T')
            return 2;
        if (a == 0x17F) return 3; /* long s folds to s */
    } else if (a == 's' || a == 'd' || a == 'm' || a == 't') return 2;
    if (a >= 0x80) return 0;
    int len2;
    if (cls_at(t, i + 2, &b, &len2) < 0) return 0;
    if (ci) { a |= 0x20; b = (b < 0x80) ? (b | 0x20) : b; }
    if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return 3;
    if (ci && a == 'l' && b == 0x17F) return 0;
    return 0;
}

static Py_ssize_t run_of(const Text *t, Py_ssize_t j, int mask, int want) {
    int len; uint32_t cp;
    while (1) {
        int c = cls_at(t, j, &cp, &len);
        if (c < 0) break;
        if (((c & mask) != 0) != want) break;
        j += len;
    }
    return j;
}

/* "other": not whitespace, not letter, not number */
static Py_ssize_t run_other(const Text *t, Py_ssize_t j) {
    int len; uint32_t cp;
    while (1) {
        int c = cls_at(t, j, &cp, &len);
        if (c < 0 || (c & (CL_L | CL_N | CL_S))) break;
        j += len;
    }
    return j;
}

static Py_ssize_t match_cl100k(const Text *t, Py_ssize_t i) {
    int len0, len1; uint32_t c0, c1;
    int k0 = cls_at(t, i, &c0, &len0);
    if (c0 == '\'') { int k = is_contraction(t, i, 1); if (k) return k; }
    if (k0 & CL_L) return run_of(t, i, CL_L, 1) - i;
    int k1 = cls_at(t, i + len0, &c1, &len1);
    if (c0 != '\r' && c0 != '\n' && !(k0 & CL_N) && k1 >= 0 && (k1 & CL_L))
        return run_of(t, i + len0, CL_L, 1) - i;
    if (k0 & CL_N) {
        Py_ssize_t j = i + len0; int n = 1; uint32_t cp; int len;
        while (n < 3) { int c = cls_at(t, j, &cp, &len); if (c < 0 || !(c & CL_N)) break; j += len; n++; }
        return j - i;
    }
    Py_ssize_t j = -1;
    if (c0 == ' ' && k1 >= 0 && !(k1 & (CL_L | CL_N | CL_S))) j = run_other(t, i + 1);
    else if (!(k0 & (CL_L | CL_N | CL_S))) j = run_other(t, i);
    if (j > 0) {
        while (j < t->n && (t->s[j] == '\r' || t->s[j] == '\n')) j++;
        return j - i;
    }
    return ws_rule(t, i, 1);
}

static Py_ssize_t match_gpt2(const Text *t, Py_ssize_t i) {
    int len0, len1; uint32_t c0, c1;
    int k0 = cls_at(t, i, &c0, &len0);
    if (c0 == '\'') { int k = is_contraction(t, i, 0); if (k) return k; }
    Py_ssize_t s = i; int k = k0;
    if (c0 == ' ') {
        int k1 = cls_at(t, i + 1, &c1, &len1);
        if (k1 >= 0 && !(k1 & CL_S)) { s = i + 1; k = k1; }
    }
    if (k & CL_L) return run_of(t, s, CL_L, 1) - i;
    if (k & CL_N) return run_of(t, s, CL_N, 1) - i;
    if (!(k & CL_S)) return run_other(t, s) - i;
    return ws_rule(t, i, 0);
}

typedef Py_ssize_t (*matcher_fn)(const Text *, Py_ssize_t);

static matcher_fn get_matcher(int pid) {
    if (pid == 1) return match_gpt2;
    if (pid == 2) return match_cl100k;
    return NULL;
}

/* ------------------------------------------------------ hash maps */

static inline uint64_t hash_bytes(const unsigned char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h ^ (h >> 29);
}

static inline uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

/* u64 -> u64 map, open addressing; key UINT64_MAX = empty */
typedef struct { uint64_t *keys, *vals; size_t cap; size_t size; } U64Map;

static int u64map_init(U64Map *m, size_t n) {
    size_t cap = 16; while (cap < n * 2 + 16) cap <<= 1;
    m->keys = malloc(cap * sizeof(uint64_t)); m->vals = malloc(cap * sizeof(uint64_t));
    if (!m->keys || !m->vals) return -1;
    memset(m->keys, 0xFF, cap * sizeof(uint64_t));
    m->cap = cap; m->size = 0; return 0;
}
static void u64map_free(U64Map *m) { free(m->keys); free(m->vals); m->keys = m->vals = NULL; }
static int u64map_grow(U64Map *m);
static inline uint64_t *u64map_slot(U64Map *m, uint64_t k, int insert) {
    size_t mask = m->cap - 1, i = hash_u64(k) & mask;
    while (m->keys[i] != UINT64_MAX) {
        if (m->keys[i] == k) return &m->vals[i];
        i = (i + 1) & mask;
    }
    if (!insert) return NULL;
    if ((m->size + 1) * 2 > m->cap) { if (u64map_grow(m)) return NULL; return u64map_slot(m, k, 1); }
    m->keys[i] = k; m->vals[i] = 0; m->size++;
    return &m->vals[i];
}
static int u64map_grow(U64Map *m) {
    U64Map n; if (u64map_init(&n, m->cap)) return -1;
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i] != UINT64_MAX) *u64map_slot(&n, m->keys[i], 1) = m->vals[i];
    u64map_free(m); *m = n; return 0;
}

/* bytes -> int64 map; keys stored in an arena */
typedef struct { int64_t off; int32_t len; int64_t val; uint64_t h; } BEntry;
typedef struct { BEntry *e; size_t cap, size; unsigned char *arena; size_t alen, acap; } BMap;

static int bmap_init(BMap *m, size_t n) {
    size_t cap = 16; while (cap < n * 2 + 16) cap <<= 1;
    m->e = calloc(cap, sizeof(BEntry)); if (!m->e) return -1;
    for (size_t i = 0; i < cap; i++) m->e[i].len = -1;
    m->cap = cap; m->size = 0; m->acap = 1 << 16; m->alen = 0; m->arena = malloc(m->acap);
    return m->arena ? 0 : -1;
}
static void bmap_free(BMap *m) { free(m->e); free(m->arena); m->e = NULL; m->arena = NULL; }
static inline int64_t *bmap_find(const BMap *m, const unsigned char *p, Py_ssize_t n, uint64_t h) {
    size_t mask = m->cap - 1, i = h & mask;
    while (m->e[i].len >= 0) {
        if (m->e[i].h == h && m->e[i].len == n && memcmp(m->arena + m->e[i].off, p, n) == 0) return &m->e[i].val;
        i = (i + 1) & mask;
    }
    return NULL;
}
static int bmap_grow(BMap *m) {
    size_t ncap = m->cap * 2; BEntry *ne = calloc(ncap, sizeof(BEntry)); if (!ne) return -1;
    for (size_t i = 0; i < ncap; i++) ne[i].len = -1;
    for (size_t i = 0; i < m->cap; i++) if (m->e[i].len >= 0) {
        size_t j = m->e[i].h & (ncap - 1);
        while (ne[j].len >= 0) j = (j + 1) & (ncap - 1);
        ne[j] = m->e[i];
    }
    free(m->e); m->e = ne; m->cap = ncap; return 0;
}
/* returns pointer to value; *isnew set when inserted (value 0) */
static int64_t *bmap_put(BMap *m, const unsigned char *p, Py_ssize_t n, uint64_t h, int *isnew) {
    int64_t *v = bmap_find(m, p, n, h);
    if (v) { if (isnew) *isnew = 0; return v; }
    if ((m->size + 1) * 2 > m->cap && bmap_grow(m)) return NULL;
    while (m->alen + n > m->acap) {
        m->acap *= 2; unsigned char *a = realloc(m->arena, m->acap); if (!a) return NULL; m->arena = a;
    }
    memcpy(m->arena + m->alen, p, n);
    size_t mask = m->cap - 1, i = h & mask;
    while (m->e[i].len >= 0) i = (i + 1) & mask;
    m->e[i].off = m->alen; m->e[i].len = (int32_t)n; m->e[i].val = 0; m->e[i].h = h;
    m->alen += n; m->size++;
    if (isnew) *isnew = 1;
    return &m->e[i].val;
}

/* growable int buffer */
typedef struct { int32_t *a; size_t n, cap; } IBuf;
static inline int ibuf_push(IBuf *b, int32_t v) {
    if (b->n == b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 1024; int32_t *na = realloc(b->a, nc * sizeof(int32_t));
        if (!na) return -1; b->a = na; b->cap = nc;
    }
    b->a[b->n++] = v; return 0;
}

/* ------------------------------------------------------ BPE encoder */

typedef struct {
    PyObject_HEAD
    U64Map pairs;     /* (a<<32|b) -> (prio<<32|result) */
    BMap whole;       /* token bytes -> id (whole-word shortcut), may be empty */
    int use_whole;
    int32_t byte_ids[256];
    int pattern;
} BPEObject;

static int bpe_piece(BPEObject *self, const unsigned char *p, Py_ssize_t n, IBuf *out) {
    if (self->use_whole) {
        int64_t *v = bmap_find(&self->whole, p, n, hash_bytes(p, n));
        if (v) return ibuf_push(out, (int32_t)*v);
    }
    int32_t stack_ids[128]; int32_t *ids = stack_ids;
    if (n > 128) { ids = malloc(n * sizeof(int32_t)); if (!ids) return -1; }
    Py_ssize_t m = n;
    for (Py_ssize_t i = 0; i < n; i++) ids[i] = self->byte_ids[p[i]];
    while (m > 1) {
        uint64_t best = UINT64_MAX; Py_ssize_t bi = -1;
        for (Py_ssize_t i = 0; i + 1 < m; i++) {
            uint64_t *v = u64map_slot(&self->pairs, ((uint64_t)(uint32_t)ids[i] << 32) | (uint32_t)ids[i + 1], 0);
            if (v && (*v >> 32) < (best >> 32)) { best = *v; bi = i; }
        }
        if (bi < 0) break;
        ids[bi] = (int32_t)(best & 0xFFFFFFFFu);
        memmove(ids + bi + 1, ids + bi + 2, (m - bi - 2) * sizeof(int32_t));
        m--;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < m && rc == 0; i++) rc = ibuf_push(out, ids[i]);
    if (ids != stack_ids) free(ids);
    return rc;
}

static void BPE_dealloc(BPEObject *self) {
    u64map_free(&self->pairs); bmap_free(&self->whole);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int BPE_init(BPEObject *self, PyObject *args, PyObject *kw) {
    PyObject *keys, *vals, *byte_ids, *whole; int pattern;
    if (!PyArg_ParseTuple(args, "O!O!O!O!i", &PyList_Type, &keys, &PyList_Type, &vals, &PyList_Type, &byte_ids,
                          &PyDict_Type, &whole, &pattern)) return -1;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(vals) != n || PyList_GET_SIZE(byte_ids) != 256) {
        PyErr_SetString(PyExc_ValueError, "bad BPE tables"); return -1;
    }
    if (u64map_init(&self->pairs, n)) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(keys, i));
        uint64_t v = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(vals, i));
        if (PyErr_Occurred()) return -1;
        uint64_t *slot = u64map_slot(&self->pairs, k, 1); if (!slot) { PyErr_NoMemory(); return -1; }
        *slot = v;
    }
    for (int i = 0; i < 256; i++) self->byte_ids[i] = (int32_t)PyLong_AsLong(PyList_GET_ITEM(byte_ids, i));
    if (bmap_init(&self->whole, PyDict_Size(whole))) { PyErr_NoMemory(); return -1; }
    self->use_whole = PyDict_Size(whole) > 0;
    PyObject *k, *v; Py_ssize_t pos = 0;
    while (PyDict_Next(whole, &pos, &k, &v)) {
        char *p; Py_ssize_t len;
        if (PyBytes_AsStringAndSize(k, &p, &len)) return -1;
        int64_t *slot = bmap_put(&self->whole, (unsigned char *)p, len, hash_bytes((unsigned char *)p, len), NULL);
        if (!slot) { PyErr_NoMemory(); return -1; }
        *slot = PyLong_AsLongLong(v);
    }
    self->pattern = pattern;
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *ibuf_to_list(IBuf *b) {
    PyObject *l = PyList_New(b->n); if (!l) return NULL;
    for (size_t i = 0; i < b->n; i++) PyList_SET_ITEM(l, i, PyLong_FromLong(b->a[i]));
    return l;
}

static PyObject *BPE_encode(BPEObject *self, PyObject *arg) {
    Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!s) return NULL;
    matcher_fn match = get_matcher(self->pattern);
    if (!match) { PyErr_SetString(PyExc_ValueError, "encoder has no C pre-tokenizer"); return NULL; }
    IBuf out = {0}; int rc = 0;
    Text t = {(const unsigned char *)s, n};
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < n && rc == 0) {
        Py_ssize_t k = match(&t, i);
        if (k <= 0) k = 1;
        rc = bpe_piece(self, t.s + i, k, &out);
        i += k;
    }
    Py_END_ALLOW_THREADS
    if (rc) { free(out.a); return PyErr_NoMemory(); }
    PyObject *l = ibuf_to_list(&out); free(out.a); return l;
}

static PyObject *BPE_encode_chunks(BPEObject *self, PyObject *arg) {
    if (!PyList_Check(arg)) { PyErr_SetString(PyExc_TypeError, "expected a list of str"); return NULL; }
    IBuf out = {0};
    Py_ssize_t m = PyList_GET_SIZE(arg);
    for (Py_ssize_t j = 0; j < m; j++) {
        Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(arg, j), &n);
        if (!s) { free(out.a); return NULL; }
        if (bpe_piece(self, (const unsigned char *)s, n, &out)) { free(out.a); return PyErr_NoMemory(); }
    }
    PyObject *l = ibuf_to_list(&out); free(out.a); return l;
}

static PyMethodDef BPE_methods[] = {
    {"encode", (PyCFunction)BPE_encode, METH_O, "encode(text) -> ids (C pre-tokenizer + BPE; releases the GIL)"},
    {"encode_chunks", (PyCFunction)BPE_encode_chunks, METH_O, "encode_chunks(list[str]) -> ids"},
    {NULL}};

static PyTypeObject BPEType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmforge.tokenize._native.BPE",
    .tp_basicsize = sizeof(BPEObject), .tp_flags = Py_TPFLAGS_DEFAULT, .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BPE_init, .tp_dealloc = (destructor)BPE_dealloc, .tp_methods = BPE_methods,
    .tp_doc = "BPE(pair_keys, pair_vals, byte_ids, whole_word_map, pattern_id)"};

/* split(text, pattern_id) -> list[str] (for tests) */
static PyObject *py_split(PyObject *mod, PyObject *args) {
    PyObject *text; int pid;
    if (!PyArg_ParseTuple(args, "Ui", &text, &pid)) return NULL;
    matcher_fn match = get_matcher(pid);
    if (!match) { PyErr_SetString(PyExc_ValueError, "unknown pattern id"); return NULL; }
    Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(text, &n); if (!s) return NULL;
    Text t = {(const unsigned char *)s, n};
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t k = match(&t, i); if (k <= 0) k = 1;
        PyObject *c = PyUnicode_DecodeUTF8(s + i, k, "surrogatepass");
        if (!c || PyList_Append(out, c)) { Py_XDECREF(c); Py_DECREF(out); return NULL; }
        Py_DECREF(c); i += k;
    }
    return out;
}

/* count_chunks(text, pattern_id, counts: dict[bytes,int]) */
static PyObject *py_count_chunks(PyObject *mod, PyObject *args) {
    PyObject *text, *counts; int pid;
    if (!PyArg_ParseTuple(args, "UiO!", &text, &pid, &PyDict_Type, &counts)) return NULL;
    matcher_fn match = get_matcher(pid);
    if (!match) { PyErr_SetString(PyExc_ValueError, "unknown pattern id"); return NULL; }
    Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(text, &n); if (!s) return NULL;
    BMap m; if (bmap_init(&m, 1024)) return PyErr_NoMemory();
    int rc = 0;
    Text t = {(const unsigned char *)s, n};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && rc == 0;) {
        Py_ssize_t k = match(&t, i); if (k <= 0) k = 1;
        int64_t *v = bmap_put(&m, t.s + i, k, hash_bytes(t.s + i, k), NULL);
        if (!v) rc = -1; else (*v)++;
        i += k;
    }
    Py_END_ALLOW_THREADS
    if (rc) { bmap_free(&m); return PyErr_NoMemory(); }
    for (size_t j = 0; j < m.cap; j++) {
        if (m.e[j].len < 0) continue;
        PyObject *key = PyBytes_FromStringAndSize((char *)m.arena + m.e[j].off, m.e[j].len);
        PyObject *old = PyDict_GetItemWithError(counts, key);
        long long prev = old ? PyLong_AsLongLong(old) : 0;
        PyObject *nv = PyLong_FromLongLong(prev + m.e[j].val);
        int bad = !key || !nv || PyDict_SetItem(counts, key, nv);
        Py_XDECREF(key); Py_XDECREF(nv);
        if (bad) { bmap_free(&m); return NULL; }
    }
    bmap_free(&m);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------ BPE training */

typedef struct { int64_t count; int32_t a, b; } HeapItem;
typedef struct {
    unsigned char **tok; int32_t *toklen; int32_t ntok, captok;
} Vocab;

static int tok_cmp(const Vocab *v, int32_t x, int32_t y) {
    int32_t lx = v->toklen[x], ly = v->toklen[y];
    int c = memcmp(v->tok[x], v->tok[y], lx < ly ? lx : ly);
    if (c) return c;
    return (lx > ly) - (lx < ly);
}
/* heap order: higher count first; ties: smaller (tok[a], tok[b]) first */
static int heap_better(const Vocab *v, const HeapItem *x, const HeapItem *y) {
    if (x->count != y->count) return x->count > y->count;
    int c = tok_cmp(v, x->a, y->a); if (c) return c < 0;
    return tok_cmp(v, x->b, y->b) < 0;
}
typedef struct { HeapItem *a; size_t n, cap; } Heap;
static int heap_push(Heap *h, const Vocab *v, HeapItem it) {
    if (h->n == h->cap) {
        size_t nc = h->cap ? h->cap * 2 : 4096; HeapItem *na = realloc(h->a, nc * sizeof(HeapItem));
        if (!na) return -1; h->a = na; h->cap = nc;
    }
    size_t i = h->n++; h->a[i] = it;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_better(v, &h->a[i], &h->a[p])) break;
        HeapItem t = h->a[i]; h->a[i] = h->a[p]; h->a[p] = t; i = p;
    }
    return 0;
}
static HeapItem heap_pop(Heap *h, const Vocab *v) {
    HeapItem top = h->a[0]; h->a[0] = h->a[--h->n];
    size_t i = 0;
    while (1) {
        size_t l = 2 * i + 1, r = l + 1, b = i;
        if (l < h->n && heap_better(v, &h->a[l], &h->a[b])) b = l;
        if (r < h->n && heap_better(v, &h->a[r], &h->a[b])) b = r;
        if (b == i) break;
        HeapItem t = h->a[i]; h->a[i] = h->a[b]; h->a[b] = t; i = b;
    }
    return top;
}

/* per-pair record: count and list of words (may hold stale entries and duplicates) */
typedef struct { int64_t count; int32_t *words; int32_t nw, cw; } PairRec;

static PyObject *py_bpe_train(PyObject *mod, PyObject *args) {
    PyObject *words, *freqs, *progress; long n_merges, min_freq;
    if (!PyArg_ParseTuple(args, "O!O!llO", &PyList_Type, &words, &PyList_Type, &freqs, &n_merges, &min_freq,
                          &progress)) return NULL;
    Py_ssize_t nw = PyList_GET_SIZE(words);
    int32_t **seq = calloc(nw, sizeof(int32_t *)); int32_t *slen = calloc(nw, sizeof(int32_t));
    int64_t *wf = calloc(nw, sizeof(int64_t));
    Vocab V = {0}; V.captok = 256 + (int32_t)n_merges + 16;
    V.tok = calloc(V.captok, sizeof(unsigned char *)); V.toklen = calloc(V.captok, sizeof(int32_t));
    U64Map pidx; Heap heap = {0}; PairRec *recs = NULL; size_t nrec = 0, caprec = 0;
    BMap tokmap; PyObject *result = NULL;
    IBuf merges = {0};
    if (!seq || !slen || !wf || !V.tok || !V.toklen || u64map_init(&pidx, 1 << 16) || bmap_init(&tokmap, V.captok)) {
        PyErr_NoMemory(); goto done;
    }
    for (int b = 0; b < 256; b++) {
        V.tok[b] = malloc(1); V.tok[b][0] = (unsigned char)b; V.toklen[b] = 1;
        unsigned char c = (unsigned char)b; *bmap_put(&tokmap, &c, 1, hash_bytes(&c, 1), NULL) = b;
    }
    V.ntok = 256;
    for (Py_ssize_t i = 0; i < nw; i++) {
        char *p; Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(words, i), &p, &len)) goto done;
        wf[i] = PyLong_AsLongLong(PyList_GET_ITEM(freqs, i));
        seq[i] = malloc((len ? len : 1) * sizeof(int32_t)); slen[i] = (int32_t)len;
        for (Py_ssize_t j = 0; j < len; j++) seq[i][j] = (unsigned char)p[j];
    }
    if (PyErr_Occurred()) goto done;

#define PAIRKEY(a, b) (((uint64_t)(uint32_t)(a) << 32) | (uint32_t)(b))
#define GETREC(a, b, out) do { \
        uint64_t *s_ = u64map_slot(&pidx, PAIRKEY(a, b), 1); if (!s_) goto oom; \
        if (*s_ == 0) { if (nrec == caprec) { caprec = caprec ? caprec * 2 : 65536; \
            PairRec *nr_ = realloc(recs, caprec * sizeof(PairRec)); if (!nr_) goto oom; recs = nr_; } \
            memset(&recs[nrec], 0, sizeof(PairRec)); *s_ = ++nrec; } \
        out = &recs[*s_ - 1]; } while (0)
#define ADDWORD(r, w) do { if ((r)->nw == (r)->cw) { (r)->cw = (r)->cw ? (r)->cw * 2 : 4; \
        int32_t *nw_ = realloc((r)->words, (r)->cw * sizeof(int32_t)); if (!nw_) goto oom; (r)->words = nw_; } \
        (r)->words[(r)->nw++] = (w); } while (0)

    for (Py_ssize_t i = 0; i < nw; i++) {
        for (int32_t j = 0; j + 1 < slen[i]; j++) {
            PairRec *r; GETREC(seq[i][j], seq[i][j + 1], r);
            r->count += wf[i];
            if (r->nw == 0 || r->words[r->nw - 1] != i) ADDWORD(r, (int32_t)i);
        }
    }
    for (size_t k = 0; k < pidx.cap; k++) {
        if (pidx.keys[k] == UINT64_MAX) continue;
        PairRec *r = &recs[pidx.vals[k] - 1];
        HeapItem it = {r->count, (int32_t)(pidx.keys[k] >> 32), (int32_t)(pidx.keys[k] & 0xFFFFFFFFu)};
        if (it.count > 0 && heap_push(&heap, &V, it)) goto oom;
    }
    long made = 0;
    int32_t *buf = NULL; size_t bufcap = 0;
    U64Map touched; if (u64map_init(&touched, 1024)) goto oom;
    while (made < n_merges && heap.n > 0) {
        HeapItem top = heap_pop(&heap, &V);
        uint64_t *slot = u64map_slot(&pidx, PAIRKEY(top.a, top.b), 0);
        if (!slot) continue;
        PairRec *pr = &recs[*slot - 1];
        if (pr->count != top.count) continue; /* stale */
        if (top.count < (min_freq > 1 ? min_freq : 1)) break;
        int32_t a = top.a, b = top.b;
        /* merged token */
        int32_t la = V.toklen[a], lb = V.toklen[b];
        unsigned char *mt = malloc(la + lb); if (!mt) goto oom;
        memcpy(mt, V.tok[a], la); memcpy(mt + la, V.tok[b], lb);
        int isnew; int64_t *tv = bmap_put(&tokmap, mt, la + lb, hash_bytes(mt, la + lb), &isnew);
        if (!tv) { free(mt); goto oom; }
        int32_t r;
        if (isnew) {
            if (V.ntok == V.captok) { free(mt); break; }
            r = V.ntok++; V.tok[r] = mt; V.toklen[r] = la + lb; *tv = r; made++;
        } else { r = (int32_t)*tv; free(mt); }
        if (ibuf_push(&merges, a) || ibuf_push(&merges, b) || ibuf_push(&merges, r)) goto oom;
        /* take the word list out of the record */
        int32_t *wl = pr->words; int32_t nwl = pr->nw;
        pr->words = NULL; pr->nw = pr->cw = 0;
        touched.size = 0; memset(touched.keys, 0xFF, touched.cap * sizeof(uint64_t));
        for (int32_t q = 0; q < nwl; q++) {
            int32_t w = wl[q];
            if (q > 0 && wl[q - 1] == w) continue;
            int32_t *s = seq[w]; int32_t n = slen[w];
            int has = 0;
            for (int32_t j = 0; j + 1 < n; j++) if (s[j] == a && s[j + 1] == b) { has = 1; break; }
            if (!has) continue;
            for (int32_t j = 0; j + 1 < n; j++) {
                PairRec *x; GETREC(s[j], s[j + 1], x); x->count -= wf[w];
                uint64_t *tt = u64map_slot(&touched, PAIRKEY(s[j], s[j + 1]), 1); if (!tt) goto oom;
            }
            if ((size_t)n > bufcap) { bufcap = n * 2; int32_t *nb = realloc(buf, bufcap * sizeof(int32_t)); if (!nb) goto oom; buf = nb; }
            int32_t m = 0;
            for (int32_t j = 0; j < n;) {
                if (j + 1 < n && s[j] == a && s[j + 1] == b) { buf[m++] = r; j += 2; }
                else buf[m++] = s[j++];
            }
            memcpy(s, buf, m * sizeof(int32_t)); slen[w] = m;
            for (int32_t j = 0; j + 1 < m; j++) {
                PairRec *x; GETREC(s[j], s[j + 1], x); x->count += wf[w];
                if (x->nw == 0 || x->words[x->nw - 1] != w) ADDWORD(x, w);
                uint64_t *tt = u64map_slot(&touched, PAIRKEY(s[j], s[j + 1]), 1); if (!tt) goto oom;
            }
        }
        free(wl);
        pr = &recs[*u64map_slot(&pidx, PAIRKEY(a, b), 0) - 1];
        pr->count = 0;
        for (size_t k = 0; k < touched.cap; k++) {
            if (touched.keys[k] == UINT64_MAX) continue;
            uint64_t key = touched.keys[k];
            PairRec *x = &recs[*u64map_slot(&pidx, key, 0) - 1];
            if (x->count > 0) {
                HeapItem it = {x->count, (int32_t)(key >> 32), (int32_t)(key & 0xFFFFFFFFu)};
                if (heap_push(&heap, &V, it)) goto oom;
            }
        }
        if (progress != Py_None && (made % 256 == 0)) {
            PyObject *rr = PyObject_CallFunction(progress, "l", made);
            if (!rr) goto done; Py_DECREF(rr);
        }
    }
    u64map_free(&touched); free(buf);
    if (progress != Py_None) { PyObject *rr = PyObject_CallFunction(progress, "l", made); Py_XDECREF(rr); }
    {
        PyObject *ml = PyList_New(merges.n / 3), *tl = PyList_New(V.ntok);
        for (size_t k = 0; k < merges.n / 3; k++)
            PyList_SET_ITEM(ml, k, Py_BuildValue("(iii)", merges.a[3 * k], merges.a[3 * k + 1], merges.a[3 * k + 2]));
        for (int32_t k = 0; k < V.ntok; k++)
            PyList_SET_ITEM(tl, k, PyBytes_FromStringAndSize((char *)V.tok[k], V.toklen[k]));
        result = Py_BuildValue("(NN)", ml, tl);
    }
    goto done;
oom:
    PyErr_NoMemory();
done:
    for (Py_ssize_t i = 0; i < nw; i++) if (seq) free(seq[i]);
    free(seq); free(slen); free(wf);
    if (V.tok) for (int32_t k = 0; k < V.ntok; k++) free(V.tok[k]);
    free(V.tok); free(V.toklen);
    for (size_t k = 0; k < nrec; k++) free(recs[k].words);
    free(recs); free(heap.a); free(merges.a);
    u64map_free(&pidx); bmap_free(&tokmap);
    return result;
}

/* ------------------------------------------------------ Unigram */

/* piece table: bytes -> index into ids/scores */
typedef struct {
    PyObject_HEAD
    BMap map;
    int32_t *ids; float *scores; unsigned char *user;
    int32_t n;
    int32_t max_bytes, unk_id;
    float unk_score, max_score;
} UniObject;

static void Uni_dealloc(UniObject *self) {
    bmap_free(&self->map); free(self->ids); free(self->scores); free(self->user);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Unigram(pieces: list[bytes], ids: list[int], scores: list[float], user: list[bool], unk_id, unk_score, max_score) */
static int Uni_init(UniObject *self, PyObject *args, PyObject *kw) {
    PyObject *pieces, *ids, *scores, *user; int unk; float unk_score, max_score;
    if (!PyArg_ParseTuple(args, "O!O!O!O!iff", &PyList_Type, &pieces, &PyList_Type, &ids, &PyList_Type, &scores,
                          &PyList_Type, &user, &unk, &unk_score, &max_score)) return -1;
    Py_ssize_t n = PyList_GET_SIZE(pieces);
    self->n = (int32_t)n;
    self->ids = malloc((n + 1) * sizeof(int32_t)); self->scores = malloc((n + 1) * sizeof(float));
    self->user = malloc(n + 1);
    if (!self->ids || !self->scores || !self->user || bmap_init(&self->map, n)) { PyErr_NoMemory(); return -1; }
    self->max_bytes = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        char *p; Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(pieces, i), &p, &len)) return -1;
        self->ids[i] = (int32_t)PyLong_AsLong(PyList_GET_ITEM(ids, i));
        self->scores[i] = (float)PyFloat_AsDouble(PyList_GET_ITEM(scores, i));
        self->user[i] = (unsigned char)PyObject_IsTrue(PyList_GET_ITEM(user, i));
        int isnew; int64_t *v = bmap_put(&self->map, (unsigned char *)p, len, hash_bytes((unsigned char *)p, len), &isnew);
        if (!v) { PyErr_NoMemory(); return -1; }
        if (isnew) *v = i;
        if (len > self->max_bytes) self->max_bytes = (int32_t)len;
    }
    self->unk_id = unk; self->unk_score = unk_score; self->max_score = max_score;
    return PyErr_Occurred() ? -1 : 0;
}

static const int ONE_CHAR_LEN[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};

/* sentencepiece's optimized Viterbi: scores add in float32, ties keep the earlier start */
static int uni_viterbi(UniObject *self, const unsigned char *s, Py_ssize_t n, IBuf *out) {
    float *best = malloc((n + 1) * sizeof(float));
    int32_t *start = malloc((n + 1) * sizeof(int32_t)), *pid = malloc((n + 1) * sizeof(int32_t));
    if (!best || !start || !pid) { free(best); free(start); free(pid); return -1; }
    for (Py_ssize_t i = 0; i <= n; i++) { best[i] = 0; start[i] = -1; pid[i] = -1; }
    Py_ssize_t pos = 0;
    while (pos < n) {
        float here = best[pos];
        int mblen = ONE_CHAR_LEN[s[pos] >> 4]; if (mblen > n - pos) mblen = (int)(n - pos);
        int single = 0;
        Py_ssize_t lim = pos + self->max_bytes; if (lim > n) lim = n;
        uint64_t h = 1469598103934665603ULL;
        for (Py_ssize_t end = pos + 1; end <= lim; end++) {
            h ^= s[end - 1]; h *= 1099511628211ULL;
            int64_t *v = bmap_find(&self->map, s + pos, end - pos, h ^ (h >> 29));
            if (!v) continue;
            int32_t k = (int32_t)*v;
            int better;
            float cand;
            if (self->user[k]) {
                double c = ((float)((end - pos) * self->max_score) - 0.1) + here;
                better = start[end] == -1 || c > best[end];
                cand = (float)c;
            } else {
                cand = self->scores[k] + here;
                better = start[end] == -1 || cand > best[end];
            }
            if (better) { best[end] = cand; start[end] = (int32_t)pos; pid[end] = self->ids[k]; }
            if (end - pos == mblen) single = 1;
        }
        if (!single) {
            Py_ssize_t e = pos + mblen;
            float cand = self->unk_score + here;
            if (start[e] == -1 || cand > best[e]) { best[e] = cand; start[e] = (int32_t)pos; pid[e] = self->unk_id; }
        }
        pos += mblen;
    }
    /* backtrack: push triples in reverse, then reverse */
    size_t base = out->n;
    for (Py_ssize_t e = n; e > 0;) {
        int32_t st = start[e];
        if (ibuf_push(out, pid[e]) || ibuf_push(out, (int32_t)e) || ibuf_push(out, st)) {
            free(best); free(start); free(pid); return -1;
        }
        e = st;
    }
    size_t cnt = (out->n - base) / 3;
    for (size_t i = 0; i < cnt / 2; i++)
        for (int k = 0; k < 3; k++) {
            int32_t t = out->a[base + 3 * i + k];
            out->a[base + 3 * i + k] = out->a[base + 3 * (cnt - 1 - i) + k];
            out->a[base + 3 * (cnt - 1 - i) + k] = t;
        }
    free(best); free(start); free(pid);
    return 0;
}

static PyObject *Uni_viterbi(UniObject *self, PyObject *arg) {
    char *s; Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &s, &n)) return NULL;
    IBuf out = {0}; int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = uni_viterbi(self, (unsigned char *)s, n, &out);
    Py_END_ALLOW_THREADS
    if (rc) { free(out.a); return PyErr_NoMemory(); }
    /* triples are stored reversed as (id, end, start) */
    size_t cnt = out.n / 3;
    PyObject *l = PyList_New(cnt);
    for (size_t i = 0; i < cnt; i++)
        PyList_SET_ITEM(l, i, Py_BuildValue("(iii)", out.a[3 * i + 2], out.a[3 * i + 1], out.a[3 * i]));
    free(out.a);
    return l;
}

static PyMethodDef Uni_methods[] = {
    {"viterbi", (PyCFunction)Uni_viterbi, METH_O, "viterbi(normalized: bytes) -> [(start, end, id)]"},
    {NULL}};

static PyTypeObject UniType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lmforge.tokenize._native.Unigram",
    .tp_basicsize = sizeof(UniObject), .tp_flags = Py_TPFLAGS_DEFAULT, .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Uni_init, .tp_dealloc = (destructor)Uni_dealloc, .tp_methods = Uni_methods,
    .tp_doc = "Unigram lattice encoder"};

/* ---- Unigram training passes over words (char-based lattices) ---- */

typedef struct { BMap map; double *score; int32_t n; } PieceTable;

static int table_build(PieceTable *t, PyObject *names, PyObject *scores) {
    Py_ssize_t n = PyList_GET_SIZE(names);
    t->n = (int32_t)n; t->score = malloc((n + 1) * sizeof(double));
    if (!t->score || bmap_init(&t->map, n)) return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len; const char *p = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(names, i), &len);
        if (!p) return -1;
        int64_t *v = bmap_put(&t->map, (const unsigned char *)p, len, hash_bytes((const unsigned char *)p, len), NULL);
        if (!v) return -1;
        *v = i; t->score[i] = PyFloat_AsDouble(PyList_GET_ITEM(scores, i));
    }
    return PyErr_Occurred() ? -1 : 0;
}

static inline double lse(double a, double b) {
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    double m = a > b ? a : b;
    return m + log1p(exp(-fabs(a - b)));
}

/* node lists for one word: for each char start, (end_char, piece) */
typedef struct { int32_t *st, *en, *pc; int32_t n, cap; } Nodes;
static int nodes_push(Nodes *nd, int32_t s, int32_t e, int32_t p) {
    if (nd->n == nd->cap) {
        nd->cap = nd->cap ? nd->cap * 2 : 256;
        nd->st = realloc(nd->st, nd->cap * sizeof(int32_t)); nd->en = realloc(nd->en, nd->cap * sizeof(int32_t));
        nd->pc = realloc(nd->pc, nd->cap * sizeof(int32_t));
        if (!nd->st || !nd->en || !nd->pc) return -1;
    }
    nd->st[nd->n] = s; nd->en[nd->n] = e; nd->pc[nd->n] = p; nd->n++; return 0;
}

static int word_nodes(PieceTable *t, const unsigned char *s, Py_ssize_t nb, int max_len, int32_t *off, int32_t *nchars,
                      Nodes *nd) {
    int32_t nc = 0; Py_ssize_t i = 0;
    while (i < nb) { off[nc++] = (int32_t)i; int l = ONE_CHAR_LEN[s[i] >> 4]; i += l; }
    off[nc] = (int32_t)nb; *nchars = nc; nd->n = 0;
    for (int32_t a = 0; a < nc; a++) {
        int32_t lim = a + max_len; if (lim > nc) lim = nc;
        for (int32_t b = a + 1; b <= lim; b++) {
            const unsigned char *p = s + off[a]; Py_ssize_t len = off[b] - off[a];
            int64_t *v = bmap_find(&t->map, p, len, hash_bytes(p, len));
            if (v && nodes_push(nd, a, b, (int32_t)*v)) return -1;
        }
    }
    return 0;
}

/* unigram_estep(words: list[str], counts: list[int], names: list[str], scores: list[float], max_len)
   -> (expected: list[float], objective: float) */
static PyObject *py_unigram_estep(PyObject *mod, PyObject *args) {
    PyObject *words, *counts, *names, *scores; int max_len;
    if (!PyArg_ParseTuple(args, "O!O!O!O!i", &PyList_Type, &words, &PyList_Type, &counts, &PyList_Type, &names,
                          &PyList_Type, &scores, &max_len)) return NULL;
    PieceTable t = {0}; Nodes nd = {0};
    double *expected = NULL, *alpha = NULL, *beta = NULL; int32_t *off = NULL; size_t cap = 0;
    PyObject *res = NULL; double objective = 0;
    if (table_build(&t, names, scores)) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto done; }
    expected = calloc(t.n + 1, sizeof(double));
    Py_ssize_t nw = PyList_GET_SIZE(words);
    for (Py_ssize_t w = 0; w < nw; w++) {
        Py_ssize_t nb; const char *s = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(words, w), &nb);
        if (!s) goto done;
        double c = PyFloat_AsDouble(PyList_GET_ITEM(counts, w));
        if ((size_t)nb + 2 > cap) {
            cap = nb * 2 + 16; off = realloc(off, cap * sizeof(int32_t));
            alpha = realloc(alpha, cap * sizeof(double)); beta = realloc(beta, cap * sizeof(double));
            if (!off || !alpha || !beta) { PyErr_NoMemory(); goto done; }
        }
        int32_t nc;
        if (word_nodes(&t, (const unsigned char *)s, nb, max_len, off, &nc, &nd)) { PyErr_NoMemory(); goto done; }
        for (int32_t i = 0; i <= nc; i++) { alpha[i] = -INFINITY; beta[i] = -INFINITY; }
        alpha[0] = 0; beta[nc] = 0;
        for (int32_t k = 0; k < nd.n; k++) /* nodes are sorted by start */
            if (alpha[nd.st[k]] > -INFINITY) alpha[nd.en[k]] = lse(alpha[nd.en[k]], alpha[nd.st[k]] + t.score[nd.pc[k]]);
        for (int32_t k = nd.n - 1; k >= 0; k--)
            if (beta[nd.en[k]] > -INFINITY) beta[nd.st[k]] = lse(beta[nd.st[k]], beta[nd.en[k]] + t.score[nd.pc[k]]);
        double z = alpha[nc];
        if (z == -INFINITY) continue;
        objective += c * z;
        for (int32_t k = 0; k < nd.n; k++)
            expected[nd.pc[k]] += c * exp(alpha[nd.st[k]] + t.score[nd.pc[k]] + beta[nd.en[k]] - z);
    }
    {
        PyObject *l = PyList_New(t.n);
        for (int32_t i = 0; i < t.n; i++) PyList_SET_ITEM(l, i, PyFloat_FromDouble(expected[i]));
        res = Py_BuildValue("(Nd)", l, objective);
    }
done:
    bmap_free(&t.map); free(t.score); free(expected); free(alpha); free(beta); free(off);
    free(nd.st); free(nd.en); free(nd.pc);
    return res;
}

/* unigram_viterbi_batch(words, names, scores, max_len, exclude: list[int] | None)
   -> list of (list of piece indices | None) */
static PyObject *py_unigram_viterbi_batch(PyObject *mod, PyObject *args) {
    PyObject *words, *names, *scores, *exclude; int max_len;
    if (!PyArg_ParseTuple(args, "O!O!O!iO", &PyList_Type, &words, &PyList_Type, &names, &PyList_Type, &scores,
                          &max_len, &exclude)) return NULL;
    PieceTable t = {0}; Nodes nd = {0};
    double *best = NULL; int32_t *off = NULL, *bk = NULL; size_t cap = 0;
    PyObject *res = NULL, *out = NULL;
    if (table_build(&t, names, scores)) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto done; }
    Py_ssize_t nw = PyList_GET_SIZE(words);
    out = PyList_New(nw); if (!out) goto done;
    for (Py_ssize_t w = 0; w < nw; w++) {
        Py_ssize_t nb; const char *s = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(words, w), &nb);
        if (!s) goto done;
        long ex = -1;
        if (exclude != Py_None) ex = PyLong_AsLong(PyList_GET_ITEM(exclude, w));
        if ((size_t)nb + 2 > cap) {
            cap = nb * 2 + 16; off = realloc(off, cap * sizeof(int32_t)); bk = realloc(bk, cap * sizeof(int32_t));
            best = realloc(best, cap * sizeof(double));
            if (!off || !bk || !best) { PyErr_NoMemory(); goto done; }
        }
        int32_t nc;
        if (word_nodes(&t, (const unsigned char *)s, nb, max_len, off, &nc, &nd)) { PyErr_NoMemory(); goto done; }
        for (int32_t i = 0; i <= nc; i++) { best[i] = -INFINITY; bk[i] = -1; }
        best[0] = 0;
        for (int32_t k = 0; k < nd.n; k++) {
            if (nd.pc[k] == ex || best[nd.st[k]] == -INFINITY) continue;
            double v = best[nd.st[k]] + t.score[nd.pc[k]];
            if (v > best[nd.en[k]]) { best[nd.en[k]] = v; bk[nd.en[k]] = k; }
        }
        if (bk[nc] < 0) { Py_INCREF(Py_None); PyList_SET_ITEM(out, w, Py_None); continue; }
        int32_t cnt = 0;
        for (int32_t e = nc; e > 0; e = nd.st[bk[e]]) cnt++;
        PyObject *l = PyList_New(cnt);
        int32_t j = cnt;
        for (int32_t e = nc; e > 0; e = nd.st[bk[e]]) PyList_SET_ITEM(l, --j, PyLong_FromLong(nd.pc[bk[e]]));
        PyList_SET_ITEM(out, w, l);
    }
    res = out; out = NULL;
done:
    Py_XDECREF(out);
    bmap_free(&t.map); free(t.score); free(best); free(off); free(bk);
    free(nd.st); free(nd.en); free(nd.pc);
    return res;
}


/* ------------------------------------------------------ sentencepiece normalizer */

/* longest rule in the darts-clone double array matching s[0..n) ; returns length or 0 and *value */
static Py_ssize_t da_longest(const uint32_t *u, Py_ssize_t nu, const unsigned char *s, Py_ssize_t n, uint32_t *value) {
    size_t node = 0; uint32_t unit = u[0]; Py_ssize_t best = 0;
    node ^= (unit >> 10) << ((unit & (1u << 9)) >> 6);
    for (Py_ssize_t i = 0; i < n; i++) {
        node ^= s[i];
        if (node >= (size_t)nu) break;
        unit = u[node];
        if ((unit & ((1u << 31) | 0xFFu)) != s[i]) break;
        node ^= (unit >> 10) << ((unit & (1u << 9)) >> 6);
        if ((unit >> 8) & 1) { *value = u[node] & ((1u << 31) - 1); best = i + 1; }
    }
    return best;
}

static int valid_utf8_char(const unsigned char *s, Py_ssize_t n, int *len) {
    int l = ONE_CHAR_LEN[s[0] >> 4];
    *len = l;
    if (l > n) return 0;
    if (l == 1) return s[0] < 0x80;
    for (int k = 1; k < l; k++) if ((s[k] & 0xC0) != 0x80) return 0;
    uint32_t cp = l == 2 ? ((s[0] & 0x1F) << 6) | (s[1] & 0x3F)
                : l == 3 ? ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F)
                : ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    if ((l == 2 && cp < 0x80) || (l == 3 && cp < 0x800) || (l == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return 1;
}

/* sp_normalize(data: bytes, charsmap: bytes, flags: int, user: list[bytes]) -> bytes
   flags: 1 add_dummy_prefix, 2 remove_extra_whitespaces, 4 escape_whitespaces, 8 treat_whitespace_as_suffix */
static PyObject *py_sp_normalize(PyObject *mod, PyObject *args) {
    const unsigned char *s, *cm; Py_ssize_t n, ncm; int flags; PyObject *user;
    if (!PyArg_ParseTuple(args, "y#y#iO!", &s, &n, &cm, &ncm, &flags, &PyList_Type, &user)) return NULL;
    const uint32_t *units = NULL; Py_ssize_t nu = 0; const char *normalized = NULL; Py_ssize_t nnorm = 0;
    uint32_t *ubuf = NULL;
    if (ncm > 4) {
        uint32_t size; memcpy(&size, cm, 4);
        if (size >= ncm || size % 4) { PyErr_SetString(PyExc_ValueError, "bad precompiled charsmap"); return NULL; }
        ubuf = malloc(size ? size : 4); if (!ubuf) return PyErr_NoMemory();
        memcpy(ubuf, cm + 4, size); units = ubuf; nu = size / 4;
        normalized = (const char *)cm + 4 + size; nnorm = ncm - 4 - size;
    }
    int add_dummy = flags & 1, rm = flags & 2, esc = flags & 4, suffix = flags & 8;
    Py_ssize_t nuser = PyList_GET_SIZE(user);
    unsigned char *out = malloc(n * 3 + 8); size_t on = 0;
    if (!out) { free(ubuf); return PyErr_NoMemory(); }
    static const unsigned char WS[3] = {0xE2, 0x96, 0x81};
    const unsigned char *sp; Py_ssize_t splen, consumed;
#define PREFIX(pos) do { \
        sp = NULL; \
        for (Py_ssize_t u_ = 0; u_ < nuser; u_++) { PyObject *ub = PyList_GET_ITEM(user, u_); \
            Py_ssize_t ul = PyBytes_GET_SIZE(ub); \
            if (ul > 0 && ul <= n - (pos) && memcmp(PyBytes_AS_STRING(ub), s + (pos), ul) == 0) { \
                sp = (const unsigned char *)PyBytes_AS_STRING(ub); splen = ul; consumed = ul; break; } } \
        if (!sp) { uint32_t val_ = 0; Py_ssize_t ml_ = units ? da_longest(units, nu, s + (pos), n - (pos), &val_) : 0; \
            if (ml_ > 0 && val_ < (uint32_t)nnorm) { sp = (const unsigned char *)normalized + val_; \
                splen = (Py_ssize_t)strnlen((const char *)sp, nnorm - val_); consumed = ml_; } \
            else { int l_; if (valid_utf8_char(s + (pos), n - (pos), &l_)) { sp = s + (pos); splen = l_; consumed = l_; } \
                   else { sp = (const unsigned char *)"\xEF\xBF\xBD"; splen = 3; consumed = 1; } } } \
    } while (0)
    Py_ssize_t pos = 0;
    if (rm) {
        while (pos < n) { PREFIX(pos); if (!(splen == 1 && sp[0] == ' ')) break; pos += consumed; }
    }
    if (pos < n) {
        if (!suffix && add_dummy) { if (esc) { memcpy(out + on, WS, 3); on += 3; } else out[on++] = ' '; }
        int prev_space = rm ? 1 : 0;
        while (pos < n) {
            PREFIX(pos);
            if ((size_t)(on + splen * 3 + 8) > (size_t)(n * 3 + 8)) {
                unsigned char *no = realloc(out, on + splen * 3 + n * 3 + 8); if (!no) { free(out); free(ubuf); return PyErr_NoMemory(); }
                out = no;
            }
            Py_ssize_t k = 0;
            if (prev_space) while (k < splen && sp[k] == ' ') k++;
            if (k < splen) {
                for (; k < splen; k++) {
                    if (esc && sp[k] == ' ') { memcpy(out + on, WS, 3); on += 3; }
                    else out[on++] = sp[k];
                }
                prev_space = sp[splen - 1] == ' ';
            }
            pos += consumed;
            if (!rm) prev_space = 0;
        }
        if (rm) {
            if (esc) while (on >= 3 && memcmp(out + on - 3, WS, 3) == 0) on -= 3;
            else while (on >= 1 && out[on - 1] == ' ') on--;
        }
        if (suffix && add_dummy) { if (esc) { memcpy(out + on, WS, 3); on += 3; } else out[on++] = ' '; }
    }
#undef PREFIX
    PyObject *r = PyBytes_FromStringAndSize((char *)out, on);
    free(out); free(ubuf);
    return r;
}

/* ------------------------------------------------------ module */

static PyMethodDef module_methods[] = {
    {"split", py_split, METH_VARARGS, "split(text, pattern_id) -> chunks"},
    {"count_chunks", py_count_chunks, METH_VARARGS, "count_chunks(text, pattern_id, counts)"},
    {"bpe_train", py_bpe_train, METH_VARARGS, "bpe_train(words, freqs, n_merges, min_freq, progress)"},
    {"unigram_estep", py_unigram_estep, METH_VARARGS, "unigram_estep(words, counts, names, scores, max_len)"},
    {"unigram_viterbi_batch", py_unigram_viterbi_batch, METH_VARARGS,
     "unigram_viterbi_batch(words, names, scores, max_len, exclude)"},
    {"sp_normalize", py_sp_normalize, METH_VARARGS, "sp_normalize(data, charsmap, flags, user_defined)"},
    {NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_native", "lmforge tokenizer hot loops", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&BPEType) < 0 || PyType_Ready(&UniType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&BPEType); PyModule_AddObject(m, "BPE", (PyObject *)&BPEType);
    Py_INCREF(&UniType); PyModule_AddObject(m, "Unigram", (PyObject *)&UniType);
    return m;
}
