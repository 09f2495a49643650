"""The public surface: every name exported once, sorted, documented."""

from __future__ import annotations

import inspect

import ipcfork


def test_all_is_sorted_unique_and_importable() -> None:
    names = ipcfork.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(ipcfork, name), name


def test_every_public_name_and_method_has_a_docstring() -> None:
    for name in ipcfork.__all__:
        obj = getattr(ipcfork, name)
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr}"


def test_package_is_typed() -> None:
    import importlib.resources

    assert importlib.resources.files("ipcfork").joinpath("py.typed").is_file()


def test_imports_without_optional_extras() -> None:
    """numpy, tqdm and matplotlib are extras: ipcfork must import and work without them."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for blocked in ('numpy', 'tqdm', 'matplotlib'):\n"
        "    sys.modules[blocked] = None\n"
        "import ipcfork\n"
        "shm = ipcfork.SharedMemory(8)\n"
        "shm.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
