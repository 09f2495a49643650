"""Builds ipcfork's C core; everything else is declared in setup.cfg.

The extension is optional: without a compiler the install still succeeds and ipcfork uses
its ctypes fallback (same semantics, slower; ``ipcfork info`` says which is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ipcfork._os.native._core",
            ["ipcfork/_os/native/_core.c", "ipcfork/_os/native/mutex.c",
             "ipcfork/_os/native/words.c",
             "ipcfork/_os/native/counter.c", "ipcfork/_os/native/sysvlock.c"],
            depends=["ipcfork/_os/native/core.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
            optional=True,
        )
    ]
)
