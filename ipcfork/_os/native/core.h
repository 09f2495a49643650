/* Shared declarations of ipcfork's compiled core (see _core.c for the overview). */
#ifndef IPCFORK_CORE_H
#define IPCFORK_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

/* The calling process's token (pid | start time << 32) and pid, set from Python at import
 * and after every fork (ipcfork._os.native.__init__). */
extern uint64_t process_token;
/* Bumped by every set_identity (import, and every fork): a per-process epoch. */
extern uint64_t identity_generation;
extern long process_pid;
extern int spin_count;

extern PyObject *InvalidArgumentError, *NotOwnerError, *ObjectCorruptError, *ObjectClosedError,
    *DeadlockError, *BufferInUseError, *ObjectNotFoundError;

/* Raise ``cls(message, obj=what, backend="posix")``. */
void raise_ipc(PyObject *cls, PyObject *what, const char *format, ...);
/* The same with another backend ("sysv", or NULL for None). */
void raise_ipc_backend(PyObject *cls, PyObject *what, const char *backend, const char *format,
                       ...);
void raise_errno(int code, PyObject *what, const char *operation);
double monotonic_now(void);
int parse_timeout(PyObject *timeout, double *seconds);
int parse_acquire_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int *blocking,
                       PyObject **timeout);
/* An exact int within int64 into *out; -1 with InvalidArgumentError (or TypeError) set. */
int as_int64(PyObject *value, int64_t *out);

extern PyType_Spec mutex_spec, words_spec, counter_spec, sysv_lock_spec;

#endif
