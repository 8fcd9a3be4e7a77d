/* Native rANS coder of one lane (spec/entropy.md), bit-identical to the numpy reference in rans.py.
 *
 * State x in [2^16, 2^32), 16-bit words, 15-bit frequency tables. Symbol i of the stream uses table
 *   t(i) = i % channels + channels * levels[(i / level_run) % n_levels_cols]     (no levels: i % channels)
 * encode_lane(scratch, symbols, start, freqs, cum, K, channels, levels, level_run) -> (state, n_words)
 *   writes the lane's words, in decode order, to the END of scratch (len(scratch) == len(symbols));
 *   returns (0, i) when symbol i has no frequency in its table.
 * decode_lane(out, words, state, start, freqs, cum, lut, K, channels, levels, level_run) -> bool
 *   false when the lane runs out of words, leaves words over, or does not end in state 2^16.
 * The GIL is released while a lane is coded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define PROB_BITS 15
#define PROB_MASK ((1u << PROB_BITS) - 1u)
#define STATE_LOW (1u << 16)

static inline Py_ssize_t table_of(Py_ssize_t i, Py_ssize_t channels, const uint8_t *levels, Py_ssize_t n_levels,
                                  Py_ssize_t run) {
    Py_ssize_t t = i % channels;
    if (n_levels) t += channels * (Py_ssize_t)levels[(i / run) % n_levels];
    return t;
}

static PyObject *encode_lane(PyObject *self, PyObject *args) {
    Py_buffer scratch, symbols, freqs, cum, levels;
    Py_ssize_t start, k, channels, run;
    if (!PyArg_ParseTuple(args, "w*y*ny*y*nny*n", &scratch, &symbols, &start, &freqs, &cum, &k, &channels, &levels,
                          &run)) {
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = symbols.len / 2, n_levels = levels.len;
    if (scratch.len != symbols.len || k < 1 || channels < 1 || run < 1 || freqs.len % (2 * k) ||
        cum.len != 2 * freqs.len) {
        PyErr_SetString(PyExc_ValueError, "encode_lane: inconsistent buffer sizes");
        goto done;
    }
    {
        const uint16_t *sym = (const uint16_t *)symbols.buf, *f = (const uint16_t *)freqs.buf;
        const uint32_t *c = (const uint32_t *)cum.buf;
        const uint8_t *lv = (const uint8_t *)levels.buf;
        const Py_ssize_t tables = freqs.len / (2 * k);
        uint16_t *w = (uint16_t *)scratch.buf;
        Py_ssize_t out = n, bad = -1;
        uint64_t x = STATE_LOW;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = n - 1; j >= 0; j--) {
            const Py_ssize_t t = table_of(start + j, channels, lv, n_levels, run);
            if (t >= tables || sym[j] >= k || f[t * k + sym[j]] == 0) {
                bad = j;
                break;
            }
            const uint64_t fr = f[t * k + sym[j]];
            if (x >= (fr << (32 - PROB_BITS))) {
                w[--out] = (uint16_t)(x & 0xFFFFu);
                x >>= 16;
            }
            x = ((x / fr) << PROB_BITS) + (x % fr) + c[t * k + sym[j]];
        }
        Py_END_ALLOW_THREADS
        if (bad >= 0) {
            result = Py_BuildValue("(nn)", (Py_ssize_t)0, start + bad);
        } else {
            result = Py_BuildValue("(kn)", (unsigned long)x, n - out);
        }
    }
done:
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&freqs);
    PyBuffer_Release(&cum);
    PyBuffer_Release(&levels);
    return result;
}

static PyObject *decode_lane(PyObject *self, PyObject *args) {
    Py_buffer out, words, freqs, cum, lut, levels;
    unsigned long state;
    Py_ssize_t start, k, channels, run;
    if (!PyArg_ParseTuple(args, "w*y*kny*y*y*nny*n", &out, &words, &state, &start, &freqs, &cum, &lut, &k, &channels,
                          &levels, &run)) {
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = out.len / 2, n_words = words.len / 2, n_levels = levels.len;
    const Py_ssize_t tables = k > 0 ? freqs.len / (2 * k) : 0;
    if (k < 1 || channels < 1 || run < 1 || freqs.len % (2 * k) || cum.len != 2 * freqs.len ||
        lut.len != tables * 2 * (1 << PROB_BITS)) {
        PyErr_SetString(PyExc_ValueError, "decode_lane: inconsistent buffer sizes");
        goto done;
    }
    {
        uint16_t *o = (uint16_t *)out.buf;
        const uint16_t *w = (const uint16_t *)words.buf, *f = (const uint16_t *)freqs.buf;
        const uint16_t *lu = (const uint16_t *)lut.buf;
        const uint32_t *c = (const uint32_t *)cum.buf;
        const uint8_t *lv = (const uint8_t *)levels.buf;
        uint32_t x = (uint32_t)state;
        Py_ssize_t pos = 0;
        int ok = state >= STATE_LOW && state <= 0xFFFFFFFFul;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; ok && j < n; j++) {
            const Py_ssize_t t = table_of(start + j, channels, lv, n_levels, run);
            if (t >= tables) {
                ok = 0;
                break;
            }
            const uint32_t slot = x & PROB_MASK;
            const uint16_t s = lu[(t << PROB_BITS) + slot];
            x = (uint32_t)f[t * k + s] * (x >> PROB_BITS) + slot - c[t * k + s];
            if (x < STATE_LOW) {
                if (pos >= n_words) {
                    ok = 0;
                    break;
                }
                x = (x << 16) | w[pos++];
            }
            o[j] = s;
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(ok && x == STATE_LOW && pos == n_words);
    }
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&words);
    PyBuffer_Release(&freqs);
    PyBuffer_Release(&cum);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&levels);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_lane", encode_lane, METH_VARARGS, "Encode one rANS lane (see the module comment)."},
    {"decode_lane", decode_lane, METH_VARARGS, "Decode one rANS lane (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rans_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__rans_native(void) { return PyModule_Create(&module); }
