/* The one loop of drkit in C: XOR the non-zero words of a sparse-page record into pages.

   A restore applies every XOR delta of a chain word by word (codec/sparse_pages.py describes the
   record). In numpy that takes a dozen passes over index arrays per record; here it is one pass
   that also checks each word index, with the GIL released so restore workers run side by side.

   xor_words(window, record, first, rows)
       window  writable buffer of whole 8 KiB pages (8-byte aligned)
       record  one whole record
       first   the record's page that rows[0] is for
       rows    int64 buffer: the window page of each record page from `first` on, -1: skip it
   Raises ValueError if the record's lengths do not add up, a row is outside the window, or a
   word index is not below 1024 and increasing within its page (checked for skipped pages too). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE_BYTES 8192
#define WORDS 1024

/* little-endian loads from any alignment */
static uint16_t load_u16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}

static uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* 0, or the message of what is wrong */
static const char *apply(uint64_t *window, Py_ssize_t window_pages, const unsigned char *record,
                         Py_ssize_t record_len, Py_ssize_t first, const int64_t *rows,
                         Py_ssize_t count) {
    if (record_len < 8) return "sparse-page record is shorter than its header";
    uint64_t size = load_u64(record);
    uint64_t pages = size / PAGE_BYTES + (size % PAGE_BYTES != 0);
    if (pages > (uint64_t)(record_len - 8) / 2) return "sparse-page record is truncated";
    if (first < 0 || count < 0 || (uint64_t)first + (uint64_t)count > pages)
        return "pages asked for lie outside the sparse-page record";
    const unsigned char *counts = record + 8;
    uint64_t words = 0, before = 0;
    for (uint64_t p = 0; p < pages; p++) {
        if ((Py_ssize_t)p == first) before = words;
        words += load_u16(counts + 2 * p);
    }
    if ((uint64_t)record_len != 8 + 2 * pages + 10 * words)
        return "sparse-page record lengths do not add up";
    const unsigned char *index = counts + 2 * pages + 2 * before;
    const unsigned char *values = counts + 2 * pages + 2 * words + 8 * before;
    for (Py_ssize_t p = 0; p < count; p++) {
        int64_t row = rows[p];
        if (row < -1 || row >= window_pages) return "a page lies outside the window";
        uint64_t *page = row >= 0 ? window + row * WORDS : NULL;
        unsigned n = load_u16(counts + 2 * (first + p));
        int previous = -1;
        for (unsigned w = 0; w < n; w++) {
            int i = load_u16(index);
            if (i <= previous || i >= WORDS) return "sparse pages have word indexes out of order";
            previous = i;
            if (page) page[i] ^= load_u64(values);
            index += 2;
            values += 8;
        }
    }
    return NULL;
}

static PyObject *xor_words(PyObject *self, PyObject *args) {
    Py_buffer window, record, rows;
    Py_ssize_t first;
    if (!PyArg_ParseTuple(args, "w*y*ny*", &window, &record, &first, &rows)) return NULL;
    const char *error = NULL;
    if (window.len % PAGE_BYTES || (uintptr_t)window.buf % 8)
        error = "the window is not whole aligned pages";
    else if (rows.len % 8 || (uintptr_t)rows.buf % 8)
        error = "rows are not aligned int64";
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        error = apply(window.buf, window.len / PAGE_BYTES, record.buf, record.len, first,
                      rows.buf, rows.len / 8);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&window);
    PyBuffer_Release(&record);
    PyBuffer_Release(&rows);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"xor_words", xor_words, METH_VARARGS,
     "xor_words(window, record, first, rows): XOR a sparse-page record's words into pages."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sparse", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sparse(void) { return PyModule_Create(&module); }
