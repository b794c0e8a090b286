"""User code named on the command line as ``FILE.py:function`` (a decoder, a metric, a data loader)."""
from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantune_edge.errors import InputError


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function ``spec`` names; one clear InputError for every way it can be wrong. A file is
    imported once per version of it (a metric runs at every evaluation; its module must not re-run)."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not name.isidentifier():
        raise InputError(f"--{what} must look like FILE.py:function, got {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise InputError(f"--{what}: {path} does not exist")
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size, name, what)


@functools.lru_cache(maxsize=64)
def _load(file: str, _mtime_ns: int, _size: int, name: str, what: str) -> Callable[..., Any]:
    path = Path(file)
    module_name = f"quantune_plugin_{what.replace('-', '_')}_{abs(hash(path.resolve()))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise InputError(f"--{what}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the user's module failed to import: say how, in one line
        sys.modules.pop(module_name, None)
        raise InputError(f"--{what}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"--{what}: {path} has no function {name!r}")
    return function
