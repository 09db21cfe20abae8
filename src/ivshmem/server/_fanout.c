/* The server's fan-out in C: an optional accelerator for queues.py's _dispatch.
 *
 * One call makes all the direct sends of a join or a leave: each protocol message --
 * (recipient, value, SharedFd or None) -- goes to the socket its recipient maps to, as its
 * own sendmsg() (with SCM_RIGHTS for an fd) and MSG_DONTWAIT | MSG_NOSIGNAL, until the kernel
 * refuses a message for that recipient; from there on that recipient's messages are left for
 * the caller to queue, in order, while the others' are still sent. Consecutive messages for
 * one recipient (a join's handshake, a newcomer's vectors) go in one sendmmsg() call, which
 * is one sendmsg() per message inside the kernel: each fd still travels attached to the first
 * byte of its own 8-byte message, as the protocol and QEMU's reader want:
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
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE, for sendmmsg() */
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

/* The protocol's little-endian int64, spelled out for any host. */
static void encode(unsigned char *buf, long long value)
{
    uint64_t u = (uint64_t)value;
    for (int b = 0; b < 8; b++)
        buf[b] = (unsigned char)(u >> (8 * b));
}

/* Most messages one sendmmsg() call carries: a join's handshake to its newcomer is one run
 * of 3 + vectors x peers messages, sent BATCH at a time. */
#define BATCH 64

typedef union {
    char space[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} control_t;

/* One run of messages for one socket: their bytes, their fds (-1: none) and the headers. */
typedef struct {
    unsigned char bytes[BATCH][8];
    int fds[BATCH];
    struct iovec iov[BATCH];
    control_t control[BATCH];
    struct mmsghdr headers[BATCH];
} run_t;

/* Send messages [0, n) of ``run`` to ``sock``, each its own sendmsg() -- so each fd travels
 * with the first byte of its own message, exactly as one sendmsg() per message would send
 * it -- in as few system calls as sendmmsg() allows. Returns how many messages the kernel
 * took (the last one possibly in part: ``*last_len`` is its byte count), or -errno if it
 * took none. sendmmsg() stops at the first message the kernel refuses or takes in part. */
static long send_run(int sock, run_t *run, int n, long *last_len)
{
    for (int k = 0; k < n; k++) {
        struct msghdr *msg = &run->headers[k].msg_hdr;
        memset(msg, 0, sizeof *msg);
        run->iov[k].iov_base = run->bytes[k];
        run->iov[k].iov_len = 8;
        msg->msg_iov = &run->iov[k];
        msg->msg_iovlen = 1;
        run->headers[k].msg_len = 0;
        if (run->fds[k] >= 0) {
            memset(&run->control[k], 0, sizeof run->control[k]);
            msg->msg_control = run->control[k].space;
            msg->msg_controllen = sizeof run->control[k].space;
            struct cmsghdr *cmsg = CMSG_FIRSTHDR(msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &run->fds[k], sizeof(int));
        }
    }
    int sent;
    do {
        if (n == 1) {
            ssize_t bytes = sendmsg(sock, &run->headers[0].msg_hdr, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (bytes >= 0)
                run->headers[0].msg_len = (unsigned int)bytes;
            sent = bytes < 0 ? -1 : 1;
        } else {
            sent = sendmmsg(sock, run->headers, (unsigned int)n, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
    } while (sent < 0 && errno == EINTR);
    if (sent <= 0)
        return sent < 0 ? -(long)errno : -(long)EAGAIN;
    *last_len = (long)run->headers[sent - 1].msg_len;
    return sent;
}

/* Read message ``item`` -- (recipient, value, SharedFd or None) -- into slot ``k`` of ``run``;
 * 0 if it is unusual (the caller's Python path takes over there), with no error set. */
static int load(PyObject *item, run_t *run, int k)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(item, 1), &overflow);
    if (overflow || (value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    PyObject *holder = PyTuple_GET_ITEM(item, 2);
    int fd = -1;
    if (holder != Py_None) {
        PyObject *number = PyObject_GetAttr(holder, fd_name);
        if (number == NULL) {
            PyErr_Clear();
            return 0;
        }
        long n = PyLong_AsLongAndOverflow(number, &overflow);
        Py_DECREF(number);
        if (overflow || n < 0 || n > INT32_MAX) {
            PyErr_Clear();
            return 0; /* closed: the Python path raises ClosedError */
        }
        fd = (int)n;
    }
    encode(run->bytes[k], value);
    run->fds[k] = fd;
    return 1;
}

static PyObject *fanout_send(PyObject *self, PyObject *args)
{
    PyObject *sends, *socks;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &sends, &PyDict_Type, &socks))
        return NULL;
    run_t *run = PyMem_Malloc(sizeof *run);
    PyObject *rest = PyList_New(0);
    PyObject *partials = PyList_New(0);
    if (run == NULL || rest == NULL || partials == NULL) {
        if (run == NULL)
            PyErr_NoMemory();
        goto error;
    }
    Py_ssize_t count = PyList_GET_SIZE(sends);
    Py_ssize_t i = 0;
    while (i < count) {
        PyObject *item = PyList_GET_ITEM(sends, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3)
            break;
        PyObject *recipient = PyTuple_GET_ITEM(item, 0);
        PyObject *entry = PyDict_GetItemWithError(socks, recipient);
        if (entry == NULL) {
            if (PyErr_Occurred())
                goto error;
            if (append_index(rest, i) < 0) /* queued or gone: the caller decides */
                goto error;
            i++;
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
            i++;
            continue;
        }
        long done = PyLong_AsLongAndOverflow(PyList_GET_ITEM(entry, 1), &overflow);
        if (overflow || done < 0 || done >= LONG_MAX - BATCH) {
            PyErr_Clear();
            break;
        }
        /* The run: this message and those right after it for the same recipient. */
        int n = 0;
        int unusual = 0;
        Py_ssize_t j = i;
        while (j < count && n < BATCH) {
            PyObject *next = PyList_GET_ITEM(sends, j);
            if (!PyTuple_CheckExact(next) || PyTuple_GET_SIZE(next) != 3) {
                unusual = 1;
                break;
            }
            if (j > i) {
                if (!PyLong_CheckExact(PyTuple_GET_ITEM(next, 0)))
                    break; /* a run ends at anything but an int, and only ints are compared */
                int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(next, 0), recipient, Py_EQ);
                if (same < 0) {
                    PyErr_Clear();
                    unusual = 1;
                    break;
                }
                if (!same)
                    break;
            }
            if (!load(next, run, n)) {
                unusual = 1;
                break;
            }
            n++;
            j++;
        }
        if (n == 0)
            break; /* message i itself is unusual */
        long last_len = 8;
        long sent = send_run((int)sock, run, n, &last_len);
        if (sent < 0) {
            if (set_item(entry, 0, sent) < 0)
                goto error;
            sent = 0;
        } else {
            /* Sent, whole or in part (its fd went with byte 0): counted either way. An
             * allocation failing after the send loses the count: MemoryError, as the Python
             * path would raise it. */
            if (set_item(entry, 1, done + sent) < 0)
                goto error;
            if (last_len < 8) {
                PyObject *pair = Py_BuildValue("(nl)", i + sent - 1, last_len);
                if (pair == NULL)
                    goto error;
                int rc = PyList_Append(partials, pair);
                Py_DECREF(pair);
                if (rc < 0 || set_item(entry, 0, PARTIAL) < 0)
                    goto error;
            } else if (sent < n && set_item(entry, 0, -(long)EAGAIN) < 0) {
                /* refused part-way (sendmmsg() does not say why): the rest is queued, and
                 * flushing meets the condition again */
                goto error;
            }
        }
        for (Py_ssize_t k = i + sent; k < j; k++)
            if (append_index(rest, k) < 0)
                goto error;
        i = j;
        if (unusual)
            break;
    }
    PyMem_Free(run);
    PyObject *result = Py_BuildValue("(nNN)", i, rest, partials); /* steals both lists */
    return result;
error:
    PyMem_Free(run);
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
