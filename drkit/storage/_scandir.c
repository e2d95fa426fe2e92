/* One directory of a posix repository listed with sizes, in C.

   A listing must report every object's size, and on a filesystem that is one lstat per file: a
   repository of 100,000 archived WAL files pays 100,000 of them on every `drkit metrics`. From
   Python each costs a DirEntry, a stat_result and a float conversion around the system call;
   here it is the system call alone (the GIL released around it), then one small tuple.

   scan(path) -> (files, dirs) or None
       files  [(name, size), ...] of the regular files (a symbolic link is neither a file nor a
              directory: it is left out, never followed)
       dirs   [name, ...] of the subdirectories
   None when `path` does not exist or is not a directory (nothing below that prefix, or it was
   deleted meanwhile); a file deleted while listed is left out. Raises OSError otherwise.
   Names are decoded as os.listdir decodes them (the filesystem encoding, surrogateescape). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Appends `name` (and its size, for a file) to the right list; 0, or -1 with a Python error. */
static int add(PyObject *files, PyObject *dirs, const char *name, int is_dir, long long size) {
    PyObject *text = PyUnicode_DecodeFSDefault(name);
    if (text == NULL) return -1;
    int rc;
    if (is_dir) {
        rc = PyList_Append(dirs, text);
    } else {
        PyObject *item = Py_BuildValue("(OL)", text, size);
        rc = item == NULL ? -1 : PyList_Append(files, item);
        Py_XDECREF(item);
    }
    Py_DECREF(text);
    return rc;
}

/* Lists the open directory `dir` into the two lists; 0, or -1 with a Python error. */
static int list_dir(DIR *dir, PyObject *path, PyObject *files, PyObject *dirs) {
    int fd = dirfd(dir);
    for (;;) {
        struct dirent *entry;
        errno = 0;
        Py_BEGIN_ALLOW_THREADS
        entry = readdir(dir);
        Py_END_ALLOW_THREADS
        if (entry == NULL) {
            if (errno == 0) return 0;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
            return -1;
        }
        const char *name = entry->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) continue;
        unsigned char type = entry->d_type;
        if (type == DT_DIR) {
            if (add(files, dirs, name, 1, 0) < 0) return -1;
            continue;
        }
        if (type != DT_REG && type != DT_UNKNOWN) continue; /* a link, a socket, a device */
        struct stat st;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW);
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            if (errno == ENOENT) continue; /* deleted while listing */
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
            return -1;
        }
        if (S_ISREG(st.st_mode)) {
            if (add(files, dirs, name, 0, (long long)st.st_size) < 0) return -1;
        } else if (S_ISDIR(st.st_mode)) {
            if (add(files, dirs, name, 1, 0) < 0) return -1;
        }
    }
}

static PyObject *scan(PyObject *self, PyObject *arg) {
    PyObject *path = NULL; /* bytes */
    if (!PyUnicode_FSConverter(arg, &path)) return NULL;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open(PyBytes_AS_STRING(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) {
            Py_DECREF(path);
            Py_RETURN_NONE;
        }
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        Py_DECREF(path);
        return NULL;
    }
    Py_DECREF(path);
    DIR *dir = fdopendir(fd);
    if (dir == NULL) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        close(fd);
        return NULL;
    }
    PyObject *files = PyList_New(0);
    PyObject *dirs = PyList_New(0);
    PyObject *result = NULL;
    if (files != NULL && dirs != NULL && list_dir(dir, arg, files, dirs) == 0)
        result = PyTuple_Pack(2, files, dirs);
    closedir(dir);
    Py_XDECREF(files);
    Py_XDECREF(dirs);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(path) -> ([(name, size)], [dir name]) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scandir", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scandir(void) { return PyModule_Create(&module); }
