/* Optional native CPU kernel for the integer-code layout: unpack + dequantize + round in one pass.
 *
 * dequantize(out, packed, scale, zero, bits, group_size, cols, row0, row1, implicit_zero, out_kind)
 *   packed: [rows, row_bytes] uint8 (LSB-first codes per row); scale: float32 [scale_rows, n_groups];
 *   zero: uint8 [scale_rows, n_groups] or an empty buffer (then implicit_zero is used);
 *   out: [rows, cols] of out_kind 0 = float32, 1 = bfloat16, 2 = float16 (as raw words).
 * Rows [row0, row1) are written: callers split a tensor over threads. The GIL is released.
 * w = (code - zero) * scale in fp32, rounded to nearest even: bit-identical to nwcfmt/kernels/reference.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : rounded); /* NaN: as torch's vectorised cast */
}

static inline uint16_t to_f16(float f) {
    _Float16 h = (_Float16)f; /* IEEE conversion: round to nearest even */
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

static inline unsigned code_at(const uint8_t *row, Py_ssize_t c, int bits, Py_ssize_t row_bytes) {
    if (bits == 8) return row[c];
    if (bits == 4) return (row[c >> 1] >> ((c & 1) << 2)) & 15u;
    Py_ssize_t bit = c * bits, byte = bit >> 3;
    unsigned v = row[byte];
    if (byte + 1 < row_bytes) v |= (unsigned)row[byte + 1] << 8;
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

/* Writes one group: for bits <= 4 through a table of the 2**bits possible outputs (computed once per group, so
 * every value costs one L1 load), otherwise by computing each value. */
#define GROUP(WORD, CONVERT)                                                                          \
    do {                                                                                              \
        WORD *restrict o = (WORD *)out + base;                                                        \
        if (bits <= 4) {                                                                              \
            WORD lut[16];                                                                             \
            for (unsigned q = 0; q < (1u << bits); q++) lut[q] = CONVERT(((float)q - z) * s);         \
            if (bits == 4 && !(c0 & 1) && !(c1 & 1)) {                                                \
                for (Py_ssize_t b = c0 >> 1; b < c1 >> 1; b++) {                                      \
                    const uint8_t v = row[b];                                                         \
                    o[2 * b] = lut[v & 15u];                                                          \
                    o[2 * b + 1] = lut[v >> 4];                                                       \
                }                                                                                     \
            } else {                                                                                  \
                for (Py_ssize_t c = c0; c < c1; c++) o[c] = lut[code_at(row, c, bits, row_bytes)];    \
            }                                                                                         \
        } else if (bits == 8) {                                                                       \
            for (Py_ssize_t c = c0; c < c1; c++) o[c] = CONVERT(((float)row[c] - z) * s);             \
        } else {                                                                                      \
            for (Py_ssize_t c = c0; c < c1; c++)                                                      \
                o[c] = CONVERT(((float)code_at(row, c, bits, row_bytes) - z) * s);                    \
        }                                                                                             \
    } while (0)

#define AS_FLOAT(F) (F)

static void run_rows(void *out, const uint8_t *packed, const float *scale, const uint8_t *zero, int bits,
                     Py_ssize_t group_size, Py_ssize_t cols, Py_ssize_t row0, Py_ssize_t row1, Py_ssize_t scale_rows,
                     Py_ssize_t n_groups, int implicit_zero, int kind) {
    const Py_ssize_t row_bytes = (cols * bits + 7) / 8;
    for (Py_ssize_t r = row0; r < row1; r++) {
        const uint8_t *restrict row = packed + r * row_bytes;
        const Py_ssize_t srow = scale_rows == 1 ? 0 : r, base = r * cols;
        for (Py_ssize_t g = 0; g < n_groups; g++) {
            const float s = scale[srow * n_groups + g];
            const float z = zero ? (float)zero[srow * n_groups + g] : (float)implicit_zero;
            const Py_ssize_t c0 = g * group_size, c1 = c0 + group_size < cols ? c0 + group_size : cols;
            if (kind == 1) {
                GROUP(uint16_t, to_bf16);
            } else if (kind == 2) {
                GROUP(uint16_t, to_f16);
            } else {
                GROUP(float, AS_FLOAT);
            }
        }
    }
}

static PyObject *dequantize(PyObject *self, PyObject *args) {
    Py_buffer out, packed, scale, zero;
    int bits, implicit_zero, kind;
    Py_ssize_t group_size, cols, row0, row1, scale_rows, n_groups;
    if (!PyArg_ParseTuple(args, "w*y*y*y*innnnnnii", &out, &packed, &scale, &zero, &bits, &group_size, &cols, &row0,
                          &row1, &scale_rows, &n_groups, &implicit_zero, &kind)) {
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t row_bytes = (cols * bits + 7) / 8, width = kind == 0 ? 4 : 2;
    const Py_ssize_t rows = row_bytes ? packed.len / row_bytes : 0;
    if (bits < 1 || bits > 8 || kind < 0 || kind > 2 || group_size < 1 || cols < 1 || row0 < 0 || row1 > rows ||
        row0 > row1 || packed.len != rows * row_bytes || out.len != rows * cols * width ||
        scale.len != scale_rows * n_groups * 4 || (zero.len && zero.len != scale_rows * n_groups) ||
        (scale_rows != 1 && scale_rows != rows) || n_groups * group_size < cols) {
        PyErr_SetString(PyExc_ValueError, "dequantize: inconsistent buffer sizes or parameters");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    run_rows(out.buf, (const uint8_t *)packed.buf, (const float *)scale.buf,
             zero.len ? (const uint8_t *)zero.buf : NULL, bits, group_size, cols, row0, row1, scale_rows, n_groups,
             implicit_zero, kind);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    return result;
}

static PyMethodDef methods[] = {
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(out, packed, scale_f32, zero_u8, bits, group_size, cols, row0, row1, scale_rows, n_groups, "
     "implicit_zero, out_kind)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_native(void) { return PyModule_Create(&module); }
