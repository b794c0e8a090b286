"""Which TFLite runtime is on the device, and interpreters built from it.

The newest runtime present is used: ai-edge-litert (the maintained one, with wheels for today's
Pythons), else tflite-runtime (the small wheel older Raspberry Pi OS releases install). Finding one
imports nothing; its first import runs in a forked child, so a runtime that crashes on import (a
wheel built for another CPU dies of SIGILL) is an answer, not a dead agent. TensorFlow is never imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import signal

from .errors import AgentError

_CANDIDATES = (  # newest first
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
)


def runtime_for(machine: str, python: tuple) -> str:
    """The package to install here: the host's selection table (quantune_edge.deploy.runtimes), by
    machine and Python (a test keeps the two in step; the agent cannot import the host package)."""
    if machine in ("aarch64", "x86_64") and python >= (3, 9):
        return "ai-edge-litert"
    if python <= (3, 11):
        return "tflite-runtime"
    return "(no runtime has a wheel for this machine and Python)"


def _present():
    """(module, package) of the newest runtime installed, or None; nothing is imported."""
    for top, module_name, package in _CANDIDATES:
        try:
            if importlib.util.find_spec(top) is not None:
                return module_name, package
        except (ImportError, ValueError):
            continue
    return None


def runtime_facts(check_import: bool = False) -> dict:
    """``{}`` when no runtime is installed, else its package, module and version (and, with
    ``check_import``, "import": "ok" or how importing it failed)."""
    found = _present()
    if found is None:
        return {}
    module_name, package = found
    try:
        from importlib.metadata import version

        ver = version(package)
    except Exception:
        ver = "unknown"
    facts = {"package": package, "module": module_name, "version": ver}
    if check_import:
        facts["import"] = _import_in_child(module_name)
    return facts


def _import_in_child(module_name: str) -> str:
    outcome, said = _in_child(lambda say: importlib.import_module(module_name))
    return "ok" if outcome == "ok" else outcome if outcome.startswith("crashed") else "failed: %s" % said.strip()


def _in_child(work) -> tuple:
    """Run ``work(say)`` in a forked child: ("ok" | "failed" | "crashed (SIGNAME)", what it said
    through ``say`` before it ended). Without fork (not a Linux board) it runs here."""
    said = []
    if not hasattr(os, "fork"):
        try:
            work(said.append)
        except Exception as exc:
            return "failed", "\n".join(said + ["%s: %s" % (type(exc).__name__, _first_line(exc))])
        return "ok", "\n".join(said)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)

        def say(text):
            os.write(write_end, (text + "\n").encode(errors="replace"))

        code = 0
        try:
            work(say)
        except BaseException as exc:
            say(("%s: %s" % (type(exc).__name__, _first_line(exc)))[:400])
            code = 3
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        text = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crashed (%s)" % signal.Signals(os.WTERMSIG(status)).name, text
    return ("ok" if os.WEXITSTATUS(status) == 0 else "failed"), text


def load_interpreter(model_path: str, threads: int, xnnpack: bool = True):
    """A ready (allocated) interpreter and what runs it: "xnnpack" (the runtime's default delegate),
    "builtin" when XNNPACK was disabled, or "builtin (XNNPACK failed: ...)" when XNNPACK refused the
    model at prepare time (NanoDet-m's int8 model does): the builtin kernels still run it."""
    found = _present()
    if found is None:
        raise AgentError("runtime_missing", "no TFLite runtime on this device (Python %s, %s): pip install %s"
                         % (platform.python_version(), platform.machine(),
                            runtime_for(platform.machine(), tuple(int(v) for v in platform.python_version_tuple()[:2]))))
    _probe_load(found, model_path, threads, xnnpack)
    module = importlib.import_module(found[0])
    kwargs = _interpreter_kwargs(module, model_path, threads, xnnpack=True)
    builtin = _interpreter_kwargs(module, model_path, threads, xnnpack=False)
    if xnnpack:
        try:
            return _allocated(module, kwargs), "xnnpack"
        except RuntimeError as exc:
            failure = _first_line(exc)
        except ValueError as exc:
            raise AgentError("model_invalid", "%s: the TFLite runtime cannot load this model (%s)" % (model_path, _first_line(exc))) from None
    try:
        interpreter = _allocated(module, builtin)
    except (ValueError, RuntimeError) as exc:
        raise AgentError("model_invalid", "%s: the TFLite runtime cannot load this model (%s)" % (model_path, _first_line(exc))) from None
    return interpreter, "builtin (XNNPACK failed: %s)" % failure if xnnpack else "builtin"


def _interpreter_kwargs(module, model_path: str, threads: int, xnnpack: bool) -> dict:
    kwargs = {"model_path": model_path, "num_threads": threads}
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return kwargs


def _allocated(module, kwargs: dict):
    interpreter = module.Interpreter(**kwargs)
    interpreter.allocate_tensors()
    return interpreter


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["unknown error"])[0]


def _probe_load(found: tuple, model_path: str, threads: int, xnnpack: bool) -> None:
    """Import the runtime and load the model once in a forked child first: a runtime built for
    another CPU can crash on import, and the runtime does not verify the flatbuffer, so a truncated
    or corrupt file can crash it (SIGSEGV); both must become clean errors, not a dead agent."""
    module_name, package = found
    with open(model_path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise AgentError("model_invalid", "%s: not a TFLite model (no TFL3 file identifier)" % model_path)

    def work(say):
        module = importlib.import_module(module_name)
        say("imported")
        _allocated(module, _interpreter_kwargs(module, model_path, threads, xnnpack))

    outcome, said = _in_child(work)
    if "imported" not in said.splitlines() and outcome != "ok":
        how = outcome if outcome.startswith("crashed") else "failed (%s)" % said.strip()
        raise AgentError("runtime_broken", "%s is installed but its import %s" % (package, how))
    if outcome.startswith("crashed"):
        raise AgentError("model_invalid", "%s: the TFLite runtime crashed loading this model %s; the file is corrupt or "
                         "truncated" % (model_path, outcome[len("crashed "):]))
