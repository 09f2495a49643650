/* SysvLockCore: the hot paths of the SysV Mutex (ipcfork/_mutex_sysv.py) as C methods.
 *
 * The lock is member 0 of a SysV semaphore set, taken with SEM_UNDO so the kernel gives it
 * back when the holder dies; an owner word in shared memory holds the holder's token.  A
 * clean release zeroes the word *before* giving the semaphore back, so a taker that finds a
 * token there knows the previous holder died holding it.  The holder is a process (SEM_UNDO
 * belongs to the process), so any thread of the holding process may release.
 *
 * Being C methods, ``__exit__`` and ``release`` cannot be interrupted by a Python signal
 * handler between their start and the semop that gives the lock back (a Python method can:
 * at its first instruction), and every ``acquire`` (blocking, timed or not) records the
 * holder in the same C call that took the semaphore.
 */
#include "core.h"

#include <errno.h>
#include <string.h>
#include <sys/sem.h>
#include <time.h>

#define SLICE 0.02 /* seconds: a waiter runs Python signal handlers at least this often */

typedef struct {
    PyObject_HEAD
    Py_buffer view;     /* the owner word's memory; view.obj NULL while unbound */
    uint64_t *owner;    /* NULL while unbound */
    int semid;
    int held;           /* holder_pid holds it (taken through this handle) */
    long holder_pid;
    int recovered;      /* that holding found the previous holder dead */
    uint64_t dead_token;
    PyObject *what;
    int waiters;        /* threads of waiters_pid blocked in semop on this handle */
    long waiters_pid;
} SysvLockObject;

static int
sysv_bound(SysvLockObject *self)
{
    if (self->owner != NULL)
        return 0;
    raise_ipc_backend(ObjectClosedError, self->what, "sysv", "%S is closed in this process",
                      self->what ? self->what : Py_None);
    return -1;
}

/* Record this process as the holder, once the semaphore is ours. */
static void
sysv_record(SysvLockObject *self)
{
    uint64_t previous = __atomic_load_n(self->owner, __ATOMIC_RELAXED);
    self->recovered = previous != 0;
    self->dead_token = previous;
    __atomic_store_n(self->owner, process_token, __ATOMIC_RELAXED);
    self->holder_pid = process_pid;
    self->held = 1;
}

/* A semop that failed for another reason than "busy" or a signal. */
static PyObject *
sysv_failed(SysvLockObject *self, int code)
{
    if (code == EIDRM || code == EINVAL)
        raise_ipc_backend(ObjectNotFoundError, self->what, "sysv",
                          "%S was removed (semaphore set id %d)", self->what, self->semid);
    else
        raise_errno(code, self->what, "acquire");
    return NULL;
}

/* Take the lock: a non-blocking semop first (no GIL release when it is free); then, if
 * ``blocking``, semtimedop in slices of SLICE seconds with the GIL released, running
 * signal handlers between slices, until ``timeout`` (< 0: forever).  The holder is
 * recorded in the same C call that took the semaphore, so no Python code runs between. */
static PyObject *
sysv_take(SysvLockObject *self, int blocking, double timeout)
{
    if (sysv_bound(self) < 0)
        return NULL;
    struct sembuf op = {0, -1, SEM_UNDO | IPC_NOWAIT};
    if (semop(self->semid, &op, 1) == 0) {
        sysv_record(self);
        Py_RETURN_TRUE;
    }
    if (errno != EAGAIN && errno != EINTR)
        return sysv_failed(self, errno);
    if (!blocking || timeout == 0)
        Py_RETURN_FALSE;
    op.sem_flg = SEM_UNDO;
    double deadline = timeout < 0 ? -1.0 : monotonic_now() + timeout;
    for (;;) {
        double slice = SLICE;
        if (deadline >= 0) {
            double left = deadline - monotonic_now();
            if (left <= 0)
                Py_RETURN_FALSE;
            if (left < slice)
                slice = left;
        }
        struct timespec span = {(time_t)slice, (long)((slice - (double)(time_t)slice) * 1e9)};
        if (self->waiters_pid != process_pid) { /* counts inherited through fork are void */
            self->waiters = 0;
            self->waiters_pid = process_pid;
        }
        self->waiters++; /* _sysv_unbind refuses meanwhile */
        int rc, saved;
        Py_BEGIN_ALLOW_THREADS
        rc = semtimedop(self->semid, &op, 1, &span);
        saved = errno;
        Py_END_ALLOW_THREADS
        self->waiters--;
        if (rc == 0) {
            if (self->owner == NULL) { /* cannot happen with the refusal; never write NULL */
                struct sembuf back = {0, 1, SEM_UNDO | IPC_NOWAIT};
                semop(self->semid, &back, 1);
                sysv_bound(self);
                return NULL;
            }
            sysv_record(self);
            Py_RETURN_TRUE;
        }
        if (saved != EAGAIN && saved != EINTR)
            return sysv_failed(self, saved);
        if (PyErr_CheckSignals() < 0)
            return NULL; /* a handler raised (Ctrl-C): nothing was taken */
        if (sysv_bound(self) < 0)
            return NULL; /* a handler closed this handle */
    }
}

static PyObject *
sysv_acquire(SysvLockObject *self, PyObject *const *args, Py_ssize_t nargs,
             PyObject *kwnames)
{
    int blocking;
    PyObject *timeout_arg;
    if (sysv_bound(self) < 0 || parse_acquire_args(args, nargs, kwnames, &blocking,
                                                   &timeout_arg) < 0)
        return NULL;
    double timeout = -1.0;
    if (timeout_arg != NULL && timeout_arg != Py_None) {
        if (!blocking) {
            raise_ipc_backend(InvalidArgumentError, self->what, "sysv",
                              "a timeout makes no sense with blocking=False");
            return NULL;
        }
        if (parse_timeout(timeout_arg, &timeout) < 0)
            return NULL;
    }
    return sysv_take(self, blocking, timeout);
}

static PyObject *
sysv_enter(SysvLockObject *self, PyObject *Py_UNUSED(ignored))
{
    return sysv_take(self, 1, -1.0);
}

static PyObject *
sysv_release(SysvLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (sysv_bound(self) < 0)
        return NULL;
    if (!self->held || self->holder_pid != process_pid)
        return PyObject_CallMethod((PyObject *)self, "_not_owner", NULL);
    self->held = 0;
    self->recovered = 0;
    self->dead_token = 0;
    __atomic_store_n(self->owner, 0, __ATOMIC_RELAXED); /* first: see the module comment */
    struct sembuf op = {0, 1, SEM_UNDO | IPC_NOWAIT};
    if (semop(self->semid, &op, 1) != 0) {
        PyErr_Format(PyExc_OSError, "%S: release failed: %s", self->what, strerror(errno));
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
sysv_exit(SysvLockObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(n))
{
    PyObject *done = sysv_release(self, NULL);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    Py_RETURN_FALSE;
}

/* _sysv_bind(semid, owner_buffer, what): the set's id and the memory of the owner word. */
static PyObject *
sysv_bind(SysvLockObject *self, PyObject *args)
{
    int semid;
    PyObject *buffer, *what;
    if (!PyArg_ParseTuple(args, "iOU:_sysv_bind", &semid, &buffer, &what))
        return NULL;
    if (self->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this handle is bound already");
        return NULL;
    }
    Py_INCREF(what);
    Py_XSETREF(self->what, what);
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (self->view.len < 8 || (uintptr_t)self->view.buf % 8 != 0) {
        PyBuffer_Release(&self->view);
        raise_ipc_backend(InvalidArgumentError, what, "sysv",
                          "%S: the owner word needs 8 aligned bytes", what);
        return NULL;
    }
    self->semid = semid;
    self->owner = self->view.buf;
    self->held = 0;
    Py_RETURN_NONE;
}

static PyObject *
sysv_unbind(SysvLockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->owner != NULL && self->waiters > 0 && self->waiters_pid == process_pid) {
        raise_ipc_backend(BufferInUseError, self->what, "sysv",
                          "%S is being waited for by a thread of this process: it cannot be "
                          "closed under that wait", self->what);
        return NULL;
    }
    if (self->owner != NULL && self->held && self->holder_pid == process_pid) {
        raise_ipc_backend(BufferInUseError, self->what, "sysv",
                          "%S is held by this process: release it before closing", self->what);
        return NULL;
    }
    if (self->owner != NULL) {
        self->owner = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *
sysv_get_previous_owner_died(SysvLockObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->held && self->holder_pid == process_pid && self->recovered);
}

static PyObject *
sysv_get_dead_owner_pid(SysvLockObject *self, void *Py_UNUSED(closure))
{
    if (!(self->held && self->holder_pid == process_pid && self->recovered))
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong((unsigned long)(self->dead_token & 0xffffffffu));
}

static PyObject *
sysv_get_held_here(SysvLockObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->held && self->holder_pid == process_pid);
}

static PyObject *
sysv_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    SysvLockObject *self = (SysvLockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->semid = -1;
    self->what = PyUnicode_FromString("Mutex (sysv)");
    if (self->what == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
sysv_traverse(SysvLockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void
sysv_dealloc(SysvLockObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->owner != NULL) {
        self->owner = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->what);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef sysv_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))sysv_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=None) -> bool\n--\n\n"
     "Take the mutex; True if taken, False if ``timeout`` seconds passed first (or, with\n"
     "``blocking=False``, if it is held).  Signals arriving while waiting run their handlers\n"
     "and the wait goes on; a handler that raises ends it.  Raises InvalidArgumentError for\n"
     "a bad timeout or a timeout with blocking=False, ObjectClosedError after close()."},
    {"release", (PyCFunction)sysv_release, METH_NOARGS,
     "release()\n--\n\nGive the mutex back.  Raises NotOwnerError unless this process holds "
     "it."},
    {"__enter__", (PyCFunction)sysv_enter, METH_NOARGS, "Take the mutex."},
    {"__exit__", (PyCFunction)(void (*)(void))sysv_exit, METH_FASTCALL, "Give it back."},
    {"_sysv_bind", (PyCFunction)sysv_bind, METH_VARARGS,
     "_sysv_bind(semid, owner_buffer, what)."},
    {"_sysv_unbind", (PyCFunction)sysv_unbind, METH_NOARGS, "Release the owner buffer."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sysv_getset[] = {
    {"previous_owner_died", (getter)sysv_get_previous_owner_died, NULL,
     "True while this process holds the mutex and its previous holder died holding it.", NULL},
    {"dead_owner_pid", (getter)sysv_get_dead_owner_pid, NULL,
     "The pid of the holder that died, while previous_owner_died is True.", NULL},
    {"_held_here", (getter)sysv_get_held_here, NULL, "This process holds it.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot sysv_slots[] = {
    {Py_tp_doc, "The hot paths of the SysV Mutex (see ipcfork/_mutex_sysv.py)."},
    {Py_tp_new, sysv_new},
    {Py_tp_dealloc, sysv_dealloc},
    {Py_tp_traverse, sysv_traverse},
    {Py_tp_methods, sysv_methods},
    {Py_tp_getset, sysv_getset},
    {0, NULL},
};

PyType_Spec sysv_lock_spec = {
    .name = "ipcfork._os.native._core.SysvLockCore",
    .basicsize = sizeof(SysvLockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = sysv_slots,
};
