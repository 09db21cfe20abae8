/* The server's fan-out in C: an optional accelerator for queues.py's _dispatch.
 *
 * One call sends a run of protocol messages -- (recipient, value, SharedFd or None) -- each to
 * the socket its recipient maps to, with send() or sendmsg(SCM_RIGHTS) and
 * MSG_DONTWAIT | MSG_NOSIGNAL, and stops at the first message it does not fully send:
 *
 *   send(sends, socks, start) -> (index, code, err)
 *
 * ``sends`` is a list of 3-tuples, ``socks`` a dict from recipient to a 2-item list
 * [socket fd, count]; each message fully sent adds one to its recipient's count. The call
 * returns at the first message it did not fully send, or at len(sends):
 *
 *   code 8      every message from ``start`` on was sent (index == len(sends));
 *   code 1..7   the kernel took only that many bytes of message ``index`` (its fd went
 *               with byte 0); it is not counted;
 *   code -1     send failed with errno ``err`` (EAGAIN, EPIPE, ...): nothing of it went;
 *   code -2     its recipient is not in ``socks`` (queued, gone): nothing was tried;
 *   code -3     anything unusual (not a tuple, a closed SharedFd, a value out of range):
 *               nothing was tried; the Python path deals with it and raises what it raises.
 *
 * queues.py is the reference: it falls back to its Python loop when this module is absent
 * or IVSHMEM_PURE_PYTHON=1, and takes over at ``index`` with its queues and flow control, so
 * a client whose socket is full, or that vanished, is handled exactly as before. The fd of a
 * SharedFd is read from its ``_fd`` slot; the SharedFd's reference held by the caller keeps it
 * open (and its number unreused) for the duration of the call. No Python code runs between
 * two sends, so neither the list nor the dict can change under the loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

static PyObject *fd_name; /* "_fd" */

static PyObject *result(Py_ssize_t index, int code, int err)
{
    return Py_BuildValue("(nii)", index, code, err);
}

static PyObject *fanout_send(PyObject *self, PyObject *args)
{
    PyObject *sends, *socks;
    Py_ssize_t start;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!n", &PyList_Type, &sends, &PyDict_Type, &socks, &start))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(sends);
    if (start < 0)
        start = 0;
    for (Py_ssize_t i = start; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(sends, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3)
            return result(i, -3, 0);
        PyObject *recipient = PyTuple_GET_ITEM(item, 0);
        PyObject *entry = PyDict_GetItemWithError(socks, recipient);
        if (entry == NULL) {
            if (PyErr_Occurred())
                return NULL;
            return result(i, -2, 0);
        }
        if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 2)
            return result(i, -3, 0);
        int overflow = 0;
        long sockfd = PyLong_AsLongAndOverflow(PyList_GET_ITEM(entry, 0), &overflow);
        if (overflow || sockfd < 0 || sockfd > INT32_MAX) {
            PyErr_Clear();
            return result(i, -3, 0);
        }
        long done = PyLong_AsLongAndOverflow(PyList_GET_ITEM(entry, 1), &overflow);
        if (overflow || done < 0 || done >= LONG_MAX) {
            PyErr_Clear();
            return result(i, -3, 0);
        }
        long long value = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(item, 1), &overflow);
        if (overflow || (value == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return result(i, -3, 0);
        }
        PyObject *holder = PyTuple_GET_ITEM(item, 2);
        int fd = -1;
        if (holder != Py_None) {
            PyObject *number = PyObject_GetAttr(holder, fd_name);
            if (number == NULL) {
                PyErr_Clear();
                return result(i, -3, 0);
            }
            long n = PyLong_AsLongAndOverflow(number, &overflow);
            Py_DECREF(number);
            if (overflow || n < 0 || n > INT32_MAX) {
                PyErr_Clear();
                return result(i, -3, 0); /* closed: the Python path raises ClosedError */
            }
            fd = (int)n;
        }
        /* The protocol's little-endian int64 (x86-64 and the other little-endian hosts
         * store it so; spelled out for the rest). */
        unsigned char buf[8];
        uint64_t u = (uint64_t)value;
        for (int b = 0; b < 8; b++)
            buf[b] = (unsigned char)(u >> (8 * b));
        ssize_t sent;
        do {
            if (fd < 0) {
                sent = send((int)sockfd, buf, sizeof buf, MSG_DONTWAIT | MSG_NOSIGNAL);
            } else {
                union {
                    char space[CMSG_SPACE(sizeof(int))];
                    struct cmsghdr align;
                } control;
                struct iovec iov = {buf, sizeof buf};
                struct msghdr msg;
                memset(&msg, 0, sizeof msg);
                memset(&control, 0, sizeof control);
                msg.msg_iov = &iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.space;
                msg.msg_controllen = sizeof control.space;
                struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
                cmsg->cmsg_level = SOL_SOCKET;
                cmsg->cmsg_type = SCM_RIGHTS;
                cmsg->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
                sent = sendmsg((int)sockfd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
            }
        } while (sent < 0 && errno == EINTR);
        if (sent < 0)
            return result(i, -1, errno);
        if (sent < (ssize_t)sizeof buf)
            return result(i, (int)sent, 0);
        /* Counted: [fd, count] -> [fd, count + 1] (small ints are cached: no allocation
         * below 256, and a failed one leaves the message sent but uncounted -- reported as
         * MemoryError, like any allocation failure in the Python path). */
        PyObject *next = PyLong_FromLong(done + 1);
        if (next == NULL)
            return NULL;
        PyList_SetItem(entry, 1, next); /* steals next, drops the old count */
    }
    return result(count, 8, 0);
}

static PyMethodDef fanout_methods[] = {
    {"send", fanout_send, METH_VARARGS,
     "send(sends, socks, start) -> (index, code, err): send messages until one is not fully "
     "sent (see _fanout.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fanout_module = {
    PyModuleDef_HEAD_INIT, "_fanout", "The server's fan-out in C (see _fanout.c).", -1,
    fanout_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fanout(void)
{
    fd_name = PyUnicode_InternFromString("_fd");
    if (fd_name == NULL)
        return NULL;
    return PyModule_Create(&fanout_module);
}
