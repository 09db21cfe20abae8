/* The server's fan-out in C: an optional accelerator for queues.py's _dispatch.
 *
 * One call makes all the direct sends of a join or a leave: each protocol message --
 * (recipient, value, SharedFd or None) -- goes to the socket its recipient maps to, with
 * send() or sendmsg(SCM_RIGHTS) and MSG_DONTWAIT | MSG_NOSIGNAL, until the kernel refuses a
 * message for that recipient; from there on that recipient's messages are left for the
 * caller to queue, in order, while the others' are still sent:
 *
 *   send(sends, socks) -> (index, rest, partials)
 *
 * ``sends`` is a list of 3-tuples; ``socks`` maps each recipient that may be sent to directly
 * to a 2-item list [socket fd, count]. A message fully sent adds one to its recipient's
 * count. A refused one (EAGAIN, EPIPE, ETOOMANYREFS...) sets the socket fd to -errno, and
 * one the kernel took only part of (its fd went with byte 0) is counted and sets it to
 * PARTIAL; a recipient whose socket fd is negative is sent nothing more. Returned:
 *
 *   index     len(sends), or the first message with anything unusual (not a 3-tuple, a
 *             closed SharedFd, a value out of range), where nothing was tried and the caller's
 *             Python path takes over: messages from ``index`` on were not looked at;
 *   rest      the indexes (ascending) of the messages before ``index`` not sent: their
 *             recipient is not in ``socks`` (it has a queue, or is gone) or was refused;
 *   partials  (index, bytes taken) for each message taken in part.
 *
 * queues.py is the reference: it sends one message at a time from Python when this module is
 * absent or IVSHMEM_PURE_PYTHON=1, and queues ``rest`` exactly as it queues what its own loop
 * did not send, so per-client queues, flow control and fd accounting see the same state. The
 * fd of a SharedFd is read from its ``_fd`` slot: the caller's references (a table entry
 * owns each) keep it open and its number unreused during the call, and no Python code runs
 * inside the loop, so neither the list nor the dict can change under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define PARTIAL (-65536) /* below every -errno */

static PyObject *fd_name; /* "_fd" */

/* Set entry[slot] to value; -1 on failure (an allocation), with the error set. */
static int set_item(PyObject *entry, Py_ssize_t slot, long value)
{
    PyObject *number = PyLong_FromLong(value);
    if (number == NULL)
        return -1;
    PyList_SetItem(entry, slot, number); /* steals number, drops the old item */
    return 0;
}

static int append_index(PyObject *list, Py_ssize_t index)
{
    PyObject *number = PyLong_FromSsize_t(index);
    if (number == NULL)
        return -1;
    int rc = PyList_Append(list, number);
    Py_DECREF(number);
    return rc;
}

/* Send one 8-byte message (and ``fd`` if >= 0); the byte count or -errno. */
static long send_one(int sock, long long value, int fd)
{
    /* The protocol's little-endian int64, spelled out for any host. */
    unsigned char buf[8];
    uint64_t u = (uint64_t)value;
    for (int b = 0; b < 8; b++)
        buf[b] = (unsigned char)(u >> (8 * b));
    ssize_t sent;
    do {
        if (fd < 0) {
            sent = send(sock, buf, sizeof buf, MSG_DONTWAIT | MSG_NOSIGNAL);
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
            sent = sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
    } while (sent < 0 && errno == EINTR);
    return sent < 0 ? -(long)errno : (long)sent;
}

static PyObject *fanout_send(PyObject *self, PyObject *args)
{
    PyObject *sends, *socks;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &sends, &PyDict_Type, &socks))
        return NULL;
    PyObject *rest = PyList_New(0);
    PyObject *partials = PyList_New(0);
    if (rest == NULL || partials == NULL)
        goto error;
    Py_ssize_t count = PyList_GET_SIZE(sends);
    Py_ssize_t i;
    for (i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(sends, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3)
            break;
        PyObject *entry = PyDict_GetItemWithError(socks, PyTuple_GET_ITEM(item, 0));
        if (entry == NULL) {
            if (PyErr_Occurred())
                goto error;
            if (append_index(rest, i) < 0) /* queued or gone: the caller decides */
                goto error;
            continue;
        }
        if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) != 2)
            break;
        int overflow = 0;
        long sock = PyLong_AsLongAndOverflow(PyList_GET_ITEM(entry, 0), &overflow);
        if (overflow || sock > INT32_MAX || (sock == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            break;
        }
        if (sock < 0) { /* refused before: everything after it is queued, in order */
            if (append_index(rest, i) < 0)
                goto error;
            continue;
        }
        long done = PyLong_AsLongAndOverflow(PyList_GET_ITEM(entry, 1), &overflow);
        if (overflow || done < 0 || done >= LONG_MAX) {
            PyErr_Clear();
            break;
        }
        long long value = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(item, 1), &overflow);
        if (overflow || (value == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            break;
        }
        PyObject *holder = PyTuple_GET_ITEM(item, 2);
        int fd = -1;
        if (holder != Py_None) {
            PyObject *number = PyObject_GetAttr(holder, fd_name);
            if (number == NULL) {
                PyErr_Clear();
                break;
            }
            long n = PyLong_AsLongAndOverflow(number, &overflow);
            Py_DECREF(number);
            if (overflow || n < 0 || n > INT32_MAX) {
                PyErr_Clear();
                break; /* closed: the Python path raises ClosedError */
            }
            fd = (int)n;
        }
        long sent = send_one((int)sock, value, fd);
        if (sent < 0) {
            if (set_item(entry, 0, sent) < 0 || append_index(rest, i) < 0)
                goto error;
            continue;
        }
        /* Sent, whole or in part (its fd went with byte 0): counted either way. An
         * allocation failing after the send loses the count: MemoryError, as the Python
         * path would raise it. */
        if (set_item(entry, 1, done + 1) < 0)
            goto error;
        if (sent < 8) {
            PyObject *pair = Py_BuildValue("(nl)", i, sent);
            if (pair == NULL)
                goto error;
            int rc = PyList_Append(partials, pair);
            Py_DECREF(pair);
            if (rc < 0 || set_item(entry, 0, PARTIAL) < 0)
                goto error;
        }
    }
    PyObject *result = Py_BuildValue("(nNN)", i, rest, partials); /* steals both lists */
    return result;
error:
    Py_XDECREF(rest);
    Py_XDECREF(partials);
    return NULL;
}

static PyMethodDef fanout_methods[] = {
    {"send", fanout_send, METH_VARARGS,
     "send(sends, socks) -> (index, rest, partials): make the direct sends of a fan-out "
     "(see _fanout.c)."},
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
    PyObject *module = PyModule_Create(&fanout_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "PARTIAL", PARTIAL) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
