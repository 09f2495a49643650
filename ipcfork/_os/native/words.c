/* AtomicWords: sequentially consistent atomics on the aligned 64-bit words of a buffer. */
#include "core.h"


typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base; /* NULL while unbound */
} AtomicWordsObject;

static PyObject *
words_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *buffer;
    static char *keywords[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:AtomicWords", keywords, &buffer))
        return NULL;
    AtomicWordsObject *self = (AtomicWordsObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if ((uintptr_t)self->view.buf % 8 != 0) {
        PyBuffer_Release(&self->view);
        Py_DECREF(self);
        raise_ipc(InvalidArgumentError, NULL, "AtomicWords needs an 8-byte aligned buffer");
        return NULL;
    }
    self->base = self->view.buf;
    return (PyObject *)self;
}

/* The word at ``offset``, or NULL with an exception set. */
static int64_t *
word_at(AtomicWordsObject *self, PyObject *offset_arg)
{
    if (self->base == NULL) {
        raise_ipc(ObjectClosedError, NULL, "AtomicWords is closed");
        return NULL;
    }
    Py_ssize_t offset = PyNumber_AsSsize_t(offset_arg, PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0 || offset % 8 != 0 || self->view.len < 8 || offset > self->view.len - 8) {
        PyErr_Format(InvalidArgumentError,
                     "word offset %zd is outside the %zd-byte buffer or not a multiple of 8",
                     offset, self->view.len);
        return NULL;
    }
    return (int64_t *)(self->base + offset);
}

int
as_int64(PyObject *value, int64_t *out)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_Format(InvalidArgumentError, "%R is outside the int64 range -2**63..2**63-1",
                     value);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static PyObject *
words_load(AtomicWordsObject *self, PyObject *offset)
{
    int64_t *word = word_at(self, offset);
    if (word == NULL)
        return NULL;
    return PyLong_FromLongLong(__atomic_load_n(word, __ATOMIC_SEQ_CST));
}

#define WORDS_BINARY(name, expression)                                                 \
    static PyObject *words_##name(AtomicWordsObject *self, PyObject *const *args,        \
                                  Py_ssize_t nargs)                                     \
    {                                                                                   \
        int64_t value;                                                                  \
        if (nargs != 2) {                                                               \
            PyErr_SetString(PyExc_TypeError, #name "() takes an offset and a value");    \
            return NULL;                                                                \
        }                                                                               \
        int64_t *word = word_at(self, args[0]);                                         \
        if (word == NULL || as_int64(args[1], &value) < 0)                              \
            return NULL;                                                                \
        return expression;                                                              \
    }

/* Arithmetic wraps like int64_t: done on unsigned words, as the hardware does. */
WORDS_BINARY(fetch_add, PyLong_FromLongLong((int64_t)__atomic_fetch_add(
                            (uint64_t *)word, (uint64_t)value, __ATOMIC_SEQ_CST)))
WORDS_BINARY(fetch_or, PyLong_FromLongLong(__atomic_fetch_or(word, value, __ATOMIC_SEQ_CST)))
WORDS_BINARY(fetch_and, PyLong_FromLongLong(__atomic_fetch_and(word, value, __ATOMIC_SEQ_CST)))
WORDS_BINARY(exchange, PyLong_FromLongLong(__atomic_exchange_n(word, value, __ATOMIC_SEQ_CST)))

static PyObject *
words_store(AtomicWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t value;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "store() takes an offset and a value");
        return NULL;
    }
    int64_t *word = word_at(self, args[0]);
    if (word == NULL || as_int64(args[1], &value) < 0)
        return NULL;
    __atomic_store_n(word, value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* cas(offset, expected, new) -> (swapped, seen): seen is the word's value before. */
static PyObject *
words_cas(AtomicWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t expected, desired;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "cas() takes an offset, an expected and a new value");
        return NULL;
    }
    int64_t *word = word_at(self, args[0]);
    if (word == NULL || as_int64(args[1], &expected) < 0 || as_int64(args[2], &desired) < 0)
        return NULL;
    int64_t seen = expected;
    int swapped = __atomic_compare_exchange_n(word, &seen, desired, 0, __ATOMIC_SEQ_CST,
                                              __ATOMIC_SEQ_CST);
    return Py_BuildValue("(NL)", PyBool_FromLong(swapped), (long long)seen);
}

static PyObject *
words_close(AtomicWordsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static int
words_traverse(AtomicWordsObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void
words_dealloc(AtomicWordsObject *self)
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

static PyMethodDef words_methods[] = {
    {"load", (PyCFunction)words_load, METH_O, "load(offset) -> int: the word, atomically."},
    {"store", (PyCFunction)(void (*)(void))words_store, METH_FASTCALL,
     "store(offset, value): set the word, atomically."},
    {"fetch_add", (PyCFunction)(void (*)(void))words_fetch_add, METH_FASTCALL,
     "fetch_add(offset, n) -> int: add n (wrapping like int64_t); the value before."},
    {"fetch_or", (PyCFunction)(void (*)(void))words_fetch_or, METH_FASTCALL,
     "fetch_or(offset, bits) -> int: the value before."},
    {"fetch_and", (PyCFunction)(void (*)(void))words_fetch_and, METH_FASTCALL,
     "fetch_and(offset, bits) -> int: the value before."},
    {"exchange", (PyCFunction)(void (*)(void))words_exchange, METH_FASTCALL,
     "exchange(offset, value) -> int: the value before."},
    {"cas", (PyCFunction)(void (*)(void))words_cas, METH_FASTCALL,
     "cas(offset, expected, new) -> (swapped, seen)."},
    {"close", (PyCFunction)words_close, METH_NOARGS, "Release the buffer."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot words_slots[] = {
    {Py_tp_doc, "Sequentially consistent atomics on the 64-bit words of a shared buffer.\n\n"
                "Offsets are in bytes, multiples of 8, bounds-checked; values are int64.\n"
                "Raises InvalidArgumentError for a bad offset or value, ObjectClosedError\n"
                "after close()."},
    {Py_tp_new, words_new},
    {Py_tp_dealloc, words_dealloc},
    {Py_tp_traverse, words_traverse},
    {Py_tp_methods, words_methods},
    {0, NULL},
};

PyType_Spec words_spec = {
    .name = "ipcfork._os.native._core.AtomicWords",
    .basicsize = sizeof(AtomicWordsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = words_slots,
};

