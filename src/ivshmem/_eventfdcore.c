/* Taking the count of an eventfd without ever blocking, whatever O_NONBLOCK says: an optional
 * accelerator for _eventfd.py's try_read (the reference, in Python, used when this module is
 * absent or IVSHMEM_PURE_PYTHON=1).
 *
 *   try_read(fd) -> bool
 *
 * True when a count was taken (the counter is zero again), False when there was none; OSError
 * for anything else (a closed fd, not an eventfd...). The read is a preadv2() with RWF_NOWAIT:
 * Linux's eventfd answers EAGAIN to it, as to a read on a non-blocking file, even when some
 * other holder of the fd cleared O_NONBLOCK on the open file description we share (_eventfd.py
 * says why that matters and checks at import that this kernel does it).
 *
 * Why C for two syscall wrappers' worth of work: this is the doorbell's spin loop. From Python,
 * an empty read costs about 0.6 µs, most of it raising and catching BlockingIOError; here it
 * is a bool. The GIL is kept across the call: RWF_NOWAIT means the kernel never sleeps in it
 * (an eventfd read takes a spinlock and returns, well under a microsecond), and dropping and
 * taking the GIL would cost about as much as the read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE, for preadv2() */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <sys/uio.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008 /* linux/fs.h */
#endif

static PyObject *try_read(PyObject *module, PyObject *arg)
{
    (void)module;
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "fd %ld is not a file descriptor", fd);
        return NULL;
    }
    uint64_t count;
    struct iovec iov = {&count, sizeof count};
    for (;;) {
        /* offset -1: the file position, which an eventfd ignores (as read() would) */
        ssize_t n = preadv2((int)fd, &iov, 1, -1, RWF_NOWAIT);
        if (n == (ssize_t)sizeof count)
            Py_RETURN_TRUE;
        if (n >= 0) { /* an eventfd always gives 8 bytes: not an eventfd */
            PyErr_Format(PyExc_OSError, "fd %ld gave %zd bytes, not an eventfd's 8", fd, n);
            return NULL;
        }
        if (errno == EAGAIN)
            Py_RETURN_FALSE;
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0) /* as os.read does after EINTR */
            return NULL;
    }
}

static PyMethodDef methods[] = {
    {"try_read", try_read, METH_O,
     "try_read(fd) -> bool: take eventfd fd's count without blocking (even if O_NONBLOCK "
     "was cleared); False if it had none."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_eventfdcore",
    .m_doc = "The non-blocking eventfd read in C (see _eventfd.py).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__eventfdcore(void) { return PyModuleDef_Init(&module); }
