/* ipcfork._os.native._core: the compiled core of ipcfork.
 *
 * Two types, both over a writable buffer of shared memory (an mmap of a POSIX shm object or
 * a SysV segment) that they keep exported while bound, so the mapping cannot go away under
 * them:
 *
 *   RobustMutex  a process-shared, robust, error-checking pthread mutex in a 128-byte block
 *                (layout below).  glibc records the mutex being taken in the thread's robust
 *                list before its compare-and-swap, and the kernel walks that list when the
 *                thread exits, marking the futex owner-died: a holder killed at any
 *                instruction releases it, and the next taker gets EOWNERDEAD.
 *   AtomicWords  sequentially consistent atomics on aligned 64-bit words of a buffer.
 *
 * Every method validates its arguments (offsets, alignment, bounds, binding) before it
 * touches shared memory.  The block layout is shared with the ctypes fallback
 * (ipcfork/_os/native/fallback.py), and a process on either path shares one mutex with a
 * process on the other.
 *
 * Block layout (offsets in bytes):
 *     0   pthread_mutex_t (40 bytes on x86_64, 48 on aarch64; 64 reserved)
 *    64   magic: MUTEX_MAGIC once initialised (stored last, with release order)
 *    72   owner token of the holder (pid | start time << 32), 0 when free
 *    80   recoveries: how many times a taker found the previous holder dead
 */
#include "core.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The calling process's token and pid, set from Python (ipcfork._os.identity) at import and
 * after every fork, before any Python code of the child runs. */
uint64_t process_token;
uint64_t identity_generation;
long process_pid;
int spin_count;

PyObject *InvalidArgumentError, *NotOwnerError, *ObjectCorruptError, *ObjectClosedError,
    *DeadlockError, *BufferInUseError, *ObjectNotFoundError;

static void
raise_ipc_v(PyObject *cls, PyObject *what, const char *backend, const char *format,
            va_list args)
{
    PyObject *message = PyUnicode_FromFormatV(format, args);
    if (message == NULL)
        return;
    PyObject *kwargs = Py_BuildValue("{s:O,s:z}", "obj", what ? what : Py_None, "backend",
                                     backend);
    if (kwargs == NULL) {
        Py_DECREF(message);
        return;
    }
    PyObject *argv = PyTuple_Pack(1, message);
    if (argv != NULL) {
        PyObject *error = PyObject_Call(cls, argv, kwargs);
        if (error != NULL) {
            PyErr_SetObject(cls, error);
            Py_DECREF(error);
        }
        Py_DECREF(argv);
    }
    Py_DECREF(kwargs);
    Py_DECREF(message);
}

/* Raise ``cls(message, obj=what, backend="posix")``. */
void
raise_ipc(PyObject *cls, PyObject *what, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    raise_ipc_v(cls, what, "posix", format, args);
    va_end(args);
}

void
raise_ipc_backend(PyObject *cls, PyObject *what, const char *backend, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    raise_ipc_v(cls, what, backend, format, args);
    va_end(args);
}

/* OSError(code, "<what>: <operation> failed: <strerror>"), errno set as on the fallback. */
void
raise_errno(int code, PyObject *what, const char *operation)
{
    PyObject *message = PyUnicode_FromFormat("%S: %s failed: %s", what ? what : Py_None,
                                             operation, strerror(code));
    if (message == NULL)
        return;
    PyObject *args = Py_BuildValue("(iN)", code, message);
    if (args != NULL) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
}

double
monotonic_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* The arguments of acquire(blocking=True, timeout=None) from a vectorcall: *blocking
 * (1 when absent) and *timeout (NULL when absent).  Returns -1 with TypeError set. */
int
parse_acquire_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int *blocking,
                   PyObject **timeout)
{
    PyObject *blocking_arg = nargs >= 1 ? args[0] : NULL;
    *timeout = nargs >= 2 ? args[1] : NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; kwnames != NULL && i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(key, "blocking") == 0 && blocking_arg == NULL)
            blocking_arg = args[nargs + i];
        else if (PyUnicode_CompareWithASCIIString(key, "timeout") == 0 && *timeout == NULL)
            *timeout = args[nargs + i];
        else {
            PyErr_Format(PyExc_TypeError,
                         "acquire() got an unexpected or repeated keyword argument '%U'", key);
            return -1;
        }
    }
    *blocking = blocking_arg == NULL ? 1 : PyObject_IsTrue(blocking_arg);
    return *blocking < 0 ? -1 : 0;
}

/* Parse a timeout as ipcfork._os.timeouts.check_timeout does.  Returns 0 and sets *seconds
 * (-1 for "forever"), or -1 with an exception set. */
int
parse_timeout(PyObject *timeout, double *seconds)
{
    *seconds = -1.0;
    if (timeout == NULL || timeout == Py_None)
        return 0;
    if (PyBool_Check(timeout) || !(PyLong_Check(timeout) || PyFloat_Check(timeout))) {
        raise_ipc_backend(InvalidArgumentError, NULL, NULL,
                          "timeout must be a number of seconds or None, not %s",
                          Py_TYPE(timeout)->tp_name);
        return -1;
    }
    double value = PyFloat_AsDouble(timeout);
    if (value == -1.0 && PyErr_Occurred())
        return -1;
    if (isnan(value) || value < 0) {
        PyObject *repr = PyObject_Repr(timeout);
        if (repr == NULL)
            return -1;
        PyObject *kwargs = Py_BuildValue("{s:s}", "limit", ">= 0");
        PyObject *message = PyUnicode_FromFormat("timeout must be >= 0 seconds, not %U", repr);
        Py_DECREF(repr);
        if (kwargs && message) {
            PyObject *argv = PyTuple_Pack(1, message);
            if (argv) {
                PyObject *error = PyObject_Call(InvalidArgumentError, argv, kwargs);
                if (error) {
                    PyErr_SetObject(InvalidArgumentError, error);
                    Py_DECREF(error);
                }
                Py_DECREF(argv);
            }
        }
        Py_XDECREF(kwargs);
        Py_XDECREF(message);
        return -1;
    }
    if (isinf(value))
        return 0;
    *seconds = value;
    return 0;
}

/* ------------------------------------------------------------------------------------- */
/* the module                                                                             */

static PyObject *
set_identity(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long token;
    long pid;
    if (!PyArg_ParseTuple(args, "Kl:set_identity", &token, &pid))
        return NULL;
    process_token = token;
    process_pid = pid;
    identity_generation++;
    Py_RETURN_NONE;
}

static PyObject *
set_spin(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long spins = PyLong_AsLong(arg);
    if (spins == -1 && PyErr_Occurred())
        return NULL;
    if (spins < 0 || spins > 1000000) {
        PyErr_SetString(InvalidArgumentError, "spin count must be in 0..1000000");
        return NULL;
    }
    spin_count = (int)spins;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_identity", set_identity, METH_VARARGS,
     "set_identity(token, pid): the calling process's token and pid (after every fork)."},
    {"set_spin", set_spin, METH_O,
     "set_spin(n): how many times a contended acquire polls before it sleeps."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    PyObject *errors = PyImport_ImportModule("ipcfork.errors");
    if (errors == NULL)
        return -1;
    struct {
        PyObject **slot;
        const char *name;
    } wanted[] = {
        {&InvalidArgumentError, "InvalidArgumentError"}, {&NotOwnerError, "NotOwnerError"},
        {&ObjectCorruptError, "ObjectCorruptError"},     {&ObjectClosedError, "ObjectClosedError"},
        {&DeadlockError, "DeadlockError"},               {&BufferInUseError, "BufferInUseError"},
        {&ObjectNotFoundError, "ObjectNotFoundError"},
    };
    for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++) {
        *wanted[i].slot = PyObject_GetAttrString(errors, wanted[i].name);
        if (*wanted[i].slot == NULL) {
            Py_DECREF(errors);
            return -1;
        }
    }
    Py_DECREF(errors);
    PyObject *mutex_type = PyType_FromModuleAndSpec(module, &mutex_spec, NULL);
    if (mutex_type == NULL || PyModule_AddObjectRef(module, "RobustMutex", mutex_type) < 0) {
        Py_XDECREF(mutex_type);
        return -1;
    }
    Py_DECREF(mutex_type);
    PyObject *words_type = PyType_FromModuleAndSpec(module, &words_spec, NULL);
    if (words_type == NULL || PyModule_AddObjectRef(module, "AtomicWords", words_type) < 0) {
        Py_XDECREF(words_type);
        return -1;
    }
    Py_DECREF(words_type);
    PyObject *counter_type = PyType_FromModuleAndSpec(module, &counter_spec, NULL);
    if (counter_type == NULL || PyModule_AddObjectRef(module, "CounterCore", counter_type) < 0) {
        Py_XDECREF(counter_type);
        return -1;
    }
    Py_DECREF(counter_type);
    PyObject *sysv_type = PyType_FromModuleAndSpec(module, &sysv_lock_spec, NULL);
    if (sysv_type == NULL || PyModule_AddObjectRef(module, "SysvLockCore", sysv_type) < 0) {
        Py_XDECREF(sysv_type);
        return -1;
    }
    Py_DECREF(sysv_type);
    if (PyModule_AddIntConstant(module, "BLOCK_SIZE", 128) < 0 ||
        PyModule_AddIntConstant(module, "SIZEOF_PTHREAD_MUTEX", sizeof(pthread_mutex_t)) < 0)
        return -1;
    process_pid = (long)getpid();
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ipcfork._os.native._core",
    .m_doc = "ipcfork's compiled core: a robust process-shared mutex and 64-bit atomics.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&core_module);
}
