/* CounterCore: the hot paths of SharedCounter (ipcfork/counter.py) as C methods.
 *
 * The counter's protocol (stripes, freezing, pins) lives in Python; this type runs only its
 * two common cases, on state the Python side hands it for one thread at a time (the *lane
 * cache*: that thread's stripe word and pin word, and whether it holds a pin):
 *
 *   add(n)          0 < n < 2**31, the thread has a stripe and the counter is striped: one
 *                   fetch-and-add on the stripe word (count << 1; bit 0 is FROZEN).  If the
 *                   word turns out frozen or nearly full, Python's _add_landed(n, old)
 *                   finishes the add; every other case goes to Python's _add_slow(n).
 *   add_and_get(n)  the thread holds a pin and the counter is central: one fetch-and-add on
 *                   ``pending`` plus the frozen sum.  Otherwise Python's _add_and_get_slow.
 *
 * The cache belongs to one (process, thread) pair and is ignored by any other, so a forked
 * child or another thread always takes the Python path, which then caches its own lane.
 */
#include "core.h"

#include <pythread.h>

#define FROZEN 1LL
#define BLOCKED (1LL << 62)
#define RETIRE (1ULL << 61)
#define SLOW_BITS (0xC000000000000000ULL | 1ULL) /* -(1 << 62) | FROZEN */
#define SMALL (1L << 31)

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base; /* NULL while unbound */
    int64_t *pending, *mode, *frozen_sum;
    uint64_t lane_thread;     /* PyThreadState_GetID: never reused, unlike pthread_t */
    uint64_t lane_generation; /* identity_generation: any fork since voids the lane */
    int64_t *lane_word; /* NULL: this lane has no stripe */
    int64_t *lane_pin;  /* NULL: no pin word */
    int lane_pinned;
    int lane_valid;
} CounterCoreObject;

static PyObject *
closed_error(void)
{
    raise_ipc(ObjectClosedError, NULL, "SharedCounter is closed");
    return NULL;
}

/* The word at byte ``offset`` of the bound buffer, or NULL with an exception set; -1 gives
 * NULL without an exception when ``allow_none``. */
static int64_t *
word_at(CounterCoreObject *self, Py_ssize_t offset, int allow_none)
{
    if (offset == -1 && allow_none)
        return NULL;
    if (offset < 0 || offset % 8 != 0 || self->view.len < 8 || offset > self->view.len - 8) {
        PyErr_Format(InvalidArgumentError,
                     "word offset %zd is outside the %zd-byte counter or not a multiple of 8",
                     offset, self->view.len);
        return NULL;
    }
    return (int64_t *)(self->base + offset);
}

static PyObject *
counter_bind(CounterCoreObject *self, PyObject *args)
{
    PyObject *buffer;
    Py_ssize_t pending, mode, frozen_sum;
    if (!PyArg_ParseTuple(args, "Onnn:_counter_bind", &buffer, &pending, &mode, &frozen_sum))
        return NULL;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this counter is bound already");
        return NULL;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if ((uintptr_t)self->view.buf % 8 != 0) {
        PyBuffer_Release(&self->view);
        raise_ipc(InvalidArgumentError, NULL, "a counter needs an 8-byte aligned buffer");
        return NULL;
    }
    self->base = self->view.buf;
    self->pending = word_at(self, pending, 0);
    self->mode = self->pending ? word_at(self, mode, 0) : NULL;
    self->frozen_sum = self->mode ? word_at(self, frozen_sum, 0) : NULL;
    if (self->frozen_sum == NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
        return NULL;
    }
    self->lane_valid = 0;
    Py_RETURN_NONE;
}

static PyObject *
counter_unbind(CounterCoreObject *self, PyObject *Py_UNUSED(ignored))
{
    self->lane_valid = 0;
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

/* _cache_lane(word_offset, pin_offset, pinned): the calling thread's lane (-1: none). */
static PyObject *
counter_cache_lane(CounterCoreObject *self, PyObject *args)
{
    Py_ssize_t word, pin;
    int pinned;
    if (!PyArg_ParseTuple(args, "nnp:_cache_lane", &word, &pin, &pinned))
        return NULL;
    if (self->base == NULL)
        return closed_error();
    self->lane_valid = 0;
    int64_t *word_p = word_at(self, word, 1);
    if (word_p == NULL && PyErr_Occurred())
        return NULL;
    int64_t *pin_p = word_at(self, pin, 1);
    if (pin_p == NULL && PyErr_Occurred())
        return NULL;
    self->lane_word = word_p;
    self->lane_pin = pin_p;
    self->lane_pinned = pinned && pin_p != NULL;
    self->lane_thread = PyThreadState_GetID(PyThreadState_Get());
    self->lane_generation = identity_generation;
    self->lane_valid = 1;
    Py_RETURN_NONE;
}

static PyObject *
counter_uncache_lane(CounterCoreObject *self, PyObject *Py_UNUSED(ignored))
{
    self->lane_valid = 0;
    Py_RETURN_NONE;
}

static inline int
lane_is_mine(CounterCoreObject *self)
{
    return self->lane_valid && self->lane_generation == identity_generation &&
           self->lane_thread == PyThreadState_GetID(PyThreadState_Get());
}

/* The single optional argument ``n`` of add() and add_and_get(); NULL: absent (n = 1). */
static int
one_argument(const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
             PyObject **n)
{
    *n = NULL;
    Py_ssize_t given = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    if (given > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)", name, given);
        return -1;
    }
    if (nargs == 1)
        *n = args[0];
    else if (given == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "n") != 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", name,
                         PyTuple_GET_ITEM(kwnames, 0));
            return -1;
        }
        *n = args[0];
    }
    return 0;
}

static PyObject *
call_slow(CounterCoreObject *self, const char *method, PyObject *n)
{
    PyObject *name = PyUnicode_InternFromString(method);
    if (name == NULL)
        return NULL;
    PyObject *one = NULL;
    if (n == NULL)
        n = one = PyLong_FromLong(1);
    PyObject *result = n ? PyObject_CallMethodOneArg((PyObject *)self, name, n) : NULL;
    Py_XDECREF(one);
    Py_DECREF(name);
    return result;
}

static PyObject *
counter_add(CounterCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    PyObject *n_arg;
    if (one_argument("add", args, nargs, kwnames, &n_arg) < 0)
        return NULL;
    if (self->base == NULL)
        return closed_error();
    long n = 1;
    if (n_arg != NULL) {
        int overflow;
        /* Only exact ints: a bool or an int subclass takes the Python path, which checks. */
        n = PyLong_CheckExact(n_arg) ? PyLong_AsLongAndOverflow(n_arg, &overflow) : 0;
        if (n == -1 && PyErr_Occurred())
            return NULL;
        if (n <= 0 || n >= SMALL)
            return call_slow(self, "_add_slow", n_arg);
    }
    if (!lane_is_mine(self) || self->lane_word == NULL ||
        __atomic_load_n(self->mode, __ATOMIC_RELAXED) != 0)
        return call_slow(self, "_add_slow", n_arg);
    uint64_t old = __atomic_fetch_add((uint64_t *)self->lane_word, (uint64_t)n << 1,
                                      __ATOMIC_SEQ_CST);
    if (((old + RETIRE) & SLOW_BITS) == 0)
        Py_RETURN_NONE;
    /* Landed on a frozen stripe, or the stripe is nearly full: Python finishes it. */
    return PyObject_CallMethod((PyObject *)self, "_add_landed", "lL", n, (long long)old);
}

static PyObject *
counter_add_and_get(CounterCoreObject *self, PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    PyObject *n_arg;
    if (one_argument("add_and_get", args, nargs, kwnames, &n_arg) < 0)
        return NULL;
    if (self->base == NULL)
        return closed_error();
    long long n = 1;
    if (n_arg != NULL) {
        int overflow = 1;
        if (PyLong_CheckExact(n_arg)) {
            n = PyLong_AsLongLongAndOverflow(n_arg, &overflow);
            if (n == -1 && PyErr_Occurred())
                return NULL;
        }
        if (overflow)
            return call_slow(self, "_add_and_get_slow", n_arg); /* it raises, naming the limit */
    }
    /* Pinned: a thaw that sets BLOCKED finds our pin count and gives up, so while our own
     * pin word shows no BLOCKED bit the counter stays central for this operation. */
    if (!lane_is_mine(self) || !self->lane_pinned ||
        (__atomic_load_n(self->lane_pin, __ATOMIC_SEQ_CST) & BLOCKED))
        return call_slow(self, "_add_and_get_slow", n_arg);
    uint64_t base = (uint64_t)__atomic_load_n(self->frozen_sum, __ATOMIC_SEQ_CST);
    uint64_t before = __atomic_fetch_add((uint64_t *)self->pending, (uint64_t)n,
                                         __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong((long long)(before + (uint64_t)n + base));
}

static void
counter_dealloc(CounterCoreObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static int
counter_traverse(CounterCoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static PyObject *
counter_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    return type->tp_alloc(type, 0);
}

static PyMethodDef counter_methods[] = {
    {"add", (PyCFunction)(void (*)(void))counter_add, METH_FASTCALL | METH_KEYWORDS,
     "add(n=1)\n--\n\nAdd ``n`` (default 1).  Never blocks, never loses an update.\n\n"
     "Raises InvalidArgumentError if ``n`` is not an int in the int64 range,\n"
     "ObjectClosedError once closed."},
    {"add_and_get", (PyCFunction)(void (*)(void))counter_add_and_get,
     METH_FASTCALL | METH_KEYWORDS,
     "add_and_get(n=1) -> int\n--\n\nAdd ``n`` and return the new total, as one "
     "linearizable step.\n\nRaises InvalidArgumentError if ``n`` is not an int in the int64 "
     "range,\nObjectClosedError once closed."},
    {"_counter_bind", (PyCFunction)counter_bind, METH_VARARGS,
     "_counter_bind(buffer, pending, mode, frozen_sum): attach to a counter segment."},
    {"_counter_unbind", (PyCFunction)counter_unbind, METH_NOARGS, "Release the buffer."},
    {"_cache_lane", (PyCFunction)counter_cache_lane, METH_VARARGS,
     "_cache_lane(word, pin, pinned): the calling thread's lane (offsets, -1: none)."},
    {"_uncache_lane", (PyCFunction)counter_uncache_lane, METH_NOARGS, "Forget the lane."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot counter_slots[] = {
    {Py_tp_doc, "The hot paths of SharedCounter (see ipcfork/counter.py)."},
    {Py_tp_new, counter_new},
    {Py_tp_dealloc, counter_dealloc},
    {Py_tp_traverse, counter_traverse},
    {Py_tp_methods, counter_methods},
    {0, NULL},
};

PyType_Spec counter_spec = {
    .name = "ipcfork._os.native._core.CounterCore",
    .basicsize = sizeof(CounterCoreObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = counter_slots,
};
