"""Which TFLite runtime is on the device, and interpreters built from it.

tflite-runtime (the small wheel Raspberry Pi users install) is preferred; ai-edge-litert, its
successor, is used when that is what is installed. TensorFlow is never imported.
"""
from __future__ import annotations

import importlib
import os
import signal

from .errors import AgentError

_CANDIDATES = (
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
)


def _find():
    for module_name, package in _CANDIDATES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module, module_name, package
    return None


def runtime_facts() -> dict:
    """``{}`` when no runtime is importable, else its package, module and version."""
    found = _find()
    if found is None:
        return {}
    _, module_name, package = found
    try:
        from importlib.metadata import version

        ver = version(package)
    except Exception:
        ver = "unknown"
    return {"package": package, "module": module_name, "version": ver}


def load_interpreter(model_path: str, threads: int, xnnpack: bool = True):
    """A ready (allocated) interpreter and what runs it: "xnnpack" (the runtime's default delegate),
    "builtin" when XNNPACK was disabled, or "builtin (XNNPACK failed: ...)" when XNNPACK refused the
    model at prepare time (NanoDet-m's int8 model does): the builtin kernels still run it."""
    found = _find()
    if found is None:
        raise AgentError(
            "runtime_missing",
            "no TFLite runtime on this device: pip install tflite-runtime (or ai-edge-litert)",
        )
    module = found[0]
    kwargs = {"model_path": model_path, "num_threads": threads}
    builtin = dict(kwargs, experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    _probe_load(module, kwargs if xnnpack else builtin, model_path)
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


def _allocated(module, kwargs: dict):
    interpreter = module.Interpreter(**kwargs)
    interpreter.allocate_tensors()
    return interpreter


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["unknown error"])[0]


def _probe_load(module, kwargs: dict, model_path: str) -> None:
    """Load the model once in a forked child first: the runtime does not verify the flatbuffer, and a
    truncated or corrupt file can crash it (SIGSEGV), which must become a clean error, not a dead agent."""
    with open(model_path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise AgentError("model_invalid", "%s: not a TFLite model (no TFL3 file identifier)" % model_path)
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:
        try:
            module.Interpreter(**kwargs).allocate_tensors()
            code = 0
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise AgentError("model_invalid", "%s: the TFLite runtime crashed loading this model (%s); the file is corrupt or "
                         "truncated" % (model_path, signal.Signals(sig).name))
