"""What a command may replace, and how it replaces it, so that nothing a user has is lost.

A folder or page a command writes is replaced only when it is empty or an earlier output of the same
kind (a compile folder holds ``compile.json`` (its kind is in compile.artifacts), a run folder ``stages.json``, a results folder
``.quantune-results``), and never when it is, or holds, one of the command's own inputs. New outputs
are built beside their place under names that carry the process id (``.NAME.partial-PID-…``) and
swapped in with renames; temporary folders are named ``quantune-PURPOSE-PID-…``. A process killed
with SIGKILL cannot clean up after itself, so the next one removes what a dead process left.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from quantune_edge.common.records import write_atomic
from quantune_edge.errors import InputError


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: what to call it, and the file inside that marks one."""

    what: str
    marker: str


RUN_FOLDER = OutputKind("run folder", "stages.json")
RESULTS_FOLDER = OutputKind("bench results folder", ".quantune-results")
# A page is ours when it carries this tag (both report pages write it in their <head>), or, for pages
# made before the tag, when its title says so.
PAGE_MARKER = '<meta name="generator" content="quantune-edge">'
_OLD_PAGE_TITLE = "<title>quantune-edge"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_inputs(out: Path, option: str, inputs: Mapping[str, str | Path]) -> None:
    """Refuse ``out`` when it is one of ``inputs`` or a folder holding one (``{"the --calib data": path}``)."""
    out = Path(out).resolve()
    for name, source in inputs.items():
        src = Path(source).resolve()
        if _inside(src, out):
            what = "is" if src == out else "holds"
            raise InputError(f"{option} {out} {what} {name}, an input of this command; choose another {option}")


def check_output_folder(out: str | Path, kind: OutputKind, option: str, inputs: Mapping[str, str | Path] = {},
                        *, replace: bool = True) -> None:
    """Raise unless ``out`` may be written as a ``kind``: it does not exist, is an empty folder, or
    (with ``replace``) is an earlier ``kind``; and it is none of ``inputs`` and holds none of them."""
    out = Path(out)
    refuse_inputs(out, option, inputs)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a {kind.what}; not replaced, choose another {option}")
    if not any(out.iterdir()):
        return
    if not (out / kind.marker).is_file():
        raise InputError(f"{option} {out} holds files and is not a {kind.what} (no {kind.marker}); "
                         f"nothing was replaced, choose another {option}")
    if not replace:
        raise InputError(f"output folder {out} already exists; pass --force to replace it")


def check_output_page(page: str | Path, option: str, inputs: Mapping[str, str | Path] = {}) -> None:
    """Raise unless ``page`` is new or an HTML page this tool wrote."""
    page = Path(page)
    refuse_inputs(page, option, inputs)
    if page.is_dir():
        raise InputError(f"{option} {page} is a folder, not an HTML page; choose a file name")
    if page.exists():
        with open(page, "rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        if PAGE_MARKER not in head and _OLD_PAGE_TITLE not in head:
            raise InputError(f"{option} {page} exists and is not a page quantune-edge wrote; not replaced, choose another {option}")


def write_page(page: str | Path, text: str) -> None:
    """Written whole or not at all, into a folder made if needed."""
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(page, text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Remove the entries of ``folder`` whose names match ``pattern`` (a regex with a ``pid`` group)
    and whose process is gone; another live process's work stays. Returns what was removed."""
    regex = re.compile(pattern)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = regex.fullmatch(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; when the block succeeds it replaces
    ``out_dir`` (checked by the caller with :func:`check_output_folder`). On any failure, SIGINT or
    SIGTERM included, the staging folder goes and an existing ``out_dir`` is left untouched."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = re.escape(out_dir.name)
    remove_dead_leftovers(out_dir.parent, rf"\.{name}\.(partial|old)-(?P<pid>\d+)(-.*)?")
    pid = os.getpid()
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{pid}-", dir=out_dir.parent))
    try:
        yield stage
        backup = None
        if out_dir.exists() and _exchange(stage, out_dir):
            backup = stage  # now the old folder
        elif out_dir.exists():  # no atomic exchange here: the old folder is renamed aside, then the new one in
            backup = out_dir.with_name(f".{out_dir.name}.old-{pid}")
            out_dir.rename(backup)
            try:
                stage.rename(out_dir)
            except BaseException:
                backup.rename(out_dir)
                raise
        else:
            stage.rename(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE, glibc 2.28+), so that
    ``b`` is never missing; False where the system or the filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def temp_folder(purpose: str) -> Iterator[Path]:
    """A temporary folder ``quantune-PURPOSE-PID-…``, removed afterwards; those of dead processes
    (a SIGKILL leaves them) are removed first."""
    tmp = Path(tempfile.gettempdir())
    remove_dead_leftovers(tmp, rf"quantune-{re.escape(purpose)}-(?P<pid>\d+)-.*")
    with tempfile.TemporaryDirectory(prefix=f"quantune-{purpose}-{os.getpid()}-") as folder:
        yield Path(folder)
