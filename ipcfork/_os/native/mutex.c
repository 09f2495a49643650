/* RobustMutex: a robust, process-shared, error-checking pthread mutex in a 128-byte block
 * of shared memory (layout and rationale: _core.c). */
#include "core.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#define BLOCK_SIZE 128
#define MAGIC_OFFSET 64
#define TOKEN_OFFSET 72
#define RECOVERIES_OFFSET 80
#define MUTEX_MAGIC 0x3178746d63667069ULL /* b"ipcfmtx1", little-endian */
#define FUTEX_TID_MASK 0x3fffffffu
#define SLICE_NS 20000000L /* a waiter runs Python signal handlers at least this often */
#define NS 1000000000L

_Static_assert(sizeof(pthread_mutex_t) <= MAGIC_OFFSET, "pthread_mutex_t fits its slot");


typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* view.obj is NULL while unbound */
    char *block;         /* the 128-byte block; NULL while unbound */
    PyObject *what;      /* a description for messages */
    pthread_t holder_thread;
    long holder_pid;     /* pid of the process whose thread holds it through this handle */
    int held;            /* holder_thread of holder_pid holds it through this handle */
    int recovered;       /* that holding found the previous holder dead */
    uint64_t dead_token; /* the dead holder's token, 0 if it died before writing it */
    unsigned int holder_tid; /* the futex word's TID when this handle took it */
    int waiters;         /* threads of waiters_pid inside wait_lock on this handle */
    long waiters_pid;
} RobustMutexObject;

static inline pthread_mutex_t *
mutex_of(RobustMutexObject *self)
{
    return (pthread_mutex_t *)self->block;
}

static inline uint64_t *
word_of(RobustMutexObject *self, size_t offset)
{
    return (uint64_t *)(self->block + offset);
}

/* The futex word (the first int of glibc's pthread_mutex_t; the robust-futex ABI puts the
 * holder's TID in it, so the kernel can mark it owner-died). */
static inline unsigned int
futex_word(RobustMutexObject *self)
{
    return __atomic_load_n((unsigned int *)self->block, __ATOMIC_RELAXED);
}

static int
check_bound(RobustMutexObject *self)
{
    if (self->block != NULL)
        return 0;
    raise_ipc(ObjectClosedError, self->what, "%S is closed in this process",
              self->what ? self->what : Py_None);
    return -1;
}

/* The thread recorded by this handle still holds the mutex: its TID is in the futex word
 * (the kernel clears it when that thread dies, and a later holder puts its own there). */
static inline int
held_by_recorded_thread(RobustMutexObject *self)
{
    return self->held && self->holder_pid == process_pid &&
           (futex_word(self) & FUTEX_TID_MASK) == self->holder_tid;
}

static inline int
held_here(RobustMutexObject *self)
{
    return held_by_recorded_thread(self) && pthread_equal(self->holder_thread, pthread_self());
}

/* Bookkeeping once pthread_mutex_*lock returned 0 or EOWNERDEAD: we hold the mutex. */
static void
took(RobustMutexObject *self, int rc)
{
    uint64_t *token = word_of(self, TOKEN_OFFSET);
    if (rc == EOWNERDEAD) {
        /* A clean release zeroes the token before unlocking, so a token here is the dead
         * holder's; zero means it died before recording itself. */
        /* Read and clear: if this taker dies before recording itself, the next one must
         * not blame the holder before it. */
        self->dead_token = __atomic_exchange_n(token, 0, __ATOMIC_RELAXED);
        self->recovered = 1;
        pthread_mutex_consistent(mutex_of(self));
        __atomic_fetch_add(word_of(self, RECOVERIES_OFFSET), 1, __ATOMIC_RELAXED);
    } else {
        self->recovered = 0;
        self->dead_token = 0;
    }
    __atomic_store_n(token, process_token, __ATOMIC_RELAXED);
    self->holder_tid = futex_word(self) & FUTEX_TID_MASK; /* ours: we hold it */
    self->holder_thread = pthread_self();
    self->holder_pid = process_pid;
    self->held = 1;
}

/* Map a lock call's failure to an exception (rc is not 0, EOWNERDEAD, EBUSY, ETIMEDOUT). */
static PyObject *
lock_failed(RobustMutexObject *self, int rc)
{
    if (rc == EDEADLK)
        raise_ipc(DeadlockError, self->what,
                  "%S is already held by this thread: a Mutex is not re-entrant, so this "
                  "acquire could never succeed",
                  self->what);
    else if (rc == ENOTRECOVERABLE)
        raise_ipc(ObjectCorruptError, self->what,
                  "%S is not recoverable: a holder that found its previous owner dead "
                  "released it without marking it consistent",
                  self->what);
    else
        raise_errno(rc, self->what, "acquire");
    return NULL;
}

static int
try_lock(RobustMutexObject *self)
{
    int rc = pthread_mutex_trylock(mutex_of(self));
    if (rc == 0 || rc == EOWNERDEAD)
        took(self, rc);
    return rc;
}

/* Spin briefly: critical sections are usually shorter than a futex sleep and wake-up, and
 * on a multi-core machine the holder runs right now. */
static int
spin_lock(RobustMutexObject *self)
{
    for (int i = 0; i < spin_count; i++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        __asm__ __volatile__("yield");
#endif
        if ((futex_word(self) & FUTEX_TID_MASK) == 0) {
            int rc = try_lock(self);
            if (rc != EBUSY)
                return rc;
        }
    }
    return EBUSY;
}

/* Wait in slices, releasing the GIL, running signal handlers between slices.  Returns
 * 1 (taken), 0 (timed out) or -1 (exception set). */
static int
wait_lock(RobustMutexObject *self, double timeout)
{
    double deadline = timeout < 0 ? -1.0 : monotonic_now() + timeout;
    for (;;) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        double now = (double)until.tv_sec + (double)until.tv_nsec / 1e9;
        long slice = SLICE_NS;
        if (deadline >= 0) {
            double left = deadline - now;
            if (left <= 0)
                return 0;
            if (left * 1e9 < (double)slice)
                slice = (long)(left * 1e9) + 1;
        }
        until.tv_nsec += slice;
        if (until.tv_nsec >= NS) {
            until.tv_sec += 1;
            until.tv_nsec -= NS;
        }
        int rc;
        if (self->waiters_pid != process_pid) { /* counts inherited through fork are void */
            self->waiters = 0;
            self->waiters_pid = process_pid;
        }
        self->waiters++; /* _unbind refuses meanwhile: the block must stay mapped */
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_clocklock(mutex_of(self), CLOCK_MONOTONIC, &until);
        Py_END_ALLOW_THREADS
        self->waiters--;
        if (rc == 0 || rc == EOWNERDEAD) {
            took(self, rc);
            return 1;
        }
        if (rc != ETIMEDOUT) {
            lock_failed(self, rc);
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1; /* a handler raised (Ctrl-C): the wait ends with its exception */
        if (self->block == NULL) { /* a handler closed this handle */
            check_bound(self);
            return -1;
        }
    }
}

static PyObject *
mutex_acquire_impl(RobustMutexObject *self, int blocking, PyObject *timeout_arg)
{
    if (check_bound(self) < 0)
        return NULL;
    double timeout = -1.0;
    if (timeout_arg != NULL && timeout_arg != Py_None) {
        if (!blocking) {
            raise_ipc(InvalidArgumentError, self->what,
                      "a timeout makes no sense with blocking=False");
            return NULL;
        }
        if (parse_timeout(timeout_arg, &timeout) < 0)
            return NULL;
    }
    int rc = try_lock(self);
    if (rc == 0 || rc == EOWNERDEAD)
        Py_RETURN_TRUE;
    if (rc == EDEADLK && !blocking)
        Py_RETURN_FALSE; /* as threading.Lock: a try by the holder fails */
    if (rc != EBUSY)
        return lock_failed(self, rc);
    if (!blocking || timeout == 0)
        Py_RETURN_FALSE;
    rc = spin_lock(self);
    if (rc == 0 || rc == EOWNERDEAD)
        Py_RETURN_TRUE;
    if (rc != EBUSY)
        return lock_failed(self, rc);
    int outcome = wait_lock(self, timeout);
    if (outcome < 0)
        return NULL;
    return PyBool_FromLong(outcome);
}

static PyObject *
mutex_acquire(RobustMutexObject *self, PyObject *const *args, Py_ssize_t nargs,
              PyObject *kwnames)
{
    int blocking;
    PyObject *timeout_arg;
    if (parse_acquire_args(args, nargs, kwnames, &blocking, &timeout_arg) < 0)
        return NULL;
    return mutex_acquire_impl(self, blocking, timeout_arg);
}

static PyObject *
mutex_enter(RobustMutexObject *self, PyObject *Py_UNUSED(ignored))
{
    return mutex_acquire_impl(self, 1, NULL);
}

static PyObject *
not_owner(RobustMutexObject *self)
{
    uint64_t token = __atomic_load_n(word_of(self, TOKEN_OFFSET), __ATOMIC_RELAXED);
    unsigned long pid = (unsigned long)(token & 0xffffffffu);
    const char *holder = (futex_word(self) & FUTEX_TID_MASK) == 0 ? "nobody"
                         : token == 0                              ? "a thread not yet recorded"
                         : pid == (unsigned long)process_pid       ? "another thread of this process"
                                                                   : "pid";
    if (holder[0] == 'p')
        raise_ipc(NotOwnerError, self->what,
                  "%S is held by pid %lu, not by this thread (pid %ld); only the holder "
                  "may release it",
                  self->what, pid, process_pid);
    else
        raise_ipc(NotOwnerError, self->what,
                  "%S is held by %s, not by this thread (pid %ld) through this handle; only "
                  "the holder may release it",
                  self->what, holder, process_pid);
    return NULL;
}

static PyObject *
mutex_release(RobustMutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_bound(self) < 0)
        return NULL;
    /* Ownership is checked on this handle's own record (the holder took the mutex through
     * it): a forked child of the holder, another thread, or another handle is refused. */
    if (!held_here(self))
        return not_owner(self);
    uint64_t *token = word_of(self, TOKEN_OFFSET);
    uint64_t mine = __atomic_exchange_n(token, 0, __ATOMIC_RELAXED);
    self->held = 0;
    self->recovered = 0;
    self->dead_token = 0;
    int rc = pthread_mutex_unlock(mutex_of(self));
    if (rc == EPERM) {
        /* The record was stale (the thread that took it died and its pthread_t was reused):
         * put back the real holder's token we just cleared. */
        uint64_t expected = 0;
        __atomic_compare_exchange_n(token, &expected, mine, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED);
        return not_owner(self);
    }
    if (rc != 0) {
        raise_errno(rc, self->what, "release");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mutex_exit(RobustMutexObject *self, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(n))
{
    PyObject *done = mutex_release(self, NULL);
    if (done == NULL)
        return NULL;
    Py_DECREF(done);
    Py_RETURN_FALSE;
}

static PyObject *
mutex_locked(RobustMutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_bound(self) < 0)
        return NULL;
    return PyBool_FromLong((futex_word(self) & FUTEX_TID_MASK) != 0);
}

/* _bind(buffer, offset, create, what) -> bool: attach to the block at ``offset``.
 * create: initialise a fresh block (the caller made the memory and nobody else uses it).
 * Otherwise returns False, bound to nothing, while the creator has not finished; raises
 * ObjectCorruptError if the block holds something else. */
static PyObject *
mutex_bind(RobustMutexObject *self, PyObject *args)
{
    PyObject *buffer, *what;
    Py_ssize_t offset;
    int create;
    if (!PyArg_ParseTuple(args, "OnpU:_bind", &buffer, &offset, &create, &what))
        return NULL;
    if (self->view.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this handle is bound already");
        return NULL;
    }
    Py_INCREF(what);
    Py_XSETREF(self->what, what);
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (offset < 0 || view.len < BLOCK_SIZE || offset > view.len - BLOCK_SIZE ||
        ((uintptr_t)view.buf + (uintptr_t)offset) % 8 != 0) {
        raise_ipc(InvalidArgumentError, what,
                  "%S: a mutex block needs %d bytes at an 8-byte aligned offset; offset %zd "
                  "of a %zd-byte buffer does not fit",
                  what, BLOCK_SIZE, offset, view.len);
        PyBuffer_Release(&view);
        return NULL;
    }
    char *block = (char *)view.buf + offset;
    uint64_t *magic = (uint64_t *)(block + MAGIC_OFFSET);
    if (create) {
        pthread_mutexattr_t attr;
        int rc = pthread_mutexattr_init(&attr);
        if (rc == 0)
            rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
        if (rc == 0)
            rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
        if (rc == 0)
            rc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
        if (rc == 0) {
            memset(block, 0, BLOCK_SIZE);
            rc = pthread_mutex_init((pthread_mutex_t *)block, &attr);
        }
        pthread_mutexattr_destroy(&attr);
        if (rc != 0) {
            PyBuffer_Release(&view);
            raise_errno(rc, what, "initialise");
            return NULL;
        }
        __atomic_store_n(magic, MUTEX_MAGIC, __ATOMIC_RELEASE);
    } else {
        uint64_t seen = __atomic_load_n(magic, __ATOMIC_ACQUIRE);
        if (seen == 0) {
            PyBuffer_Release(&view);
            Py_RETURN_FALSE;
        }
        if (seen != MUTEX_MAGIC) {
            PyBuffer_Release(&view);
            raise_ipc(ObjectCorruptError, what, "%S does not hold an ipcfork mutex (bad magic)",
                      what);
            return NULL;
        }
    }
    self->view = view;
    self->block = block;
    self->held = 0;
    Py_RETURN_TRUE;
}

/* _unbind(): drop the buffer.  Refused while a thread of this process holds the mutex
 * through this handle: unmapping a held robust mutex would leave a dangling node in the
 * thread's robust list. */
static PyObject *
mutex_unbind(RobustMutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->block == NULL)
        Py_RETURN_NONE;
    if (held_by_recorded_thread(self)) {
        raise_ipc(BufferInUseError, self->what,
                  "%S is held by a thread of this process: release it before closing",
                  self->what);
        return NULL;
    }
    if (self->waiters > 0 && self->waiters_pid == process_pid) {
        raise_ipc(BufferInUseError, self->what,
                  "%S is being waited for by a thread of this process: it cannot be closed "
                  "under that wait",
                  self->what);
        return NULL;
    }
    self->block = NULL;
    PyBuffer_Release(&self->view);
    Py_RETURN_NONE;
}

static PyObject *
mutex_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwargs))
{
    RobustMutexObject *self = (RobustMutexObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->what = PyUnicode_FromString("Mutex");
    if (self->what == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
mutex_traverse(RobustMutexObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void
mutex_dealloc(RobustMutexObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->block != NULL) {
        if (held_by_recorded_thread(self)) {
            /* Dropped while held here: keep the mapping for good rather than unmap memory
             * that this thread's robust list still points into. */
            self->view.obj = NULL;
        } else {
            PyBuffer_Release(&self->view);
        }
        self->block = NULL;
    }
    Py_CLEAR(self->what); /* a str: never part of a cycle, so no tp_clear */
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
get_owner(RobustMutexObject *self, void *Py_UNUSED(closure))
{
    if (check_bound(self) < 0)
        return NULL;
    if ((futex_word(self) & FUTEX_TID_MASK) == 0)
        Py_RETURN_NONE; /* free, or its holder died (the kernel cleared the TID) */
    uint64_t token = __atomic_load_n(word_of(self, TOKEN_OFFSET), __ATOMIC_RELAXED);
    if (token == 0)
        Py_RETURN_NONE; /* taken an instant ago, not yet recorded */
    return PyLong_FromUnsignedLong((unsigned long)(token & 0xffffffffu));
}

static PyObject *
get_previous_owner_died(RobustMutexObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->block != NULL && held_here(self) && self->recovered);
}

static PyObject *
get_dead_owner_pid(RobustMutexObject *self, void *Py_UNUSED(closure))
{
    if (self->block == NULL || !held_here(self) || !self->recovered || self->dead_token == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong((unsigned long)(self->dead_token & 0xffffffffu));
}

static PyObject *
get_recoveries(RobustMutexObject *self, void *Py_UNUSED(closure))
{
    if (check_bound(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(
        __atomic_load_n(word_of(self, RECOVERIES_OFFSET), __ATOMIC_RELAXED));
}

static PyObject *
get_closed(RobustMutexObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->block == NULL);
}

static PyMethodDef mutex_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))mutex_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=None) -> bool\n--\n\n"
     "Take the mutex; True if taken, False if ``timeout`` seconds passed first (or, with\n"
     "``blocking=False``, if it is held).  Signals arriving while waiting run their handlers\n"
     "and the wait goes on; a handler that raises ends it.  Raises InvalidArgumentError for\n"
     "a bad timeout or a timeout with blocking=False, DeadlockError when this thread holds\n"
     "it already, ObjectClosedError after close()."},
    {"release", (PyCFunction)mutex_release, METH_NOARGS,
     "release()\n--\n\nGive the mutex back.  Raises NotOwnerError unless this thread holds it."},
    {"locked", (PyCFunction)mutex_locked, METH_NOARGS,
     "locked() -> bool\n--\n\nTrue if some thread holds the mutex (a snapshot)."},
    {"__enter__", (PyCFunction)mutex_enter, METH_NOARGS, "Take the mutex, waiting as long as needed."},
    {"__exit__", (PyCFunction)(void (*)(void))mutex_exit, METH_FASTCALL, "Give the mutex back."},
    {"_bind", (PyCFunction)mutex_bind, METH_VARARGS,
     "_bind(buffer, offset, create, what) -> bool: attach to a mutex block."},
    {"_unbind", (PyCFunction)mutex_unbind, METH_NOARGS,
     "_unbind(): release the buffer (refused while held by this process)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef mutex_getset[] = {
    {"owner", (getter)get_owner, NULL,
     "The pid of the holder, or None when unlocked (a snapshot).", NULL},
    {"previous_owner_died", (getter)get_previous_owner_died, NULL,
     "True while this thread holds the mutex and its previous holder died holding it.", NULL},
    {"dead_owner_pid", (getter)get_dead_owner_pid, NULL,
     "The pid of the holder that died, while previous_owner_died is True (None if it died\n"
     "before recording itself).", NULL},
    {"recoveries", (getter)get_recoveries, NULL,
     "How many times a taker has found the previous holder dead, over the mutex's life.", NULL},
    {"_closed", (getter)get_closed, NULL, "True while bound to no block.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot mutex_slots[] = {
    {Py_tp_doc, "A robust process-shared pthread mutex in a block of shared memory."},
    {Py_tp_new, mutex_new},
    {Py_tp_dealloc, mutex_dealloc},
    {Py_tp_traverse, mutex_traverse},
    {Py_tp_methods, mutex_methods},
    {Py_tp_getset, mutex_getset},
    {0, NULL},
};

PyType_Spec mutex_spec = {
    .name = "ipcfork._os.native._core.RobustMutex",
    .basicsize = sizeof(RobustMutexObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = mutex_slots,
};

