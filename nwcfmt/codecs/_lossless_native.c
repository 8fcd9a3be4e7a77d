/* Optional native kernel of the lossless codec: rebuilds float words from decoded planes in one pass.
 *
 *   out[i] = table[sym[i]] | (tail & ((1 << t) - 1)) | ((tail >> t) << (bits - 1))
 *   tail   = plane0[i] | plane1[i] << 8 | plane2[i] << 16     (absent planes are empty buffers)
 *
 * `table` has 256 entries of the word type, already shifted left by t (unused entries are zero), so no
 * symbol can index outside it. When the chunk's table is consecutive, `first` is its first prefix and the
 * kernel computes (first + sym) << t instead of gathering; otherwise `first` is -1. Returns the largest symbol seen, which the caller checks against the chunk's
 * table size. The GIL is released while the loop runs. The numpy code in lossless.py is the reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* One fused pass per (word type, plane count, table kind); the symbol maximum is a separate read-only pass.
 * HEAD(i) is the shifted prefix of value i, TAIL(i) its tail word. */
#define FUSED(WORD, HEAD, TAIL)                                                              \
    for (Py_ssize_t i = 0; i < n; i++) {                                                     \
        const WORD v = (WORD)(TAIL);                                                         \
        o[i] = (WORD)((HEAD) | (v & mask) | ((WORD)(v >> t) << (bits - 1)));                 \
    }

#define MERGE(WORD)                                                                          \
    do {                                                                                     \
        WORD *restrict o = (WORD *)out.buf;                                                  \
        const WORD *restrict tb = (const WORD *)table.buf;                                   \
        const WORD mask = (WORD)((1u << t) - 1u);                                            \
        const WORD f = (WORD)(first < 0 ? 0 : first);                                        \
        uint8_t m = 0;                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) m = sym[i] > m ? sym[i] : m;                      \
        max_sym = m;                                                                         \
        if (!b && first >= 0) {                                                              \
            FUSED(WORD, (WORD)((WORD)(sym[i] + f) << t), a[i])                               \
        } else if (!b) {                                                                     \
            FUSED(WORD, tb[sym[i]], a[i])                                                    \
        } else if (first >= 0) {                                                             \
            FUSED(WORD, (WORD)((WORD)(sym[i] + f) << t),                                     \
                  (uint32_t)a[i] | ((uint32_t)b[i] << 8) | (c ? ((uint32_t)c[i] << 16) : 0u))    \
        } else {                                                                             \
            FUSED(WORD, tb[sym[i]],                                                          \
                  (uint32_t)a[i] | ((uint32_t)b[i] << 8) | (c ? ((uint32_t)c[i] << 16) : 0u))    \
        }                                                                                    \
    } while (0)

static PyObject *merge(PyObject *self, PyObject *args) {
    Py_buffer out, symbols, table, p0, p1, p2;
    int t, bits;
    long first;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*iil", &out, &symbols, &table, &p0, &p1, &p2, &t, &bits, &first)) {
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = symbols.len, width = bits / 8;
    if ((bits != 16 && bits != 32) || t < 0 || t > bits - 2 || out.len != n * width || table.len != 256 * width ||
        p0.len != n || (p1.len != 0 && p1.len != n) || (p2.len != 0 && p2.len != n) || (p2.len && !p1.len)) {
        PyErr_SetString(PyExc_ValueError, "merge: inconsistent buffer sizes or bit widths");
        goto done;
    }
    {
        const uint8_t *sym = (const uint8_t *)symbols.buf, *a = (const uint8_t *)p0.buf;
        const uint8_t *b = p1.len ? (const uint8_t *)p1.buf : NULL, *c = p2.len ? (const uint8_t *)p2.buf : NULL;
        uint8_t max_sym = 0;
        Py_BEGIN_ALLOW_THREADS
        if (bits == 16) {
            MERGE(uint16_t);
        } else {
            MERGE(uint32_t);
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromLong(n ? max_sym : -1);
    }
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&table);
    PyBuffer_Release(&p0);
    PyBuffer_Release(&p1);
    PyBuffer_Release(&p2);
    return result;
}

static PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, "merge(out, symbols, table, plane0, plane1, plane2, t, bits, first) -> max symbol"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lossless_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lossless_native(void) { return PyModule_Create(&module); }
