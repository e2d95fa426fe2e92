/* Which blocks the WAL records touch: drkit's own WAL summary, for diff/incr backups of servers
   that keep none (PostgreSQL 13 to 16, or 17+ with summarize_wal off).

   It reads the WAL since the parent backup started, segment by segment, the way PostgreSQL's
   WAL summarizer does (src/backend/postmaster/walsummarizer.c), and gathers:
   - every main-fork block any record references (heap, index, full-page image, ...);
   - a *limit block* per relation: 0 when it is created or dropped, else the shortest length it
     was truncated to (smgr create / truncate records, the relations a commit or abort drops);
   - a limit block 0 for relation 0 of a database and tablespace created, copied or dropped
     (CREATE DATABASE, ALTER DATABASE SET TABLESPACE copy whole directories without logging
     their blocks): every relation file of it must then be read whole;
   - whether wal_level was minimal at any point (then the WAL does not log every change).

   Every page header read is checked (magic, its own position, the segment's system identifier
   and sizes), every record's CRC-32C and its link to the record before.
   Anything that does not add up raises ValueError: the backup then reads changed files whole.

   Scanner(magic, compressed_mask, system_identifier, segment_size, max_blocks, since, dbase_drop)
       magic            XLOG_PAGE_MAGIC of the server's major version
       compressed_mask  the bits of bimg_info that mean a compressed full-page image
       dbase_drop       the info code of XLOG_DBASE_DROP: 0x10 before PostgreSQL 15, when
                        CREATE DATABASE had one record (0x00), 0x20 since (0x00 and 0x10 create)
       max_blocks       distinct blocks kept at most; past it `overflow` is set and no more kept
       since            records that start before it are checked but not gathered
   .feed(segment, lsn, valid)
       segment  one whole WAL segment file; lsn its start position
       valid    records that start before lsn + valid are read (the end of the range)
   .result() -> ([(spc, db, rel, starts, ends, limit)], minimal, overflow)
       starts/ends: packed uint32 [start, end) block ranges, ascending; limit: int or None */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WAL_PAGE 8192
#define SHORT_PHD 24
#define LONG_PHD 40
#define RECORD_HEADER 24
#define MAX_RECORD 0x3FFFFFFFu /* XLogRecordMaxSize (1 GB - 1) */
#define XLP_FIRST_IS_CONTRECORD 0x0001
#define XLP_LONG_HEADER 0x0002
#define NO_LIMIT UINT32_MAX

#define RM_XLOG 0
#define RM_XACT 1
#define RM_SMGR 2
#define RM_DBASE 4

/* WAL is written in the server's byte order, which is this machine's (drkit runs beside it) */
static uint16_t u16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint32_t u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint64_t u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* ---- CRC-32C (Castagnoli), as PostgreSQL computes it: SSE 4.2 when the CPU has it ---------- */

static uint32_t crc_table[256];

static void crc_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_soft(uint32_t crc, const unsigned char *p, size_t n) {
    while (n--) crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const unsigned char *p,
                                                           size_t n) {
    uint64_t c = crc;
    for (; n >= 8; n -= 8, p += 8) c = __builtin_ia32_crc32di(c, u64(p));
    crc = (uint32_t)c;
    for (; n; n--) crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}
#endif

static uint32_t (*crc_update)(uint32_t, const unsigned char *, size_t) = crc_soft;

/* ---- the blocks and limits gathered, per relation ------------------------------------------ */

typedef struct {
    uint32_t spc, db, rel;
    uint32_t limit; /* NO_LIMIT: none */
    uint32_t *blocks;
    uint32_t count, capacity;
    int used;
} Relation;

typedef struct {
    PyObject_HEAD
    uint16_t magic;
    uint8_t compressed_mask;
    uint8_t dbase_drop;
    uint64_t system_identifier;
    uint32_t segment_size;
    uint64_t max_blocks;
    uint64_t since; /* records before it are checked, not gathered */

    uint64_t next_lsn;  /* the segment expected next (0: the first) */
    uint64_t prev_lsn;  /* the last record read, for xl_prev (0: not known yet) */
    unsigned char *rec; /* a record that continues on the next page */
    uint32_t rec_capacity, rec_length, rec_have;
    uint64_t rec_lsn;

    Relation *table;
    uint32_t table_size, table_used; /* open addressing, size a power of two */
    Relation *last;
    uint64_t blocks; /* kept (with duplicates not yet removed) */
    int minimal, overflow;
} Scanner;

static uint32_t hash_key(uint32_t spc, uint32_t db, uint32_t rel) {
    uint64_t h = ((uint64_t)spc * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)db * 0xC2B2AE3D27D4EB4Full) ^
                 ((uint64_t)rel * 0x165667B19E3779F9ull);
    return (uint32_t)(h ^ (h >> 29));
}

static Relation *slot_for(Relation *table, uint32_t size, uint32_t spc, uint32_t db, uint32_t rel) {
    uint32_t i = hash_key(spc, db, rel) & (size - 1);
    while (table[i].used && !(table[i].spc == spc && table[i].db == db && table[i].rel == rel))
        i = (i + 1) & (size - 1);
    return &table[i];
}

static Relation *relation(Scanner *s, uint32_t spc, uint32_t db, uint32_t rel) {
    Relation *r = s->last;
    if (r && r->spc == spc && r->db == db && r->rel == rel) return r;
    if (2 * (s->table_used + 1) > s->table_size) {
        uint32_t size = s->table_size ? 2 * s->table_size : 64;
        Relation *table = PyMem_Calloc(size, sizeof(Relation));
        if (!table) return NULL;
        for (uint32_t i = 0; i < s->table_size; i++)
            if (s->table[i].used)
                *slot_for(table, size, s->table[i].spc, s->table[i].db, s->table[i].rel) =
                    s->table[i];
        PyMem_Free(s->table);
        s->table = table;
        s->table_size = size;
    }
    r = slot_for(s->table, s->table_size, spc, db, rel);
    if (!r->used) {
        r->used = 1;
        r->spc = spc;
        r->db = db;
        r->rel = rel;
        r->limit = NO_LIMIT;
        s->table_used++;
    }
    s->last = r;
    return r;
}

static int compare_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* sort and remove duplicates in place */
static void compact(Scanner *s, Relation *r) {
    if (r->count < 2) return;
    qsort(r->blocks, r->count, sizeof(uint32_t), compare_u32);
    uint32_t n = 1;
    for (uint32_t i = 1; i < r->count; i++)
        if (r->blocks[i] != r->blocks[n - 1]) r->blocks[n++] = r->blocks[i];
    s->blocks -= r->count - n;
    r->count = n;
}

/* 0, or -1 with a MemoryError set */
static int add_block(Scanner *s, uint32_t spc, uint32_t db, uint32_t rel, uint32_t block) {
    if (s->overflow) return 0;
    Relation *r = relation(s, spc, db, rel);
    if (!r) goto nomem;
    if (r->count && r->blocks[r->count - 1] == block) return 0;
    if (r->count == r->capacity) {
        compact(s, r);
        if (2 * r->count >= r->capacity) {
            uint32_t capacity = r->capacity ? 2 * r->capacity : 64;
            uint32_t *blocks = PyMem_Realloc(r->blocks, (size_t)capacity * sizeof(uint32_t));
            if (!blocks) goto nomem;
            r->blocks = blocks;
            r->capacity = capacity;
        }
    }
    r->blocks[r->count++] = block;
    if (++s->blocks > s->max_blocks) {
        for (uint32_t i = 0; i < s->table_size; i++)
            if (s->table[i].used) compact(s, &s->table[i]);
        if (s->blocks > s->max_blocks) s->overflow = 1;
    }
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

static int set_limit(Scanner *s, uint32_t spc, uint32_t db, uint32_t rel, uint32_t limit) {
    Relation *r = relation(s, spc, db, rel);
    if (!r) {
        PyErr_NoMemory();
        return -1;
    }
    if (limit < r->limit) r->limit = limit;
    return 0;
}

/* ---- records ------------------------------------------------------------------------------- */

/* PyErr_Format has no %X before Python 3.12: messages are formatted here, LSNs as PostgreSQL
   writes them */
#define raise_value_error(...)                                                                     \
    do {                                                                                           \
        char message_[256];                                                                        \
        snprintf(message_, sizeof message_, __VA_ARGS__);                                          \
        PyErr_SetString(PyExc_ValueError, message_);                                               \
    } while (0)

static int fail(uint64_t lsn, const char *what) {
    raise_value_error("%s in the WAL record at %X/%X", what, (unsigned)(lsn >> 32), (unsigned)lsn);
    return -1;
}

/* the relation file nodes a commit or abort record drops (xl_xact_commit / xl_xact_abort) */
static int xact_dropped(Scanner *s, uint8_t info, const unsigned char *p, uint32_t n,
                        uint64_t lsn) {
    const unsigned char *end = p + n;
    if (n < 8) return fail(lsn, "a short transaction record");
    p += 8; /* xact_time */
    if (!(info & 0x80)) return 0; /* XLOG_XACT_HAS_INFO */
    if (end - p < 4) return fail(lsn, "a short transaction record");
    uint32_t xinfo = u32(p);
    p += 4;
    if (xinfo & 1) p += 8; /* XACT_XINFO_HAS_DBINFO */
    if (xinfo & 2) {       /* XACT_XINFO_HAS_SUBXACTS */
        if (end - p < 4) return fail(lsn, "a short transaction record");
        uint32_t count = u32(p);
        if ((uint64_t)(end - p - 4) < 4ull * count) return fail(lsn, "a short transaction record");
        p += 4 + 4ull * count;
    }
    if (xinfo & 4) { /* XACT_XINFO_HAS_RELFILENODES */
        if (end - p < 4) return fail(lsn, "a short transaction record");
        uint32_t count = u32(p);
        p += 4;
        if ((uint64_t)(end - p) < 12ull * count) return fail(lsn, "a short transaction record");
        for (uint32_t i = 0; i < count; i++, p += 12)
            if (set_limit(s, u32(p), u32(p + 4), u32(p + 8), 0)) return -1;
    }
    return 0;
}

/* What the record's main data says beyond its block references; 1 for a segment switch */
static int main_data(Scanner *s, uint8_t rmid, uint8_t info, const unsigned char *d, uint32_t n,
                     uint64_t lsn) {
    uint8_t op = info & 0xF0;
    switch (rmid) {
    case RM_XLOG:
        if (op == 0x40) return 1; /* XLOG_SWITCH */
        if (op == 0x60) {         /* XLOG_PARAMETER_CHANGE: wal_level at offset 20 */
            if (n < 24) return fail(lsn, "a short parameter change record");
            if ((int32_t)u32(d + 20) == 0) s->minimal = 1;
        }
        return 0;
    case RM_XACT: {
        uint8_t what = info & 0x70;
        if (what == 0x00 || what == 0x20 || what == 0x30 || what == 0x40)
            return xact_dropped(s, info, d, n, lsn);
        return 0;
    }
    case RM_SMGR:
        if (op == 0x10) { /* XLOG_SMGR_CREATE: rnode, forkNum */
            if (n < 16) return fail(lsn, "a short smgr create record");
            if (u32(d + 12) == 0 && set_limit(s, u32(d), u32(d + 4), u32(d + 8), 0)) return -1;
        } else if (op == 0x20) { /* XLOG_SMGR_TRUNCATE: blkno, rnode, flags */
            if (n < 20) return fail(lsn, "a short smgr truncate record");
            if ((u32(d + 16) & 1) && set_limit(s, u32(d + 4), u32(d + 8), u32(d + 12), u32(d)))
                return -1;
        }
        return 0;
    case RM_DBASE:
        if (op == s->dbase_drop) { /* DROP: db_id, ntablespaces, tablespace_ids[] */
            if (n < 8) return fail(lsn, "a short database record");
            uint32_t count = u32(d + 4);
            if ((uint64_t)(n - 8) < 4ull * count) return fail(lsn, "a short database record");
            for (uint32_t i = 0; i < count; i++)
                if (set_limit(s, u32(d + 8 + 4 * i), u32(d), 0, 0)) return -1;
        } else if (op < s->dbase_drop) { /* CREATE (FILE_COPY, WAL_LOG): db_id, tablespace */
            if (n < 8) return fail(lsn, "a short database record");
            return set_limit(s, u32(d + 4), u32(d), 0, 0);
        }
        return 0;
    }
    return 0;
}

/* One whole record: check it, gather its blocks. 1 for a segment switch, 0, or -1 (error). */
static int record(Scanner *s, const unsigned char *r, uint32_t length, uint64_t lsn) {
    uint32_t crc = crc_update(0xFFFFFFFFu, r + RECORD_HEADER, length - RECORD_HEADER);
    crc = crc_update(crc, r, 20) ^ 0xFFFFFFFFu;
    if (crc != u32(r + 20)) return fail(lsn, "a CRC mismatch");
    if (s->prev_lsn && u64(r + 8) != s->prev_lsn) return fail(lsn, "a broken link to its predecessor");
    s->prev_lsn = lsn;
    if (lsn < s->since) /* before the range: the parent has what it did */
        return r[17] == RM_XLOG && (r[16] & 0xF0) == 0x40;

    const unsigned char *p = r + RECORD_HEADER;
    uint64_t remaining = length - RECORD_HEADER, datatotal = 0, main_length = 0;
    uint32_t spc = 0, db = 0, rel = 0;
    int have_rel = 0, max_id = -1;
#define TAKE(n)                                                                                    \
    do {                                                                                           \
        if (remaining < (n)) return fail(lsn, "a truncated block header");                         \
        remaining -= (n);                                                                          \
    } while (0)
    while (remaining > datatotal) {
        TAKE(1);
        uint8_t id = *p++;
        if (id == 255) { /* XLR_BLOCK_ID_DATA_SHORT */
            TAKE(1);
            main_length = *p++;
            datatotal += main_length;
            break;
        } else if (id == 254) { /* XLR_BLOCK_ID_DATA_LONG */
            TAKE(4);
            main_length = u32(p);
            p += 4;
            datatotal += main_length;
            break;
        } else if (id == 253) { /* XLR_BLOCK_ID_ORIGIN */
            TAKE(2);
            p += 2;
        } else if (id == 252) { /* XLR_BLOCK_ID_TOPLEVEL_XID */
            TAKE(4);
            p += 4;
        } else if (id <= 32) { /* XLR_MAX_BLOCK_ID */
            if ((int)id <= max_id) return fail(lsn, "an out-of-order block id");
            max_id = id;
            TAKE(3);
            uint8_t flags = p[0];
            datatotal += u16(p + 1);
            p += 3;
            if (flags & 0x10) { /* BKPBLOCK_HAS_IMAGE */
                TAKE(5);
                uint16_t image_length = u16(p);
                uint8_t image_info = p[4];
                p += 5;
                if ((image_info & s->compressed_mask) && (image_info & 0x01)) { /* + hole */
                    TAKE(2);
                    p += 2;
                }
                datatotal += image_length;
            }
            if (!(flags & 0x80)) { /* not BKPBLOCK_SAME_REL: a RelFileNode follows */
                TAKE(12);
                spc = u32(p);
                db = u32(p + 4);
                rel = u32(p + 8);
                p += 12;
                have_rel = 1;
            } else if (!have_rel) {
                return fail(lsn, "BKPBLOCK_SAME_REL without a previous relation");
            }
            TAKE(4);
            uint32_t block = u32(p);
            p += 4;
            if ((flags & 0x0F) == 0 && add_block(s, spc, db, rel, block)) return -1;
        } else {
            return fail(lsn, "an invalid block id");
        }
    }
#undef TAKE
    if (remaining != datatotal) return fail(lsn, "data lengths that do not add up");
    return main_data(s, r[17], r[16], r + length - main_length, (uint32_t)main_length, lsn);
}

/* ---- pages and segments -------------------------------------------------------------------- */

static int check_page(Scanner *s, const unsigned char *page, uint64_t at, int first) {
    uint16_t info = u16(page + 2);
    if (u16(page) != s->magic || u64(page + 8) != at || ((info & XLP_LONG_HEADER) != 0) != first) {
        raise_value_error("the WAL page at %X/%X is not that page of this server's WAL (magic %04X,"
                          " position %X/%X)",
                          (unsigned)(at >> 32), (unsigned)at, u16(page),
                          (unsigned)(u64(page + 8) >> 32), (unsigned)u64(page + 8));
        return -1;
    }
    if (first && (u64(page + 24) != s->system_identifier || u32(page + 32) != s->segment_size ||
                  u32(page + 36) != WAL_PAGE)) {
        raise_value_error("the WAL segment at %X/%X belongs to another database system or has"
                          " another segment or page size",
                          (unsigned)(at >> 32), (unsigned)at);
        return -1;
    }
    return 0;
}

/* 0, or -1 with an exception set */
static int feed(Scanner *s, const unsigned char *seg, uint64_t lsn, uint64_t valid) {
    uint64_t pages = (valid + WAL_PAGE - 1) / WAL_PAGE;
    for (uint64_t i = 0; i < pages; i++) {
        const unsigned char *page = seg + i * WAL_PAGE;
        uint64_t page_lsn = lsn + i * WAL_PAGE;
        if (check_page(s, page, page_lsn, i == 0)) return -1;
        uint16_t info = u16(page + 2);
        uint32_t pos = info & XLP_LONG_HEADER ? LONG_PHD : SHORT_PHD;
        if (info & XLP_FIRST_IS_CONTRECORD) {
            uint32_t rem = u32(page + 16);
            uint32_t here = rem < WAL_PAGE - pos ? rem : WAL_PAGE - pos;
            if (s->rec_have < s->rec_length) {
                if (rem != s->rec_length - s->rec_have)
                    return fail(s->rec_lsn, "a continuation of the wrong length");
                memcpy(s->rec + s->rec_have, page + pos, here);
                s->rec_have += here;
                if (s->rec_have == s->rec_length) {
                    int done = record(s, s->rec, s->rec_length, s->rec_lsn);
                    if (done < 0) return -1;
                    if (done) return 0; /* a switch: the rest of the segment is unused */
                }
            }
            /* else the scan started inside this record: skip its end */
            pos = (uint32_t)(((uint64_t)pos + here + 7) & ~7ull);
        } else if (s->rec_have < s->rec_length) {
            return fail(s->rec_lsn, "a record whose continuation is missing");
        }
        while (pos < WAL_PAGE) {
            uint64_t at = page_lsn + pos;
            if (at >= lsn + valid) return 0;
            uint32_t length = u32(page + pos);
            if (length < RECORD_HEADER || length > MAX_RECORD)
                return fail(at, length ? "an invalid length" : "the end of the WAL (a zero length)");
            if (length <= WAL_PAGE - pos) {
                int done = record(s, page + pos, length, at);
                if (done < 0) return -1;
                if (done) return 0;
                pos = (pos + length + 7) & ~7u;
                continue;
            }
            if (length > s->rec_capacity) {
                unsigned char *rec = PyMem_Realloc(s->rec, length);
                if (!rec) {
                    PyErr_NoMemory();
                    return -1;
                }
                s->rec = rec;
                s->rec_capacity = length;
            }
            memcpy(s->rec, page + pos, WAL_PAGE - pos);
            s->rec_have = WAL_PAGE - pos;
            s->rec_length = length;
            s->rec_lsn = at;
            break;
        }
    }
    return 0;
}

/* ---- the Python type ----------------------------------------------------------------------- */

static int Scanner_init(Scanner *s, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    unsigned int magic, mask, segment_size, dbase_drop;
    unsigned long long sysid, max_blocks, since;
    if (!PyArg_ParseTuple(args, "IIKIKKI", &magic, &mask, &sysid, &segment_size, &max_blocks,
                          &since, &dbase_drop))
        return -1;
    if (dbase_drop != 0x10 && dbase_drop != 0x20) {
        PyErr_SetString(PyExc_ValueError, "XLOG_DBASE_DROP is 0x10 or 0x20");
        return -1;
    }
    if (segment_size < WAL_PAGE || segment_size % WAL_PAGE) {
        PyErr_SetString(PyExc_ValueError, "the segment size is not a multiple of the WAL page");
        return -1;
    }
    s->magic = (uint16_t)magic;
    s->compressed_mask = (uint8_t)mask;
    s->dbase_drop = (uint8_t)dbase_drop;
    s->system_identifier = sysid;
    s->segment_size = segment_size;
    s->max_blocks = max_blocks;
    s->since = since;
    return 0;
}

static void Scanner_dealloc(Scanner *s) {
    for (uint32_t i = 0; i < s->table_size; i++) PyMem_Free(s->table[i].blocks);
    PyMem_Free(s->table);
    PyMem_Free(s->rec);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Scanner_feed(Scanner *s, PyObject *args) {
    Py_buffer segment;
    unsigned long long lsn, valid;
    if (!PyArg_ParseTuple(args, "y*KK", &segment, &lsn, &valid)) return NULL;
    const char *problem = NULL;
    if ((uint64_t)segment.len != s->segment_size) problem = "a WAL segment of the wrong size";
    else if (lsn % s->segment_size) problem = "a segment position that is not a segment start";
    else if (valid == 0 || valid > s->segment_size) problem = "a valid length outside the segment";
    else if (s->next_lsn && lsn != s->next_lsn) problem = "segments out of order";
    if (problem) {
        PyBuffer_Release(&segment);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    int rc = feed(s, segment.buf, lsn, valid);
    PyBuffer_Release(&segment);
    if (rc) return NULL;
    s->next_lsn = lsn + s->segment_size;
    Py_RETURN_NONE;
}

static PyObject *ranges_of(Relation *r) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < r->count; i++)
        if (i == 0 || r->blocks[i] != r->blocks[i - 1] + 1) n++;
    PyObject *starts = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * 4);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * 4);
    if (!starts || !ends) {
        Py_XDECREF(starts);
        Py_XDECREF(ends);
        return NULL;
    }
    uint32_t *a = (uint32_t *)PyBytes_AS_STRING(starts), *b = (uint32_t *)PyBytes_AS_STRING(ends);
    uint32_t k = 0;
    for (uint32_t i = 0; i < r->count; i++) {
        if (i == 0 || r->blocks[i] != r->blocks[i - 1] + 1) a[k++] = r->blocks[i];
        b[k - 1] = r->blocks[i] + 1;
    }
    return Py_BuildValue("(NN)", starts, ends);
}

static PyObject *Scanner_result(Scanner *s, PyObject *Py_UNUSED(ignored)) {
    if (s->rec_have < s->rec_length) {
        PyErr_SetString(PyExc_ValueError, "the WAL read ends inside a record");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (uint32_t i = 0; i < s->table_size; i++) {
        Relation *r = &s->table[i];
        if (!r->used) continue;
        compact(s, r);
        PyObject *ranges = ranges_of(r);
        if (!ranges) goto error;
        PyObject *limit = r->limit == NO_LIMIT ? Py_NewRef(Py_None) : PyLong_FromUnsignedLong(r->limit);
        PyObject *item = limit ? Py_BuildValue("(IIIOON)", r->spc, r->db, r->rel,
                                               PyTuple_GET_ITEM(ranges, 0),
                                               PyTuple_GET_ITEM(ranges, 1), limit)
                               : NULL;
        Py_DECREF(ranges);
        if (!item || PyList_Append(list, item)) {
            Py_XDECREF(item);
            goto error;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(NOO)", list, s->minimal ? Py_True : Py_False,
                         s->overflow ? Py_True : Py_False);
error:
    Py_DECREF(list);
    return NULL;
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_VARARGS, "Read one WAL segment."},
    {"result", (PyCFunction)Scanner_result, METH_NOARGS, "The blocks, limits and flags."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "drkit.pg._walblocks.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Gathers the blocks WAL records reference.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walblocks", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__walblocks(void) {
    crc_init_table();
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) crc_update = crc_sse42;
#endif
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
