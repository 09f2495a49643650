"""The operating-system layer under the primitives and the pool: POSIX and System V objects
(``posix``, ``sysv``) and the create-or-open they share (``opening``), the libc calls the raw
packages lack (``libc``), what we read in /proc (``procfs``), naming and ``ftok`` keys
(``names``), permission checks (``security``), the registry of objects we created
(``registry``) and who still uses them (``usage``), process identity across forks
(``identity``), errno translation (``translate``), timeouts (``timeouts``), and the native
core in C with its ctypes fallback (``native``).  Nothing here is public API."""
