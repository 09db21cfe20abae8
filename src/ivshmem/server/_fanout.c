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

/* ---------------------------------------------------------------------------------------
 * Wire: the peers' sockets and eventfds, kept here so that a join's or a leave's fan-out is
 * one call that looks at nothing in Python. It mirrors the server's peer table (core.py adds
 * and removes each peer here as it adds it to and removes it from the table) and, per peer,
 * whether messages may go straight to its socket: a peer is HELD from the moment the
 * kernel refuses it a message (or takes one in part), or queues.py queues anything for it,
 * until queues.py has flushed its queue empty and releases it. Nothing is ever sent here to
 * a held peer: what a join or a leave has for it is handed back, in order, to be queued.
 *
 *   Wire(vectors, shm_fd)
 *   add(peer, sock, eventfds)      a peer joins the table (not held)
 *   remove(peer)                   it leaves (nothing announced)
 *   hold(peer) / release(peer)     queues.py queues for it / has flushed it empty
 *   join(peer) -> (sent, newcomer_sent, rest, partials, gone)
 *   leave(peer) -> (sent, rest, partials, gone)   removes it and tells every other peer
 *   stats(peer) -> (sent, progress)
 *
 * join() sends what PeerTable.join lists, in its order: to each other peer, in table order,
 * the newcomer's vectors (value: its id); then to the newcomer the version, its id, the
 * region's fd, each other peer's vectors and its own. leave() sends each other peer the
 * leaver's id. ``rest`` lists the messages not sent, as (recipient, value, owner, vector):
 * the fd is owner's eventfd ``vector``, or the region's (owner -1), or none (owner -2).
 * ``partials`` lists (recipient, value, bytes taken) for a message taken in part (counted
 * as sent: its fd went with byte 0). ``sent`` counts every message sent; ``stats`` gives,
 * per peer, how many were sent to it here and when the last one was (time.monotonic()).
 * ``gone`` lists the peers whose socket refused a message with EPIPE or ECONNRESET: their
 * end is closed, so nothing more is sent to them or handed back for them (when many peers
 * leave at once, each leave would otherwise queue a message for every other one that is
 * leaving), and the caller disconnects them.
 * -------------------------------------------------------------------------------------- */

#include <time.h>

#define MAX_PEERS 65536
#define NO_FD (-2)
#define SHM_FD (-1)
#define PROTOCOL_VERSION 0
#define SHM_MARKER (-1)

typedef struct entry {
    int peer;
    int sock;
    int held;
    int gone; /* its socket refused with EPIPE: nothing sent to it can be read */
    unsigned long long sent;
    double progress;
    struct entry *prev, *next; /* table order: the order of joining */
    int fds[];                 /* one per vector */
} entry_t;

typedef struct {
    PyObject_HEAD
    int vectors;
    int shm;
    Py_ssize_t count;
    entry_t *first, *last;
    entry_t **by_id; /* MAX_PEERS slots */
} WireObject;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int wire_init(WireObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"vectors", "shm_fd", NULL};
    int vectors, shm;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii", kwlist, &vectors, &shm))
        return -1;
    if (vectors < 0 || vectors > 65536 || shm < 0) {
        PyErr_SetString(PyExc_ValueError, "Wire: vectors must be 0..65536 and shm_fd >= 0");
        return -1;
    }
    if (self->by_id == NULL) {
        self->by_id = PyMem_Calloc(MAX_PEERS, sizeof(entry_t *));
        if (self->by_id == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->vectors = vectors;
    self->shm = shm;
    return 0;
}

static void wire_unlink(WireObject *self, entry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        self->first = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        self->last = e->prev;
    self->by_id[e->peer] = NULL;
    self->count--;
    PyMem_Free(e);
}

static void wire_dealloc(WireObject *self)
{
    if (self->by_id != NULL) {
        while (self->first != NULL)
            wire_unlink(self, self->first);
        PyMem_Free(self->by_id);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The entry of ``peer`` (a Python int), or NULL: with ValueError set if it is out of range
 * or not an int, with KeyError set if it is not on the wire -- unless ``id`` is given, which
 * receives the peer id and leaves "not on the wire" a NULL without an error (for add()). */
static entry_t *wire_find(WireObject *self, PyObject *arg, int *id)
{
    int overflow = 0;
    long peer = PyLong_AsLongAndOverflow(arg, &overflow);
    if (peer == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || peer < 0 || peer >= MAX_PEERS) {
        PyErr_Format(PyExc_ValueError, "peer id out of range 0..%d", MAX_PEERS - 1);
        return NULL;
    }
    if (id != NULL)
        *id = (int)peer;
    entry_t *e = self->by_id == NULL ? NULL : self->by_id[peer];
    if (e == NULL && id == NULL)
        PyErr_Format(PyExc_KeyError, "peer %ld is not on the wire", peer);
    return e;
}

static PyObject *wire_add(WireObject *self, PyObject *args)
{
    PyObject *peer_obj, *fds_obj;
    int sock;
    if (self->by_id == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Wire was not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OiO", &peer_obj, &sock, &fds_obj))
        return NULL;
    int peer;
    if (wire_find(self, peer_obj, &peer) != NULL) {
        PyErr_Format(PyExc_ValueError, "peer %d is already on the wire", peer);
        return NULL;
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(fds_obj, "eventfds must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != self->vectors || sock < 0) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "add: need a socket fd and %d eventfds", self->vectors);
        return NULL;
    }
    entry_t *e = PyMem_Malloc(sizeof(entry_t) + sizeof(int) * (size_t)self->vectors);
    if (e == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (int v = 0; v < self->vectors; v++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, v));
        if ((fd == -1 && PyErr_Occurred()) || fd < 0 || fd > INT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "add: an eventfd out of range");
            PyMem_Free(e);
            Py_DECREF(seq);
            return NULL;
        }
        e->fds[v] = (int)fd;
    }
    Py_DECREF(seq);
    e->peer = peer;
    e->sock = sock;
    e->held = 0;
    e->gone = 0;
    e->sent = 0;
    e->progress = 0.0;
    e->next = NULL;
    e->prev = self->last;
    if (self->last)
        self->last->next = e;
    else
        self->first = e;
    self->last = e;
    self->by_id[peer] = e;
    self->count++;
    Py_RETURN_NONE;
}

static PyObject *wire_remove(WireObject *self, PyObject *arg)
{
    entry_t *e = wire_find(self, arg, NULL);
    if (e == NULL)
        return NULL;
    wire_unlink(self, e);
    Py_RETURN_NONE;
}

static PyObject *wire_set_held(WireObject *self, PyObject *arg, int held)
{
    entry_t *e = wire_find(self, arg, NULL);
    if (e == NULL)
        return NULL;
    e->held = held;
    Py_RETURN_NONE;
}

static PyObject *wire_hold(WireObject *self, PyObject *arg) { return wire_set_held(self, arg, 1); }

static PyObject *wire_release(WireObject *self, PyObject *arg)
{
    return wire_set_held(self, arg, 0);
}

static PyObject *wire_stats(WireObject *self, PyObject *arg)
{
    entry_t *e = wire_find(self, arg, NULL);
    if (e == NULL)
        return NULL;
    return Py_BuildValue("(Kd)", e->sent, e->progress);
}

static PyObject *wire_is_held(WireObject *self, PyObject *arg)
{
    entry_t *e = wire_find(self, arg, NULL);
    if (e == NULL)
        return NULL;
    return PyBool_FromLong(e->held);
}

/* One fan-out in progress: the result lists and what was sent. */
typedef struct {
    run_t *run;
    PyObject *rest;
    PyObject *partials;
    PyObject *gone;
    long long sent;
    double now;
} out_t;

static int note_rest(out_t *out, int recipient, long long value, int owner, int vector)
{
    PyObject *item = Py_BuildValue("(iLii)", recipient, value, owner, vector);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(out->rest, item);
    Py_DECREF(item);
    return rc;
}

/* Send messages [0, n) of out->run to ``e`` (not held); owners[k]/vectors[k] say whose fd
 * message k carries, for ``rest``. Whatever the kernel does not take holds ``e`` and is
 * listed in ``rest``. Returns how many were sent, or -1 with an exception set. */
static long send_to(out_t *out, entry_t *e, int n, const int *owners, const int *vecs,
                    const long long *values)
{
    long sent = 0;
    if (e->gone)
        return 0;
    if (!e->held) {
        long last_len = 8;
        sent = send_run(e->sock, out->run, n, &last_len);
        if (sent == -EPIPE || sent == -ECONNRESET) {
            e->held = e->gone = 1;
            PyObject *peer = PyLong_FromLong(e->peer);
            if (peer == NULL)
                return -1;
            int rc = PyList_Append(out->gone, peer);
            Py_DECREF(peer);
            return rc < 0 ? -1 : 0;
        }
        if (sent < 0) {
            sent = 0;
            e->held = 1;
        } else {
            e->sent += (unsigned long long)sent;
            e->progress = out->now;
            out->sent += sent;
            if (last_len < 8) {
                e->held = 1;
                PyObject *item = Py_BuildValue("(iLl)", e->peer, values[sent - 1], last_len);
                if (item == NULL)
                    return -1;
                int rc = PyList_Append(out->partials, item);
                Py_DECREF(item);
                if (rc < 0)
                    return -1;
            } else if (sent < n) {
                e->held = 1;
            }
        }
    }
    for (long k = sent; k < n; k++)
        if (note_rest(out, e->peer, values[k], owners[k], vecs[k]) < 0)
            return -1;
    return sent;
}

/* A run being filled for one recipient, flushed to it every BATCH messages. */
typedef struct {
    int owners[BATCH];
    int vecs[BATCH];
    long long values[BATCH];
    int n;
    long total; /* sent to this recipient by the runs flushed so far */
} fill_t;

static int fill_flush(out_t *out, entry_t *to, fill_t *f)
{
    if (f->n == 0)
        return 0;
    long sent = send_to(out, to, f->n, f->owners, f->vecs, f->values);
    f->n = 0;
    if (sent < 0)
        return -1;
    f->total += sent;
    return 0;
}

static int fill_add(out_t *out, entry_t *to, fill_t *f, long long value, int fd, int owner,
                    int vector)
{
    int k = f->n;
    encode(out->run->bytes[k], value);
    out->run->fds[k] = fd;
    f->owners[k] = owner;
    f->vecs[k] = vector;
    f->values[k] = value;
    f->n++;
    if (f->n == BATCH)
        return fill_flush(out, to, f);
    return 0;
}

static int out_start(out_t *out)
{
    out->run = PyMem_Malloc(sizeof *out->run);
    out->rest = PyList_New(0);
    out->partials = PyList_New(0);
    out->gone = PyList_New(0);
    out->sent = 0;
    out->now = monotonic_now();
    if (out->run == NULL || out->rest == NULL || out->partials == NULL || out->gone == NULL) {
        if (out->run == NULL)
            PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void out_clear(out_t *out)
{
    PyMem_Free(out->run);
    Py_XDECREF(out->rest);
    Py_XDECREF(out->partials);
    Py_XDECREF(out->gone);
}

static PyObject *wire_join(WireObject *self, PyObject *arg)
{
    entry_t *newcomer = wire_find(self, arg, NULL);
    if (newcomer == NULL)
        return NULL;
    out_t out;
    fill_t *f = PyMem_Malloc(sizeof *f);
    if (f == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (out_start(&out) < 0)
        goto error;
    int peer = newcomer->peer, V = self->vectors;
    /* The announcements: each other peer gets the newcomer's vectors. */
    for (entry_t *e = self->first; e != NULL; e = e->next) {
        if (e == newcomer)
            continue;
        f->n = 0;
        f->total = 0;
        for (int v = 0; v < V; v++)
            if (fill_add(&out, e, f, peer, newcomer->fds[v], peer, v) < 0)
                goto error;
        if (fill_flush(&out, e, f) < 0)
            goto error;
    }
    /* The handshake. */
    f->n = 0;
    f->total = 0;
    if (fill_add(&out, newcomer, f, PROTOCOL_VERSION, -1, NO_FD, 0) < 0 ||
        fill_add(&out, newcomer, f, peer, -1, NO_FD, 0) < 0 ||
        fill_add(&out, newcomer, f, SHM_MARKER, self->shm, SHM_FD, 0) < 0)
        goto error;
    for (entry_t *e = self->first; e != NULL; e = e->next) {
        if (e == newcomer)
            continue;
        for (int v = 0; v < V; v++)
            if (fill_add(&out, newcomer, f, e->peer, e->fds[v], e->peer, v) < 0)
                goto error;
    }
    for (int v = 0; v < V; v++)
        if (fill_add(&out, newcomer, f, peer, newcomer->fds[v], peer, v) < 0)
            goto error;
    if (fill_flush(&out, newcomer, f) < 0)
        goto error;
    long mine = f->total;
    PyMem_Free(f);
    PyMem_Free(out.run);
    return Py_BuildValue("(LlNNN)", out.sent, mine, out.rest, out.partials, out.gone);
error:
    PyMem_Free(f);
    out_clear(&out);
    return NULL;
}

static PyObject *wire_leave(WireObject *self, PyObject *arg)
{
    entry_t *leaver = wire_find(self, arg, NULL);
    if (leaver == NULL)
        return NULL;
    int peer = leaver->peer;
    wire_unlink(self, leaver);
    out_t out;
    if (out_start(&out) < 0) {
        out_clear(&out);
        return NULL;
    }
    static const int owners[1] = {NO_FD}, vecs[1] = {0};
    long long values[1] = {peer};
    encode(out.run->bytes[0], peer);
    out.run->fds[0] = -1;
    for (entry_t *e = self->first; e != NULL; e = e->next) {
        if (send_to(&out, e, 1, owners, vecs, values) < 0) {
            out_clear(&out);
            return NULL;
        }
    }
    PyMem_Free(out.run);
    return Py_BuildValue("(LNNN)", out.sent, out.rest, out.partials, out.gone);
}

static Py_ssize_t wire_len(WireObject *self) { return self->count; }

/* ``peer in wire``: False for an id out of range, as for any id not on it. */
static int wire_contains(WireObject *self, PyObject *arg)
{
    int overflow = 0;
    long peer = PyLong_AsLongAndOverflow(arg, &overflow);
    if (peer == -1 && PyErr_Occurred())
        return -1;
    if (overflow || peer < 0 || peer >= MAX_PEERS || self->by_id == NULL)
        return 0;
    return self->by_id[peer] != NULL;
}

static PyMethodDef wire_methods[] = {
    {"add", (PyCFunction)wire_add, METH_VARARGS,
     "add(peer, sock, eventfds): a peer joins the table (not held)."},
    {"remove", (PyCFunction)wire_remove, METH_O, "remove(peer): it leaves, unannounced."},
    {"hold", (PyCFunction)wire_hold, METH_O, "hold(peer): send it nothing directly."},
    {"release", (PyCFunction)wire_release, METH_O,
     "release(peer): its queue is flushed empty: send to it directly again."},
    {"held", (PyCFunction)wire_is_held, METH_O, "held(peer) -> bool."},
    {"stats", (PyCFunction)wire_stats, METH_O,
     "stats(peer) -> (messages sent to it here, time.monotonic() of the last)."},
    {"join", (PyCFunction)wire_join, METH_O,
     "join(peer) -> (sent, newcomer_sent, rest, partials, gone): send a join's messages."},
    {"leave", (PyCFunction)wire_leave, METH_O,
     "leave(peer) -> (sent, rest, partials, gone): remove peer and tell everyone else."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods wire_as_sequence = {
    .sq_length = (lenfunc)wire_len,
    .sq_contains = (objobjproc)wire_contains,
};

static PyTypeObject WireType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ivshmem.server._fanout.Wire",
    .tp_basicsize = sizeof(WireObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The peers' sockets and eventfds, for fan-outs in one call (see _fanout.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)wire_init,
    .tp_dealloc = (destructor)wire_dealloc,
    .tp_methods = wire_methods,
    .tp_as_sequence = &wire_as_sequence,
};

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
    if (PyModule_AddIntConstant(module, "PARTIAL", PARTIAL) < 0 || PyType_Ready(&WireType) < 0 ||
        PyModule_AddObjectRef(module, "Wire", (PyObject *)&WireType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
