/* PostgreSQL's page checksum (src/include/storage/checksum_impl.h), for the pages a backup reads.

   Every page a backup stores is checked: in numpy that is 66 passes over the pages' words with a
   temporary array each, a tenth of a backup's CPU; here it is one pass per page that the
   compiler vectorises (the 32 lanes are independent), with the GIL released so backup workers
   check side by side.

   checksums(data, index, blocks, out)
       data    whole 8 KiB pages
       index   int64 buffer: the pages of `data` to checksum
       blocks  int64 buffer: the relation block number of each of those pages
       out     uint16 buffer: each page's checksum
   Raises ValueError if the lengths differ or an index is outside `data`. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE_BYTES 8192
#define LANES 32
#define ROWS (PAGE_BYTES / (4 * LANES))
#define FNV_PRIME 16777619u
#define COMP(sum, value)                            \
    do {                                            \
        uint32_t tmp_ = (sum) ^ (value);            \
        (sum) = (tmp_ * FNV_PRIME) ^ (tmp_ >> 17);  \
    } while (0)

static const uint32_t base_offsets[LANES] = {
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
    0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
    0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
    0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
};

/* The page's words in the server's byte order, which is this machine's (as the server's own
   checksum reads them); pd_checksum (bytes 8-9) counts as zero. */
static uint16_t page_checksum(const unsigned char *page, uint32_t block) {
    uint32_t sums[LANES], row[LANES];
    memcpy(sums, base_offsets, sizeof sums);
    memcpy(row, page, sizeof row);
    memset((unsigned char *)row + 8, 0, 2);
    for (int j = 0; j < LANES; j++) COMP(sums[j], row[j]);
    for (int i = 1; i < ROWS; i++) {
        memcpy(row, page + (size_t)i * sizeof row, sizeof row);
        for (int j = 0; j < LANES; j++) COMP(sums[j], row[j]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < LANES; j++) COMP(sums[j], 0);
    uint32_t result = 0;
    for (int j = 0; j < LANES; j++) result ^= sums[j];
    result ^= block;
    return (uint16_t)(result % 65535 + 1);
}

static PyObject *checksums(PyObject *self, PyObject *args) {
    Py_buffer data, index, blocks, out;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &data, &index, &blocks, &out)) return NULL;
    const char *error = NULL;
    Py_ssize_t count = index.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t pages = data.len / PAGE_BYTES;
    if (index.len % (Py_ssize_t)sizeof(int64_t) || blocks.len != index.len ||
        out.len != count * (Py_ssize_t)sizeof(uint16_t))
        error = "index, blocks and out must hold one int64, int64 and uint16 per page";
    else {
        const unsigned char *base = data.buf;
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t k = 0; k < count; k++) {
            int64_t i, block;
            memcpy(&i, (const char *)index.buf + k * sizeof i, sizeof i);
            memcpy(&block, (const char *)blocks.buf + k * sizeof block, sizeof block);
            if (i < 0 || i >= pages) {
                error = "a page index lies outside the data";
                break;
            }
            uint16_t sum = page_checksum(base + (size_t)i * PAGE_BYTES, (uint32_t)block);
            memcpy((char *)out.buf + k * sizeof sum, &sum, sizeof sum);
        }
        Py_END_ALLOW_THREADS;
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&index);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&out);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"checksums", checksums, METH_VARARGS,
     "checksums(data, index, blocks, out): PostgreSQL's checksum of each indexed page"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_checksum", NULL, -1, methods};

PyMODINIT_FUNC PyInit__checksum(void) { return PyModule_Create(&module); }
