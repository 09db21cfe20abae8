/* The channel ring's hot paths in C: an optional accelerator for ring.py.
 *
 * ring.py is the reference: every method here has a Python twin there (``_*_py``) with the
 * same checks, and this file only takes the common case. Anything unusual - a record that
 * wraps, a full ring, a reservation already open, a broken ring, a value from shared memory
 * that fails a check - is handed to the Python twin, which re-reads, re-checks and raises the
 * precise error. So the two paths cannot disagree on what is corrupt: C either proves the
 * record ordinary with the same tests, or does not touch it.
 *
 * The state (head, tail, ...) lives in this struct and is exposed to Python as members with
 * the names ring.py uses, so both paths read and write the same private copies.
 *
 * Trust. Shared memory is read only through relaxed atomic loads into locals (``ld_*``): a
 * plain C read could be re-done by the compiler after the check (a double fetch), and a peer
 * can change the word in between. Every value read is checked against private bounds before
 * it is used as an offset; writes go only to [data, data + capacity) at positions derived from
 * private counters.
 *
 * Ordering. Payload and header stores precede a release store of the head, and a receiver
 * loads the head with acquire before it loads the header and the payload; the tail is
 * published with release after the payload was copied out. "Notify only when the other side
 * waits" needs a full fence between our store and our load of its wait word (the Dekker case,
 * _ordering.py point 3): __atomic_thread_fence(__ATOMIC_SEQ_CST). On x86-64 the acquire and
 * release accesses are plain moves, exactly what the Python path does; the C compiler is kept
 * from reordering them by the same annotations.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <float.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

/* Keep in step with ring.py. */
#define CTRL_SIZE 256
#define HEADER 8
#define S_HEAD 0
#define S_WAIT 1
#define S_VECTOR 2
#define R_TAIL 16
#define R_WAIT 17
#define R_VECTOR 18
#define KIND_SHIFT 32
#define KIND_DATA 1ULL
#define KIND_ARRAY 2ULL
#define KIND_WRAP 3ULL
#define LEN_MASK 0xFFFFFFFFULL
#define NO_VECTOR 0xFFFFFFFFFFFFFFFFULL

typedef unsigned long long u64;

typedef struct {
    PyObject_HEAD
    Py_buffer area;  /* the channel's whole area, held while bound */
    int has_area;
    Py_buffer guardbuf;
    int has_guard;
    volatile u64 *q;  /* control words (area start) */
    char *data;       /* data bytes (area + CTRL_SIZE) */
    volatile u64 *guard;
    u64 guard_value;
    /* Private state, shared with ring.py through members of the same names. */
    u64 capacity, mask, half;
    u64 head, tail, published, released, notified, release_every;
    long long limit;
    char closed; /* this end is closed (ring.py's _closed): reads go to the Python twins */
    u64 rpos, rskip, rlen, rkind;
    PyObject *views;      /* list of receive views handed out (receiver) */
    PyObject *broken;     /* ChannelCorrupted once broken, else None */
    PyObject *data_view;  /* writable memoryview of the data (ring.py's _data) */
    PyObject *rodata;     /* read-only memoryview of the data (ring.py's _rodata) */
    PyObject *resv_view;  /* the open reservation's view, or None */
    u64 window; /* the hot window (ring.py's _window): always 16..capacity, see _bind_window */
} Core;

static PyObject *str_take_py, *str_take_view_py, *str_slow_place, *str_try_reserve_py,
    *str_wake_receiver, *str_wake_sender, *str_guard_failed, *str_release, *str_send_wait,
    *str_recv_wait, *str_recv_view_wait, *str_commit_py, *str_publish_tail, *str_reserve_wait,
    *str_as_message, *str_try_send_many_py, *str_flag, *str_take_many_py, *str_timeout;

static inline u64 ld_relaxed(volatile u64 *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline u64 ld_acquire(volatile u64 *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st_relaxed(volatile u64 *p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void st_release(volatile u64 *p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* -- object lifecycle ------------------------------------------------------------------ */

static void core_unbind(Core *self) {
    self->q = NULL;
    self->data = NULL;
    self->guard = NULL;
    if (self->has_area) {
        PyBuffer_Release(&self->area);
        self->has_area = 0;
    }
    if (self->has_guard) {
        PyBuffer_Release(&self->guardbuf);
        self->has_guard = 0;
    }
}

static PyObject *Core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Core *self = (Core *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(Py_None);
    self->broken = Py_None;
    Py_INCREF(Py_None);
    self->resv_view = Py_None;
    return (PyObject *)self;
}

static int Core_traverse(Core *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->views);
    Py_VISIT(self->broken);
    Py_VISIT(self->data_view);
    Py_VISIT(self->rodata);
    Py_VISIT(self->resv_view);
    /* The buffers' exporters are deliberately not visited, and tp_clear leaves the buffers
     * alone: to the collector they look referenced from outside, so it never clears a
     * memoryview we still hold a buffer of (releasing into a cleared memoryview crashes).
     * They form no cycle through us (a memoryview does not refer back to its user), and
     * dealloc releases them. */
    return 0;
}

static int Core_clear(Core *self) {
    Py_CLEAR(self->views);
    Py_CLEAR(self->broken);
    Py_CLEAR(self->data_view);
    Py_CLEAR(self->rodata);
    Py_CLEAR(self->resv_view);
    return 0;
}

static void Core_dealloc(Core *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    core_unbind(self);
    Core_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* _bind(area): hold a writable buffer of the whole area (256 control bytes + capacity). */
static PyObject *Core_bind(Core *self, PyObject *area) {
    core_unbind(self);
    if (PyObject_GetBuffer(area, &self->area, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    self->has_area = 1;
    Py_ssize_t len = self->area.len;
    u64 cap = (u64)(len - CTRL_SIZE);
    if (((uintptr_t)self->area.buf & 7) || len < CTRL_SIZE + 256 || (cap & (cap - 1))) {
        core_unbind(self);
        PyErr_SetString(PyExc_ValueError,
                        "ring area must be 8-byte aligned and 256 + a power of two bytes");
        return NULL;
    }
    self->q = (volatile u64 *)self->area.buf;
    self->data = (char *)self->area.buf + CTRL_SIZE;
    /* The bounds every access below relies on: from the buffer held, read-only to Python. */
    self->capacity = cap;
    self->mask = cap - 1;
    self->half = cap >> 1;
    self->window = cap;
    Py_RETURN_NONE;
}

/* _bind_window(window): the hot window, clamped to 16..capacity as in ring.py. The fast paths
 * test ``pos + need > window`` instead of ``> capacity``, so the clamp is what keeps every
 * write they make inside the ring. */
static PyObject *Core_bind_window(Core *self, PyObject *arg) {
    long long w = PyLong_AsLongLong(arg);
    if (w == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        w = LLONG_MAX;
    }
    if (self->q == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring core is not bound to an area");
        return NULL;
    }
    u64 cap = self->capacity;
    self->window = w < 16 ? 16 : ((u64)w > cap ? cap : (u64)w);
    Py_RETURN_NONE;
}

/* _bind_guard(words, index, value): the shared word that must keep ``value`` while we write. */
static PyObject *Core_bind_guard(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_bind_guard(words, index, value)");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    u64 value = PyLong_AsUnsignedLongLong(args[2]);
    if (value == (u64)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (index < 0 || index >= buf.len / 8 || ((uintptr_t)buf.buf & 7)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "guard word is outside its buffer or misaligned");
        return NULL;
    }
    if (self->has_guard)
        PyBuffer_Release(&self->guardbuf);
    self->guardbuf = buf;
    self->has_guard = 1;
    self->guard = (volatile u64 *)buf.buf + index;
    self->guard_value = value;
    Py_RETURN_NONE;
}

static int core_bound(Core *self) {
    if (self->q == NULL || self->guard == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring core is not bound to an area and a guard");
        return 0;
    }
    return 1;
}

/* -- helpers ----------------------------------------------------------------------------- */

static inline int views_empty(Core *self) {
    PyObject *v = self->views;
    return v == NULL || v == Py_None || (PyList_CheckExact(v) && PyList_GET_SIZE(v) == 0);
}

/* The guard word changed: ring.py's _guard_failed() raises the right error. */
static int guard_failed(Core *self) {
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_guard_failed);
    Py_XDECREF(r);
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "the channel's guard word changed");
    return -1;
}

static inline int guard_ok(Core *self) {
    return ld_relaxed(self->guard) == self->guard_value ? 0 : guard_failed(self);
}

/* The receiver's check after copying a message out (ring.py, _Ring.__init__): the compiler
 * barrier keeps the payload's loads before the guard's (x86-64 keeps loads in order). */
static inline int guard_after_read(Core *self) {
    __asm__ __volatile__("" ::: "memory");
    return ld_relaxed(self->guard) == self->guard_value ? 0 : guard_failed(self);
}

/* Make the head visible, then ring the receiver if (and only if) it sleeps. */
static int publish_head(Core *self, u64 head) {
    volatile u64 *q = self->q;
    st_release(&q[S_HEAD], head);
    self->published = head;
    u64 vector = ld_relaxed(&q[R_VECTOR]);
    if (vector != NO_VECTOR) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* StoreLoad: head store before wait load */
        u64 wait = ld_relaxed(&q[R_WAIT]);
        if ((wait & 1) && wait != self->notified) {
            self->notified = wait;
            PyObject *arg = PyLong_FromUnsignedLongLong(vector);
            if (arg == NULL)
                return -1;
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_wake_receiver, arg);
            Py_DECREF(arg);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

static int publish_tail(Core *self) {
    u64 tail = self->tail;
    if (tail == self->released || !views_empty(self))
        return 0;
    if (guard_ok(self) < 0)
        return -1;
    volatile u64 *q = self->q;
    st_release(&q[R_TAIL], tail); /* our copies of the payloads are done before this */
    self->released = tail;
    u64 vector = ld_relaxed(&q[S_VECTOR]);
    if (vector != NO_VECTOR) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        u64 wait = ld_relaxed(&q[S_WAIT]);
        if ((wait & 1) && wait != self->notified) {
            self->notified = wait;
            PyObject *arg = PyLong_FromUnsignedLongLong(vector);
            if (arg == NULL)
                return -1;
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_wake_sender, arg);
            Py_DECREF(arg);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

/* A C-contiguous byte view of ``obj``: bytes directly, anything else through the buffer
 * protocol (ring.py does memoryview(data).cast("B"), which needs C-contiguity too). */
typedef struct {
    const char *ptr;
    Py_ssize_t len;
    Py_buffer buf;
    int held;
} Bytes;

static int bytes_get(PyObject *obj, Bytes *b) {
    if (PyBytes_CheckExact(obj)) {
        b->ptr = PyBytes_AS_STRING(obj);
        b->len = PyBytes_GET_SIZE(obj);
        b->held = 0;
        return 0;
    }
    if (PyObject_GetBuffer(obj, &b->buf, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    b->ptr = b->buf.buf;
    b->len = b->buf.len;
    b->held = 1;
    return 0;
}

/* A message's bytes: bytes directly, else a C-contiguous buffer that holds no Python objects;
 * anything else goes to ring.py's _as_message, which converts it or says why it cannot
 * travel (so both twins accept and refuse the same messages). */
static int message_get(Core *self, PyObject *obj, Bytes *b) {
    if (PyBytes_CheckExact(obj))
        return bytes_get(obj, b);
    if (PyObject_GetBuffer(obj, &b->buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        if (b->buf.format == NULL || strchr(b->buf.format, 'O') == NULL) {
            b->ptr = b->buf.buf;
            b->len = b->buf.len;
            b->held = 1;
            return 0;
        }
        PyBuffer_Release(&b->buf);
    } else {
        PyErr_Clear();
    }
    PyObject *view = PyObject_CallMethodOneArg((PyObject *)self, str_as_message, obj);
    if (view == NULL)
        return -1;
    int r = bytes_get(view, b); /* a flat 'B' memoryview: its buffer keeps it alive */
    Py_DECREF(view);
    return r;
}

static inline void bytes_release(Bytes *b) {
    if (b->held) {
        PyBuffer_Release(&b->buf);
        b->held = 0;
    }
}

/* ring.py's _slow_place(n): None (no room) or (head, pos). Returns 1 placed, 0 no room,
 * -1 error. The position is checked again here before anything is written there. */
static int slow_place(Core *self, Py_ssize_t n, u64 need, u64 *head, u64 *pos) {
    PyObject *arg = PyLong_FromSsize_t(n);
    if (arg == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_slow_place, arg);
    Py_DECREF(arg);
    if (r == NULL)
        return -1;
    if (r == Py_None) {
        Py_DECREF(r);
        return 0;
    }
    u64 h, p;
    int ok = PyArg_ParseTuple(r, "KK", &h, &p);
    Py_DECREF(r);
    if (!ok)
        return -1;
    if (!core_bound(self))
        return -1;
    u64 cap = self->capacity;
    if ((p & 7) || need > cap || p > cap - need || h + need - self->tail > cap) {
        PyErr_SetString(PyExc_RuntimeError, "ring: a placed record would leave its ring");
        return -1;
    }
    *head = h;
    *pos = p;
    return 1;
}

#define COLD __attribute__((noinline))

/* Read and validate the receiver's tail once (ring.py's _read_tail): 0 with self->tail
 * updated, or -1 if it moved impossibly (the Python twin then re-reads it and raises). */
static inline int read_tail(Core *self) {
    u64 t = ld_acquire(&self->q[R_TAIL]);
    if ((t & 7) || t < self->tail || t > self->head)
        return -1;
    self->tail = t;
    return 0;
}

/* ring.py's _place for an ordinary record at self->head (need <= limit: not broken, no
 * reservation open): 1 placed at (pos, skip), 0 no room yet, 2 hand over to Python (a tail
 * that fails its check, or a private value set from Python that is out of line). The same
 * rule, the same tail reads in the same order, so the twins keep identical state:
 *   - a record that does not fit before the end wraps (skip to 0);
 *   - past the hot window it wraps early when the receiver keeps up: the freshly read tail
 *     leaves at most max(need, window / 8) bytes unread and is at least ``need`` into this
 *     lap (the ordinary room check of a record at the start of the next lap); otherwise it
 *     goes on linearly (the receiver is behind or stalled);
 *   - then the room check, re-reading the tail if the known one does not prove room.
 * The caller writes the WRAP marker at head & mask when skip != 0 (or commit does).
 *
 * Kept out of line (COLD), as place_send: inlined into send_one, the placement (taken once
 * per wrap, or per message only while a receiver is behind) made every send slower -
 * measured: the bytes API's 64 B spinning round trip went from 1.55 to 1.67 us (p50, same
 * run, alternating with the build before the hot window). */
COLD static int place_c(Core *self, u64 need, u64 *pos_out, u64 *skip_out) {
    u64 head = self->head, cap = self->capacity;
    if ((long long)need > self->limit || (head & 7) || need > cap)
        return 2;
    u64 pos = head & self->mask, skip = 0;
    if (pos + need > cap) {
        skip = cap - pos;
    } else if (pos + need > self->window && pos != 0) {
        if (read_tail(self) < 0)
            return 2;
        u64 keep_up = need > (self->window >> 3) ? need : (self->window >> 3);
        if (self->tail >= head - pos + need && head - self->tail <= keep_up)
            skip = cap - pos; /* early wrap: the receiver keeps up, the start is free */
    }
    u64 total = skip + need;
    if (head + total - self->tail > cap) {
        if (read_tail(self) < 0)
            return 2;
        if (head + total - self->tail > cap)
            return 0;
    }
    *pos_out = skip ? 0 : pos;
    *skip_out = skip;
    return 1;
}

/* Place a record for a copy-in (try_send, try_send_many): place_c, writing the WRAP marker
 * and moving self->head past it, else ring.py's _slow_place. 1 placed, 0 no room, -1 error. */
COLD static int place_send(Core *self, Py_ssize_t n, u64 need, u64 *head, u64 *pos) {
    u64 p, skip;
    int r = place_c(self, need, &p, &skip);
    if (r == 2)
        return slow_place(self, n, need, head, pos);
    if (r == 0)
        return 0;
    u64 h = self->head;
    if (skip) {
        /* h is 8-aligned (place_c checked) and h & mask < capacity: the word is inside. */
        st_relaxed((volatile u64 *)(self->data + (h & self->mask)), KIND_WRAP << KIND_SHIFT);
        h += skip;
        self->head = h;
    }
    *head = h;
    *pos = p;
    return 1;
}

/* Parse (positional..., kwnames) for up to 3 parameters into ``out`` (NULL = not given). */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const char *const *names, int count, int kwonly_from, PyObject **out,
                      const char *fname) {
    for (int i = 0; i < count; i++)
        out[i] = NULL;
    if (nargs > kwonly_from) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d positional arguments", fname,
                     kwonly_from);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = 0; i < count; i++) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    if (out[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "%s() got multiple values for '%s'",
                                     fname, names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
        }
    }
    return 0;
}

/* -- sender ------------------------------------------------------------------------------ */

/* Copy one message in; 1 sent, 0 no room, -1 error. */
static int send_one(Core *self, PyObject *data, int flush) {
    if (guard_ok(self) < 0)
        return -1;
    Bytes b;
    if (message_get(self, data, &b) < 0)
        return -1;
    Py_ssize_t n = b.len;
    u64 need = ((u64)n + 15) & ~(u64)7;
    u64 head = self->head, cap = self->capacity;
    u64 pos = head & self->mask;
    if ((long long)need > self->limit || pos + need > self->window ||
        head + need - self->tail > cap) {
        int placed = place_send(self, n, need, &head, &pos);
        if (placed <= 0) {
            bytes_release(&b);
            return placed;
        }
    }
    memcpy(self->data + pos + HEADER, b.ptr, (size_t)n);
    st_relaxed((volatile u64 *)(self->data + pos), (u64)n | (KIND_DATA << KIND_SHIFT));
    bytes_release(&b);
    head += need;
    self->head = head;
    if (flush && publish_head(self, head) < 0)
        return -1;
    return 1;
}

/* A flag argument (flush): True or False; anything else goes to ring.py's _flag, which
 * applies the argument rule (ivshmem._args) and raises. */
static int truth(Core *self, PyObject *obj, int dflt) {
    if (obj == NULL)
        return dflt;
    if (obj == Py_True || obj == Py_False)
        return obj == Py_True;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_flag, obj);
    if (r == NULL)
        return -1;
    int v = r == Py_True;
    Py_DECREF(r);
    return v;
}

/* A timeout argument, checked before the first attempt so that a bad one is refused even when
 * no wait is needed: None, or an exact float or int that is >= 0 and finite, passes here;
 * anything else goes to ring.py's _timeout (the argument rule), which raises or accepts. */
static int timeout_ok(Core *self, PyObject *obj) {
    if (obj == NULL || obj == Py_None)
        return 0;
    if (PyFloat_CheckExact(obj)) {
        double v = PyFloat_AS_DOUBLE(obj);
        if (v >= 0 && v <= DBL_MAX)
            return 0;
    } else if (PyLong_CheckExact(obj)) {
        long long v = PyLong_AsLongLong(obj);
        if (v >= 0)
            return 0;
        PyErr_Clear();
    }
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_timeout, obj);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* An int argument the fast path may take: an exact int (not a bool, not an __index__ type)
 * that fits ``*out``; 0 sends the call to the Python twin, which applies the rule. */
static int plain_ssize(PyObject *obj, Py_ssize_t *out) {
    if (!PyLong_CheckExact(obj))
        return 0;
    Py_ssize_t v = PyLong_AsSsize_t(obj);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

static const char *const send_names[] = {"data", "flush"};

/* try_send(data, flush=True) -> bool */
static PyObject *Core_try_send(Core *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames) {
    PyObject *a[2];
    if (parse_args(args, nargs, kwnames, send_names, 2, 2, a, "try_send") < 0)
        return NULL;
    if (a[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "try_send() missing 'data'");
        return NULL;
    }
    int flush = truth(self, a[1], 1);
    if (flush < 0 || !core_bound(self))
        return NULL;
    int r = send_one(self, a[0], flush);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static const char *const send_wait_names[] = {"data", "timeout", "flush"};

/* send(data, timeout=None, flush=True): the fast attempt, else ring.py's _send_wait. */
static PyObject *Core_send(Core *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    PyObject *a[3];
    if (parse_args(args, nargs, kwnames, send_wait_names, 3, 3, a, "send") < 0)
        return NULL;
    if (a[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "send() missing 'data'");
        return NULL;
    }
    int flush = truth(self, a[2], 1);
    if (flush < 0 || timeout_ok(self, a[1]) < 0 || !core_bound(self))
        return NULL;
    int r = send_one(self, a[0], flush);
    if (r < 0)
        return NULL;
    if (r > 0)
        Py_RETURN_NONE;
    PyObject *call[4] = {(PyObject *)self, a[0], a[1] ? a[1] : Py_None,
                         flush ? Py_True : Py_False};
    return PyObject_VectorcallMethod(str_send_wait, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

/* try_send_many(messages, start=0) -> index of the first message not written (unpublished). */
static PyObject *Core_try_send_many(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "try_send_many(messages, start=0)");
        return NULL;
    }
    Py_ssize_t i = 0;
    int plain = nargs < 2 || plain_ssize(args[1], &i);
    if (!core_bound(self) || guard_ok(self) < 0)
        return NULL;
    PyObject *seq = NULL;
    if (plain && i >= 0 && (PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
        seq = PySequence_Fast(args[0], "");
        if (seq == NULL)
            return NULL;
        if (i > PySequence_Fast_GET_SIZE(seq))
            Py_CLEAR(seq);
    }
    if (seq == NULL) /* an unusual start or sequence: the Python twin takes it or says why */
        return PyObject_VectorcallMethod(str_try_send_many_py,
                                         (PyObject *[]){(PyObject *)self, args[0],
                                                        nargs == 2 ? args[1] : NULL},
                                         (size_t)nargs + 1, NULL);
    u64 first = self->head, head = first;
    for (; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(m);
        Bytes b;
        if (message_get(self, m, &b) < 0) {
            Py_DECREF(m);
            goto error;
        }
        /* Python code may have run (a buffer exporter, _slow_place): take the ring's bounds
         * afresh for every message. */
        if (!core_bound(self)) {
            bytes_release(&b);
            Py_DECREF(m);
            goto error;
        }
        u64 cap = self->capacity, mask = self->mask;
        Py_ssize_t n = b.len;
        u64 need = ((u64)n + 15) & ~(u64)7;
        u64 pos = head & mask;
        if ((long long)need > self->limit || pos + need > self->window ||
            head + need - self->tail > cap) {
            self->head = head;
            int placed = place_send(self, n, need, &head, &pos);
            if (placed <= 0) {
                bytes_release(&b);
                Py_DECREF(m);
                if (placed < 0)
                    goto error;
                break;
            }
        }
        memcpy(self->data + pos + HEADER, b.ptr, (size_t)n);
        st_relaxed((volatile u64 *)(self->data + pos), (u64)n | (KIND_DATA << KIND_SHIFT));
        bytes_release(&b);
        Py_DECREF(m);
        head += need;
    }
    self->head = head;
    Py_DECREF(seq);
    return PyLong_FromSsize_t(i);
error:
    self->head = first; /* unpublished: as if this call had written nothing (as in ring.py) */
    Py_DECREF(seq);
    return NULL;
}

static PyObject *slice_of(PyObject *view, u64 start, u64 stop) {
    PyObject *a = PyLong_FromUnsignedLongLong(start);
    PyObject *b = PyLong_FromUnsignedLongLong(stop);
    PyObject *s = (a && b) ? PySlice_New(a, b, NULL) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (s == NULL)
        return NULL;
    PyObject *r = PyObject_GetItem(view, s);
    Py_DECREF(s);
    return r;
}

/* try_reserve(n, kind=KIND_DATA) -> writable view or None */
static PyObject *Core_try_reserve(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "try_reserve(n, kind=KIND_DATA)");
        return NULL;
    }
    if (!core_bound(self) || guard_ok(self) < 0)
        return NULL;
    /* Only exact ints are taken here (not bools, floats or __index__ types): anything else,
     * too big or negative, goes to the twin as n = -1 or kind = -1, and the twin says why. */
    long long n = -1;
    if (PyLong_CheckExact(args[0])) {
        n = PyLong_AsLongLong(args[0]);
        if (n == -1 && PyErr_Occurred())
            PyErr_Clear();
    }
    u64 kind = KIND_DATA;
    if (nargs == 2) {
        kind = (u64)-1;
        if (PyLong_CheckExact(args[1])) {
            kind = PyLong_AsUnsignedLongLong(args[1]);
            if (kind == (u64)-1 && PyErr_Occurred())
                PyErr_Clear();
        }
    }
    u64 need = ((u64)n + 15) & ~(u64)7;
    u64 head = self->head, cap = self->capacity;
    u64 pos = head & self->mask, skip = 0;
    if (n < 0 || self->data_view == NULL || (kind != KIND_DATA && kind != KIND_ARRAY))
        goto python;
    if ((long long)need > self->limit || pos + need > self->window ||
        head + need - self->tail > cap) {
        int r = place_c(self, need, &pos, &skip);
        if (r == 2)
            goto python;
        if (r == 0)
            Py_RETURN_NONE;
    }
    PyObject *view = slice_of(self->data_view, pos + HEADER, pos + HEADER + (u64)n);
    if (view == NULL)
        return NULL;
    self->rpos = pos;
    self->rskip = skip;
    self->rlen = (u64)n;
    self->rkind = kind;
    self->limit = -1;
    Py_INCREF(view);
    Py_XSETREF(self->resv_view, view);
    return view;
python:
    return PyObject_VectorcallMethod(str_try_reserve_py, (PyObject *[]){(PyObject *)self,
                                     args[0], nargs == 2 ? args[1] : NULL},
                                     (size_t)nargs + 1, NULL);
}

static const char *const reserve_names[] = {"n", "timeout"};

/* reserve(n, timeout=None): try_reserve's attempt, else channel.py's _reserve_wait. */
static PyObject *Core_reserve(Core *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames) {
    PyObject *a[2];
    if (parse_args(args, nargs, kwnames, reserve_names, 2, 2, a, "reserve") < 0)
        return NULL;
    if (a[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "reserve() missing 'n'");
        return NULL;
    }
    if (timeout_ok(self, a[1]) < 0)
        return NULL;
    PyObject *view = Core_try_reserve(self, a, 1);
    if (view != Py_None)
        return view; /* a view, or NULL with the error set */
    Py_DECREF(view);
    PyObject *call[3] = {(PyObject *)self, a[0], a[1] ? a[1] : Py_None};
    return PyObject_VectorcallMethod(str_reserve_wait, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

/* Revoke a handed-out view; a view exported further (numpy) cannot be: ignored, as in ring.py */
static int release_view(PyObject *view) {
    PyObject *r = PyObject_CallMethodNoArgs(view, str_release);
    if (r == NULL) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

static const char *const commit_names[] = {"n", "flush"};

/* commit(n=None, *, flush=True): the common case (no wrap, guard intact), else _commit_py. */
static PyObject *Core_commit(Core *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    PyObject *a[2];
    if (parse_args(args, nargs, kwnames, commit_names, 2, 1, a, "commit") < 0)
        return NULL;
    int flush = truth(self, a[1], 1);
    if (flush < 0)
        return NULL;
    /* Python code may run while the arguments are converted (__index__, __bool__): convert
     * them first, then copy the reservation's fields once and use only the copies. */
    long long m = -1;
    int partial = a[0] != NULL && a[0] != Py_None;
    if (partial && PyLong_CheckExact(a[0])) { /* not a bool or an __index__ type: the twin */
        m = PyLong_AsLongLong(a[0]);
        if (m == -1 && PyErr_Occurred())
            PyErr_Clear(); /* m = -1: the twin says what is wrong */
    }
    if (!core_bound(self))
        return NULL;
    u64 pos = self->rpos, length = self->rlen, kind = self->rkind, cap = self->capacity;
    u64 skip = self->rskip, from = self->head & self->mask;
    /* The fields are settable from Python: use them only when they describe a record inside
     * the ring, with no sum that could wrap (capacity >= 256, so cap - HEADER - pos is safe
     * once pos <= cap - HEADER); anything else goes to the Python twin, which checks. */
    /* A WRAP before the record (skip) is taken when it is the one placement makes: from the
     * aligned head's position, non-zero, to the end, with the record at 0. */
    int simple = self->resv_view != NULL && self->resv_view != Py_None &&
                 (skip == 0 || (pos == 0 && from != 0 && (from & 7) == 0 && skip == cap - from)) &&
                 (pos & 7) == 0 && pos <= cap - HEADER && length <= self->half &&
                 length <= cap - HEADER - pos && kind < (1ULL << 32) &&
                 ld_relaxed(self->guard) == self->guard_value;
    if (simple && partial) {
        if (m < 0 || (u64)m > length)
            simple = 0; /* _commit_py says what is wrong */
        else
            length = (u64)m;
    }
    if (!simple) {
        PyObject *call[2] = {(PyObject *)self, a[0] ? a[0] : Py_None};
        PyObject *kw = PyDict_New();
        if (kw == NULL)
            return NULL;
        if (PyDict_SetItemString(kw, "flush", flush ? Py_True : Py_False) < 0) {
            Py_DECREF(kw);
            return NULL;
        }
        PyObject *meth = PyObject_GetAttr((PyObject *)self, str_commit_py);
        PyObject *r = meth ? PyObject_VectorcallDict(meth, call + 1, 1, kw) : NULL;
        Py_XDECREF(meth);
        Py_DECREF(kw);
        return r;
    }
    /* pos, length and skip were checked above, and no Python code ran since. */
    if (skip)
        st_relaxed((volatile u64 *)(self->data + from), KIND_WRAP << KIND_SHIFT);
    st_relaxed((volatile u64 *)(self->data + pos), length | (kind << KIND_SHIFT));
    u64 head = self->head + skip + ((length + 15) & ~(u64)7);
    self->head = head;
    self->limit = (long long)self->half;
    PyObject *view = self->resv_view;
    Py_INCREF(Py_None);
    self->resv_view = Py_None;
    int err = release_view(view);
    Py_DECREF(view);
    if (err < 0)
        return NULL;
    if (flush && publish_head(self, head) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* flush(): publish everything committed, ring the receiver if it sleeps. */
static PyObject *Core_flush(Core *self, PyObject *unused) {
    if (!core_bound(self))
        return NULL;
    u64 head = self->head;
    if (head == self->published)
        Py_RETURN_NONE;
    if (guard_ok(self) < 0 || publish_head(self, head) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* -- receiver ---------------------------------------------------------------------------- */

/* Where the next ordinary record of ``kind`` is: 1 found (pos, n), 0 empty, 2 not ordinary
 * (hand over to Python). Reads the head (acquire) only when the known records are used up.
 * With ``follow_wrap``, a WRAP marker that passes ring.py's _next check (not at 0, and a
 * record after it) is consumed here as _next consumes it: the tail moves to the next lap,
 * and the record at 0 is then checked like any other (a sender past its hot window wraps
 * every few messages, so this is a hot path too). */
static int next_record(Core *self, u64 kind, int follow_wrap, u64 *pos_out, u64 *n_out) {
    if (self->broken != Py_None || self->closed)
        return 2;
    u64 tail = self->tail;
    if (tail & 7) /* a private value set from Python: the twin reports it */
        return 2;
    if (tail == self->head) {
        u64 head = ld_acquire(&self->q[S_HEAD]);
        if (head == tail)
            return 0;
        if ((head & 7) || head < self->head || head - self->released > self->capacity)
            return 2;
        self->head = head;
    }
    u64 pos = tail & self->mask;
    u64 word = ld_relaxed((volatile u64 *)(self->data + pos));
    if ((word >> KIND_SHIFT) == KIND_WRAP && follow_wrap) {
        u64 skip = self->capacity - pos;
        if (pos == 0 || skip >= self->head - tail)
            return 2; /* _next reports it */
        tail += skip;
        self->tail = tail;
        pos = 0;
        word = ld_relaxed((volatile u64 *)self->data);
    }
    u64 n = word & LEN_MASK;
    u64 need = (n + 15) & ~(u64)7;
    if ((word >> KIND_SHIFT) != kind || need > self->head - tail || pos + need > self->capacity ||
        need > self->capacity >> 1)
        return 2;
    *pos_out = pos;
    *n_out = n;
    return 1;
}

static PyObject *take(Core *self) {
    u64 pos, n;
    int r = next_record(self, KIND_DATA, 1, &pos, &n);
    if (r == 0)
        Py_RETURN_NONE;
    if (r == 2)
        return PyObject_CallMethodNoArgs((PyObject *)self, str_take_py);
    PyObject *out = PyBytes_FromStringAndSize(self->data + pos + HEADER, (Py_ssize_t)n);
    if (out == NULL)
        return NULL;
    if (guard_after_read(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    u64 tail = self->tail + ((n + 15) & ~(u64)7);
    self->tail = tail;
    if (tail - self->released >= self->release_every && publish_tail(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* _take() -> bytes | None (nothing given back on empty: see ring.py) */
static PyObject *Core_take(Core *self, PyObject *unused) {
    if (!core_bound(self))
        return NULL;
    return take(self);
}

/* recv(timeout=None): the fast attempt, else the channel's _recv_wait(timeout). */
static PyObject *Core_recv(Core *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    static const char *const names[] = {"timeout"};
    PyObject *a[1];
    if (parse_args(args, nargs, kwnames, names, 1, 1, a, "recv") < 0 ||
        timeout_ok(self, a[0]) < 0 || !core_bound(self))
        return NULL;
    PyObject *data = take(self);
    if (data != Py_None)
        return data;
    Py_DECREF(data);
    PyObject *call[2] = {(PyObject *)self, a[0] ? a[0] : Py_None};
    return PyObject_VectorcallMethod(str_recv_wait, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

static PyObject *take_view(Core *self, u64 kind, PyObject *kind_obj) {
    u64 pos, n;
    int r = next_record(self, kind, 1, &pos, &n);
    if (r == 0)
        Py_RETURN_NONE;
    if (r == 2 || self->rodata == NULL || self->views == NULL ||
        !PyList_CheckExact(self->views)) {
        PyObject *call[2] = {(PyObject *)self, kind_obj};
        return PyObject_VectorcallMethod(str_take_view_py, call,
                                         (kind_obj ? 2 : 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                         NULL);
    }
    PyObject *view = slice_of(self->rodata, pos + HEADER, pos + HEADER + n);
    if (view == NULL)
        return NULL;
    if (guard_after_read(self) < 0) {
        Py_DECREF(view);
        return NULL;
    }
    if (PyList_Append(self->views, view) < 0) {
        Py_DECREF(view);
        return NULL;
    }
    self->tail += (n + 15) & ~(u64)7;
    return view;
}

/* _take_view(kind=KIND_DATA) -> read-only view | None */
static PyObject *Core_take_view(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "_take_view(kind=KIND_DATA)");
        return NULL;
    }
    u64 kind = KIND_DATA;
    if (nargs == 1) {
        kind = (u64)-1; /* not an exact int, or out of range: no record has it; the twin says */
        if (PyLong_CheckExact(args[0])) {
            kind = PyLong_AsUnsignedLongLong(args[0]);
            if (kind == (u64)-1 && PyErr_Occurred())
                PyErr_Clear();
        }
        if (kind != KIND_DATA && kind != KIND_ARRAY)
            return PyObject_VectorcallMethod(str_take_view_py,
                                             (PyObject *[]){(PyObject *)self, args[0]},
                                             2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    if (!core_bound(self))
        return NULL;
    return take_view(self, kind, nargs == 1 ? args[0] : NULL);
}

/* recv_view(timeout=None): the fast attempt, else the channel's _recv_view_wait(timeout). */
static PyObject *Core_recv_view(Core *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    static const char *const names[] = {"timeout"};
    PyObject *a[1];
    if (parse_args(args, nargs, kwnames, names, 1, 1, a, "recv_view") < 0 ||
        timeout_ok(self, a[0]) < 0 || !core_bound(self))
        return NULL;
    PyObject *view = take_view(self, KIND_DATA, NULL);
    if (view != Py_None)
        return view;
    Py_DECREF(view);
    PyObject *call[2] = {(PyObject *)self, a[0] ? a[0] : Py_None};
    return PyObject_VectorcallMethod(str_recv_view_wait, call,
                                     2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* take_many(max_messages) -> list of bytes: one head read, at most one tail store. */
static PyObject *Core_take_many(Core *self, PyObject *arg) {
    Py_ssize_t max = -1;
    if (!plain_ssize(arg, &max) || max < 0) /* the twin applies the argument rule */
        return PyObject_CallMethodOneArg((PyObject *)self, str_take_many_py, arg);
    if (!core_bound(self))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    while (PyList_GET_SIZE(out) < max) {
        u64 pos, n;
        /* A WRAP goes to _take_py as in ring.py's batch (which ends a batch at it). */
        int r = next_record(self, KIND_DATA, 0, &pos, &n);
        if (r == 0)
            break;
        PyObject *item;
        if (r == 2) {
            /* Not ordinary (a WRAP, an array, a liar): hand out what we have first; alone,
             * let the Python twin deal with it (it handles a WRAP or raises). */
            if (PyList_GET_SIZE(out) > 0)
                break;
            item = PyObject_CallMethodNoArgs((PyObject *)self, str_take_py);
            if (item == NULL)
                goto error;
            if (item == Py_None) {
                Py_DECREF(item);
                break;
            }
        } else {
            item = PyBytes_FromStringAndSize(self->data + pos + HEADER, (Py_ssize_t)n);
            if (item == NULL)
                goto error;
            self->tail += (n + 15) & ~(u64)7;
        }
        int err = PyList_Append(out, item);
        Py_DECREF(item);
        if (err < 0)
            goto error;
    }
    if (PyList_GET_SIZE(out) > 0 && guard_after_read(self) < 0)
        goto error;
    if (self->tail - self->released >= self->release_every && publish_tail(self) < 0)
        goto error;
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

/* release(): revoke every view handed out; give space back in batches. */
static PyObject *Core_release(Core *self, PyObject *unused) {
    if (!core_bound(self))
        return NULL;
    PyObject *views = self->views;
    if (views != NULL && PyList_CheckExact(views) && PyList_GET_SIZE(views) > 0) {
        Py_INCREF(views);
        int err = 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(views); i++) {
            if (release_view(PyList_GET_ITEM(views, i)) < 0) {
                err = -1;
                break;
            }
        }
        if (err == 0)
            err = PyList_SetSlice(views, 0, PyList_GET_SIZE(views), NULL);
        Py_DECREF(views);
        if (err < 0)
            return NULL;
    }
    if (self->tail - self->released >= self->release_every && publish_tail(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _publish_tail(): store the tail, ring the sender if it sleeps waiting for room. */
static PyObject *Core_publish_tail(Core *self, PyObject *unused) {
    if (!core_bound(self) || publish_tail(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _spin(word, seen, turns) -> bool: whether control word ``word`` moved away from ``seen``
 * within ``turns`` polls. A pause between polls (the x86 spin-wait hint) leaves the line to
 * the writer for a moment: a poller that re-reads the line as fast as it can makes every
 * store of the other side fetch it back first, which halves a stream's rate. */
static PyObject *Core_spin(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_spin(word, seen, turns)");
        return NULL;
    }
    Py_ssize_t word = PyLong_AsSsize_t(args[0]);
    if (word == -1 && PyErr_Occurred())
        return NULL;
    u64 seen = PyLong_AsUnsignedLongLong(args[1]);
    if (seen == (u64)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t turns = PyLong_AsSsize_t(args[2]);
    if (turns == -1 && PyErr_Occurred())
        return NULL;
    if (word < 0 || word >= CTRL_SIZE / 8) {
        PyErr_SetString(PyExc_ValueError, "_spin: not a control word");
        return NULL;
    }
    if (!core_bound(self))
        return NULL;
    volatile u64 *p = &self->q[word];
    for (Py_ssize_t i = 0; i < turns; i++) {
        if (ld_relaxed(p) != seen)
            Py_RETURN_TRUE;
        CPU_RELAX();
    }
    if (ld_relaxed(p) != seen)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* -- type -------------------------------------------------------------------------------- */

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)

static PyMethodDef Core_methods[] = {
    {"_bind", (PyCFunction)Core_bind, METH_O, "Hold the ring's area (a writable buffer)."},
    {"_bind_guard", (PyCFunction)(void (*)(void))Core_bind_guard, METH_FASTCALL,
     "Refuse to write once words[index] != value."},
    {"_bind_window", (PyCFunction)Core_bind_window, METH_O,
     "Set the hot window (clamped to 16..capacity)."},
    {"_c_try_send", (PyCFunction)(void (*)(void))Core_try_send, FASTKW, NULL},
    {"_c_send", (PyCFunction)(void (*)(void))Core_send, FASTKW, NULL},
    {"_c_try_send_many", (PyCFunction)(void (*)(void))Core_try_send_many, METH_FASTCALL, NULL},
    {"_c_try_reserve", (PyCFunction)(void (*)(void))Core_try_reserve, METH_FASTCALL, NULL},
    {"_c_reserve", (PyCFunction)(void (*)(void))Core_reserve, FASTKW, NULL},
    {"_c_commit", (PyCFunction)(void (*)(void))Core_commit, FASTKW, NULL},
    {"_c_flush", (PyCFunction)Core_flush, METH_NOARGS, NULL},
    {"_c_take", (PyCFunction)Core_take, METH_NOARGS, NULL},
    {"_c_recv", (PyCFunction)(void (*)(void))Core_recv, FASTKW, NULL},
    {"_c_take_view", (PyCFunction)(void (*)(void))Core_take_view, METH_FASTCALL, NULL},
    {"_c_recv_view", (PyCFunction)(void (*)(void))Core_recv_view, FASTKW, NULL},
    {"_c_take_many", (PyCFunction)Core_take_many, METH_O, NULL},
    {"_c_release", (PyCFunction)Core_release, METH_NOARGS, NULL},
    {"_c_publish_tail", (PyCFunction)Core_publish_tail, METH_NOARGS, NULL},
    {"_c_spin", (PyCFunction)(void (*)(void))Core_spin, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

#define U64(name, field) {name, T_ULONGLONG, offsetof(Core, field), 0, NULL}
#define OBJ(name, field) {name, T_OBJECT, offsetof(Core, field), 0, NULL}

static PyMemberDef Core_members[] = {
    {"capacity", T_ULONGLONG, offsetof(Core, capacity), READONLY, NULL},
    {"_mask", T_ULONGLONG, offsetof(Core, mask), READONLY, NULL},
    {"_half", T_ULONGLONG, offsetof(Core, half), READONLY, NULL},
    {"_window", T_ULONGLONG, offsetof(Core, window), READONLY, NULL},
    U64("_head", head),
    U64("_tail", tail),
    U64("_published", published),
    U64("_released", released),
    U64("_notified", notified),
    U64("_release_every", release_every),
    {"_limit", T_LONGLONG, offsetof(Core, limit), 0, NULL},
    {"_closed", T_BOOL, offsetof(Core, closed), 0, NULL},
    U64("_rpos", rpos),
    U64("_rskip", rskip),
    U64("_rlen", rlen),
    U64("_rkind", rkind),
    OBJ("_views", views),
    OBJ("_broken", broken),
    OBJ("_data", data_view),
    OBJ("_rodata", rodata),
    OBJ("_resv_view", resv_view),
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_doc, "The state and hot paths of a channel ring (see ring.py)."},
    {Py_tp_new, Core_new},
    {Py_tp_dealloc, Core_dealloc},
    {Py_tp_traverse, Core_traverse},
    {Py_tp_clear, Core_clear},
    {Py_tp_methods, Core_methods},
    {Py_tp_members, Core_members},
    {0, NULL},
};

static PyType_Spec Core_spec = {
    .name = "ivshmem.channel._ringcore.RingCore",
    .basicsize = sizeof(Core),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Core_slots,
};

static int intern_all(void) {
#define INTERN(var, text)                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return -1;
    INTERN(str_take_py, "_take_py");
    INTERN(str_take_view_py, "_take_view_py");
    INTERN(str_slow_place, "_slow_place");
    INTERN(str_try_reserve_py, "_try_reserve_py");
    INTERN(str_commit_py, "_commit_py");
    INTERN(str_wake_receiver, "_wake_receiver");
    INTERN(str_wake_sender, "_wake_sender");
    INTERN(str_guard_failed, "_guard_failed");
    INTERN(str_release, "release");
    INTERN(str_send_wait, "_send_wait");
    INTERN(str_recv_wait, "_recv_wait");
    INTERN(str_recv_view_wait, "_recv_view_wait");
    INTERN(str_publish_tail, "_publish_tail");
    INTERN(str_reserve_wait, "_reserve_wait");
    INTERN(str_as_message, "_as_message");
    INTERN(str_try_send_many_py, "_try_send_many_py");
    INTERN(str_flag, "_flag");
    INTERN(str_take_many_py, "_take_many_py");
    INTERN(str_timeout, "_timeout");
#undef INTERN
    return 0;
}

static struct PyModuleDef ringcore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ivshmem.channel._ringcore",
    .m_doc = "C hot paths of the channel ring (optional; ring.py works without them).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__ringcore(void) {
    if (intern_all() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ringcore_module);
    if (m == NULL)
        return NULL;
    PyObject *type = PyType_FromSpec(&Core_spec);
    if (type == NULL || PyModule_AddObject(m, "RingCore", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
