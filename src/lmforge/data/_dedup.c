/* lmforge.data._dedup: the hot loops of near-duplicate detection.
 *
 * Knows how to hash words (FNV-1a 64 of their UTF-8 bytes), combine k
 * consecutive word hashes into a shingle hash, and take the MinHash signature
 * of a document's shingles under P universal hash functions
 * h_i(x) = ((a_i * x + b_i) mod (2^61 - 1)) & 0xffffffff.
 * Knows nothing about documents, bands or clusters; `dedup.py` holds the
 * readable pure-numpy twin, and the tests check that both agree bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define MERSENNE61 ((1ULL << 61) - 1)

static inline uint64_t fnv1a(const unsigned char *s, Py_ssize_t n) {
    uint64_t h = FNV_OFFSET;
    for (Py_ssize_t i = 0; i < n; i++) { h ^= s[i]; h *= FNV_PRIME; }
    return h;
}

static inline uint64_t mod61(uint64_t x) {
    uint64_t r = (x & MERSENNE61) + (x >> 61);
    return r >= MERSENNE61 ? r - MERSENNE61 : r;
}

/* word hashes of a list of str -> malloc'd array (NULL on error) */
static uint64_t *hash_list(PyObject *words, Py_ssize_t *n_out) {
    PyObject *seq = PySequence_Fast(words, "words must be a sequence of str");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *h = (uint64_t *)PyMem_Malloc(sizeof(uint64_t) * (n ? n : 1));
    if (!h) { Py_DECREF(seq); PyErr_NoMemory(); return NULL; }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(items[i], &len);
        if (!s) { PyMem_Free(h); Py_DECREF(seq); return NULL; }
        h[i] = fnv1a((const unsigned char *)s, len);
    }
    Py_DECREF(seq);
    *n_out = n;
    return h;
}

/* hash_words(words) -> bytes of uint64 FNV-1a hashes */
static PyObject *py_hash_words(PyObject *mod, PyObject *words) {
    Py_ssize_t n;
    uint64_t *h = hash_list(words, &n);
    if (!h) return NULL;
    PyObject *out = PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)(n * sizeof(uint64_t)));
    PyMem_Free(h);
    return out;
}

/* minhash(words, k, a: bytes(uint64[P]), b: bytes(uint64[P])) -> bytes(uint32[P]) */
static PyObject *py_minhash(PyObject *mod, PyObject *args) {
    PyObject *words; int k; Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "Oiy*y*", &words, &k, &a, &b)) return NULL;
    PyObject *result = NULL;
    uint64_t *h = NULL, *sh = NULL;
    Py_ssize_t P = a.len / 8;
    if (k < 1 || a.len != b.len || a.len % 8) {
        PyErr_SetString(PyExc_ValueError, "k must be >= 1 and a, b equal-length uint64 buffers");
        goto done;
    }
    Py_ssize_t n;
    h = hash_list(words, &n);
    if (!h) goto done;
    Py_ssize_t m = n >= k ? n - k + 1 : (n > 0 ? 1 : 0); /* a short document is one shingle */
    int kk = n >= k ? k : (int)n;
    sh = (uint64_t *)PyMem_Malloc(sizeof(uint64_t) * (m ? m : 1));
    if (!sh) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < m; i++) {
        uint64_t s = 0;
        for (int j = 0; j < kk; j++) s = (s * FNV_PRIME) ^ h[i + j];
        sh[i] = (s >> 32) ^ (s & 0xffffffffULL);
    }
    result = PyBytes_FromStringAndSize(NULL, P * 4);
    if (!result) goto done;
    uint32_t *sig = (uint32_t *)PyBytes_AS_STRING(result);
    const uint64_t *A = (const uint64_t *)a.buf, *B = (const uint64_t *)b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t p = 0; p < P; p++) {
        uint64_t ap = A[p], bp = B[p];
        uint32_t best = 0xffffffffU;
        for (Py_ssize_t i = 0; i < m; i++) {
            uint32_t v = (uint32_t)(mod61(ap * sh[i] + bp) & 0xffffffffULL);
            if (v < best) best = v;
        }
        sig[p] = best;
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(h);
    PyMem_Free(sh);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"hash_words", py_hash_words, METH_O, "hash_words(list[str]) -> bytes of uint64 FNV-1a hashes"},
    {"minhash", py_minhash, METH_VARARGS, "minhash(words, k, a, b) -> bytes of uint32 signature"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_dedup", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dedup(void) { return PyModule_Create(&moddef); }
