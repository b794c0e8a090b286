"""What the agent measures: latency of one model, and its outputs on given samples."""
from __future__ import annotations

import hashlib
import os
import resource
import time

import numpy as np

from .errors import AgentError
from .runtime import load_interpreter
from .stats import latency_summary


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor(detail: dict) -> dict:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return {
        "name": detail["name"],
        "shape": [int(s) for s in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "scale": float(scale),
        "zero_point": int(zero_point),
    }


def model_facts(path: str, interpreter) -> dict:
    if not os.path.isfile(path):
        raise AgentError("model_missing", "%s: no such model file" % path)
    return {
        "path": path,
        "sha256": sha256_file(path),
        "size_bytes": os.path.getsize(path),
        "inputs": [_tensor(d) for d in interpreter.get_input_details()],
        "outputs": [_tensor(d) for d in interpreter.get_output_details()],
    }


def _open(path: str, threads: int, xnnpack: bool):
    if not os.path.isfile(path):
        raise AgentError("model_missing", "%s: no such model file" % path)
    return load_interpreter(path, threads, xnnpack)


def random_input(detail: dict, rng: np.random.Generator) -> np.ndarray:
    """Random data of the tensor's dtype and shape (float: N(0, 1); integers: their full range)."""
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(s) for s in detail["shape"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def _fit(x: np.ndarray, detail: dict, what: str) -> np.ndarray:
    """``x`` in the tensor's shape (a missing batch axis of 1 is added) and dtype (float32 data is
    quantized with the tensor's own scale when the model takes int8)."""
    shape = tuple(int(s) for s in detail["shape"])
    if x.shape != shape and (1,) + tuple(x.shape) == shape:
        x = x[None]
    if tuple(x.shape) != shape:
        raise AgentError("bad_input", "%s has shape %s but the model input %r needs %s" % (what, tuple(x.shape), detail["name"], shape))
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AgentError("bad_input", "%s: not a readable .npy array (%s)" % (path, exc)) from None


def _prime(interpreter, inputs: list, data: list, warmup: int) -> None:
    """Set the inputs once and run the untimed warm-up invocations."""
    for detail, x in zip(inputs, data):
        interpreter.set_tensor(detail["index"], x)
    for _ in range(warmup):
        interpreter.invoke()


def _timed_runs(interpreter, inputs: list, data: list, runs: int) -> list:
    """ms per set_tensor + invoke, ``runs`` times: the inputs are prepared beforehand, so the agent
    adds nothing to what is timed."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for detail, x in zip(inputs, data):
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(path: str, *, warmup: int = 10, runs: int = 100, threads: int = 4, xnnpack: bool = True,
          input_path: str | None = None, seed: int = 0) -> dict:
    """Latency over ``runs`` timed invocations after ``warmup`` untimed ones."""
    if warmup < 0 or runs < 1 or threads < 1:
        raise AgentError("usage", "need warmup >= 0, runs >= 1, threads >= 1")
    wall_start = time.perf_counter()
    interpreter, kernels = _open(path, threads, xnnpack)
    inputs = interpreter.get_input_details()
    if input_path is not None:
        if len(inputs) != 1:
            raise AgentError("bad_input", "--input gives one array but the model has %d inputs" % len(inputs))
        data = [_fit(_load_npy(input_path), inputs[0], input_path)]
    else:
        rng = np.random.default_rng(seed)
        data = [random_input(d, rng) for d in inputs]
    _prime(interpreter, inputs, data, warmup)
    times = _timed_runs(interpreter, inputs, data, runs)
    return {
        "model": model_facts(path, interpreter),
        "settings": {"warmup": warmup, "runs": runs, "threads": threads, "xnnpack": xnnpack,
                     "input": "file:%s" % input_path if input_path else "random(seed=%d)" % seed},
        "kernels": kernels,
        "latency_ms": latency_summary(times),
        "invocations": warmup + runs,
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# What eval may return per sample instead of the raw output: named numpy reducers. The agent knows no
# task; the host names the reducer its task needs and scores the answers itself. "none" keeps every
# output whole (written to --outputs): a detector's mAP is computed by the host from them.
REDUCERS = {"argmax": lambda out: int(np.argmax(out.reshape(-1)))}
NO_REDUCER = "none"


def evaluate(path: str, samples_path: str, *, threads: int = 4, xnnpack: bool = True, reduce: str = "argmax",
             outputs_dir: str | None = None) -> dict:
    """Runs every sample of an .npz (``x``: (N, ...) float32 or the model's dtype, a structured array
    with one field per input name for a model with several; optional ``labels``: (N,) output indices,
    scored as top-1 with the argmax reducer) and returns each output reduced by ``reduce`` and a
    digest of the raw outputs. With ``outputs_dir``, every output of every sample is also written
    there, dequantized to float32, as ``output_K.npy`` (N, ...) in the exported model's order."""
    if reduce != NO_REDUCER and reduce not in REDUCERS:
        raise AgentError("usage", "unknown reducer %r (known: %s)" % (reduce, ", ".join(sorted(REDUCERS) + [NO_REDUCER])))
    if reduce == NO_REDUCER and not outputs_dir:
        raise AgentError("usage", "--reduce none keeps whole outputs: give --outputs DIR to write them to")
    x, labels = _eval_samples(samples_path)
    start = time.perf_counter()
    interpreter, kernels = _open(path, threads, xnnpack)
    inputs = _inputs_by_name(interpreter)
    outputs = _outputs_in_model_order(interpreter)
    if x.dtype.names is None and len(inputs) != 1:
        raise AgentError("bad_input", "the model has %d inputs (%s); 'x' must hold one field per input name"
                         % (len(inputs), ", ".join(inputs)))
    missing = sorted(set(inputs) - set(x.dtype.names or inputs))
    if missing:
        raise AgentError("bad_input", "%s: 'x' has no field for the model input %r" % (samples_path, missing[0]))
    writers = _output_writers(outputs_dir, outputs, len(x)) if outputs_dir else None
    digest = hashlib.sha256()
    reduced = []
    for i in range(len(x)):
        for name, detail in inputs.items():
            value = x[i] if x.dtype.names is None else x[name][i]
            interpreter.set_tensor(detail["index"], _fit(value, detail, "sample %d" % i))
        interpreter.invoke()
        out = interpreter.get_tensor(outputs[0]["index"])
        digest.update(np.ascontiguousarray(out).tobytes())
        if reduce != NO_REDUCER:
            reduced.append(REDUCERS[reduce](out))
        for writer, detail in zip(writers or (), outputs):
            writer[i] = _dequantized(interpreter.get_tensor(detail["index"]), detail).reshape(writer.shape[1:])
    for writer in writers or ():
        writer.flush()
    result = {
        "model": model_facts(path, interpreter),
        "samples": len(x),
        "reducer": reduce,
        "reduced": reduced,
        "kernels": kernels,
        "outputs_sha256": digest.hexdigest(),
        "wall_time_s": time.perf_counter() - start,
    }
    if writers:
        result["output_files"] = [{"file": os.path.join(outputs_dir, "output_%d.npy" % k), "shape": list(w.shape)}
                                  for k, w in enumerate(writers)]
    if labels is not None and reduce == "argmax":
        result["top1"] = float(np.mean(np.asarray(reduced) == labels.astype(np.int64)))
    return result


def _eval_samples(samples_path: str):
    try:
        with np.load(samples_path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise AgentError("bad_input", "%s: no array named 'x' (found %s)" % (samples_path, ", ".join(npz.files) or "none"))
            x = npz["x"]
            labels = npz["labels"] if "labels" in npz.files else None
    except (OSError, ValueError) as exc:
        raise AgentError("bad_input", "%s: not a readable .npz archive (%s)" % (samples_path, exc)) from None
    if x.ndim == 0 or len(x) == 0:
        raise AgentError("bad_input", "%s: 'x' holds no samples" % samples_path)
    if labels is not None and labels.shape != (len(x),):
        raise AgentError("bad_input", "%s: labels shape %s does not match %d samples" % (samples_path, labels.shape, len(x)))
    return x, labels


def _output_writers(folder: str, outputs: list, count: int) -> list:
    """One float32 .npy per output, (count, ...) without the batch axis of 1, written sample by
    sample (memory-mapped: a detector's outputs over many images need not fit in memory)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise AgentError("bad_input", "cannot create %s: %s" % (folder, exc)) from None
    writers = []
    for k, detail in enumerate(outputs):
        shape = [int(s) for s in detail["shape"]]
        per_sample = shape[1:] if shape[:1] == [1] else shape
        writers.append(np.lib.format.open_memmap(os.path.join(folder, "output_%d.npy" % k), mode="w+", dtype=np.float32,
                                                 shape=(count, *per_sample)))
    return writers


def _dequantized(value: np.ndarray, detail: dict) -> np.ndarray:
    if np.issubdtype(value.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        if scale:
            return (value.astype(np.float32) - zero_point) * np.float32(scale)
    return value.astype(np.float32)


def _inputs_by_name(interpreter) -> dict:
    """Input details under the exported model's input names (the converter's signature keeps the
    ONNX names), else under the interpreter's own names."""
    details = interpreter.get_input_details()
    signature = _signature(interpreter)
    if signature is not None:
        by_index = {d["index"]: d for d in details}
        if set(signature["inputs"].values()) == set(by_index):
            return {name: by_index[index] for name, index in signature["inputs"].items()}
    return {d["name"]: d for d in details}


def _outputs_in_model_order(interpreter) -> list:
    """Output details in the exported model's order: the signature's output_0, output_1, ... (the
    ONNX order), which the interpreter's own listing does not keep."""
    details = interpreter.get_output_details()
    signature = _signature(interpreter)
    if signature is None:
        return details
    by_index = {d["index"]: d for d in details}
    names = ["output_%d" % k for k in range(len(signature["outputs"]))]
    if set(signature["outputs"]) != set(names) or set(signature["outputs"].values()) != set(by_index):
        return details
    return [by_index[signature["outputs"][n]] for n in names]


def _signature(interpreter):
    """The model's one signature ({"inputs": name -> index, "outputs": ...}), or None."""
    full = getattr(interpreter, "_get_full_signature_list", None)
    signatures = full() if full is not None else {}
    return next(iter(signatures.values())) if len(signatures) == 1 else None


def profile(paths: list, *, warmup: int = 3, runs: int = 10, rounds: int = 3, threads: int = 4, xnnpack: bool = True,
            seed: int = 0) -> dict:
    """Latency of several models timed in alternating rounds in one process.

    The TFLite Python runtimes expose no per-op profiler, so per-layer costs are found by timing
    variants of one model (e.g. int8, float32, and int8 with chosen layers float) side by side: the
    differences are what those layers cost on this device, under the same conditions."""
    if not paths or warmup < 0 or runs < 1 or rounds < 1:
        raise AgentError("usage", "need at least one model, warmup >= 0, runs >= 1, rounds >= 1")
    rng = np.random.default_rng(seed)
    loaded = []
    for path in paths:
        interpreter, kernels = _open(path, threads, xnnpack)
        inputs = interpreter.get_input_details()
        data = [random_input(d, rng) for d in inputs]
        _prime(interpreter, inputs, data, warmup)
        loaded.append((path, interpreter, inputs, data, [], kernels))
    start = time.perf_counter()
    for _ in range(rounds):
        for _path, interpreter, inputs, data, times, _kernels in loaded:
            times.extend(_timed_runs(interpreter, inputs, data, runs))
    return {
        "settings": {"warmup": warmup, "runs": runs, "rounds": rounds, "threads": threads, "xnnpack": xnnpack},
        "models": [{"path": path, "sha256": sha256_file(path), "latency_ms": latency_summary(times), "kernels": kernels}
                   for path, _i, _in, _d, times, kernels in loaded],
        "wall_time_s": time.perf_counter() - start,
    }
