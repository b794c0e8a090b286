"""Running .tflite models on the host with the LiteRT interpreter (XNNPACK, fixed threads)."""
from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

from quantune_edge.common.inputs import fields
from quantune_edge.errors import InputError


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    x = q.astype(np.float32)
    x -= zero_point
    x *= np.float32(scale)
    return x


def softmax_input(graph) -> int | None:
    """The tensor a model's final SOFTMAX reads (through a DEQUANTIZE hand-over), or None."""
    op = graph.producer(graph.outputs[0])
    if op is not None and op.type == "DEQUANTIZE":
        op = graph.producer(op.inputs[0])
    return op.inputs[0] if op is not None and op.type == "SOFTMAX" else None


def load_interpreter(*, xnnpack: bool = True, num_threads: int = 2, **source):
    """A LiteRT interpreter with its tensors allocated, on XNNPACK (the runtime's default delegate) or on
    the builtin kernels alone. ``source``: ``model_path=`` or ``model_content=``, and any other option."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kwargs = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    interpreter = Interpreter(num_threads=num_threads, **source, **kwargs)
    interpreter.allocate_tensors()
    return interpreter


class TfliteRunner:
    """One interpreter on one model; quantizes inputs and dequantizes outputs of int8-I/O models,
    so callers always pass and get float32.

    ``logits=True`` returns the input of a final SOFTMAX instead of its output: softmax saturates, so
    the SQNR of probabilities swings with a few confident samples and can fall while every tensor
    before it improves; logits are where output error is comparable between models.
    """

    def __init__(self, path: str | Path, num_threads: int = 2, preserve_all_tensors: bool = False, logits: bool = False) -> None:
        from quantune_edge.model import tflite_graph

        self.path = Path(path)
        self.threads = num_threads
        self.logits_tensor = softmax_input(tflite_graph.read(self.path)) if logits else None
        preserve_all_tensors = preserve_all_tensors or self.logits_tensor is not None
        self.xnnpack_failure: str | None = None  # why XNNPACK could not take the model, when it could not
        try:
            self.interpreter = self._load(num_threads, preserve_all_tensors, xnnpack=True)
        except RuntimeError as exc:
            # XNNPACK refuses some graphs at prepare time (NanoDet-m's int8 model: "Node number 295
            # (TfLiteXNNPackDelegate) failed to prepare"); the builtin kernels still run them.
            self.xnnpack_failure = _first_line(exc)
            try:
                self.interpreter = self._load(num_threads, preserve_all_tensors, xnnpack=False)
            except (ValueError, RuntimeError) as again:
                raise InputError(f"{self.path}: the TFLite runtime cannot load this model ({_first_line(again)})") from None
        except ValueError as exc:
            raise InputError(f"{self.path}: the TFLite runtime cannot load this model ({_first_line(exc)})") from None
        self.inputs = _inputs_by_name(self.interpreter)
        self.input = next(iter(self.inputs.values()))
        self.outputs = _outputs_in_model_order(self.interpreter)
        self.output = self.outputs[0]
        self.invocations = 0

    def _load(self, num_threads: int, preserve_all_tensors: bool, xnnpack: bool):
        return load_interpreter(xnnpack=xnnpack, num_threads=num_threads, model_path=str(self.path),
                                experimental_preserve_all_tensors=preserve_all_tensors)

    @property
    def kernels(self) -> str:
        """What runs the model: "xnnpack", or "builtin" with the reason XNNPACK failed."""
        return "xnnpack" if self.xnnpack_failure is None else f"builtin (XNNPACK failed: {self.xnnpack_failure})"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.input["shape"])

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one sample (batch of 1, the model's input layout; a structured array for a model
        with several inputs, see :mod:`quantune_edge.common.inputs`); returns the float32 output."""
        for name, value in fields(x, list(self.inputs)).items():
            detail = self.inputs.get(name)
            if detail is None:
                raise InputError(f"{self.path}: the model has no input {name!r} (inputs: {', '.join(self.inputs)})")
            if detail["dtype"] != value.dtype and value.dtype == np.float32:  # an int8-I/O model takes quantized values
                value = quantize(value, *detail["quantization"], detail["dtype"])
            self.interpreter.set_tensor(detail["index"], value.astype(detail["dtype"], copy=False))
        self.interpreter.invoke()
        self.invocations += 1
        if self.logits_tensor is not None:
            return self.tensor(self.logits_tensor)
        return self._output(self.output)

    def _output(self, detail: dict) -> np.ndarray:
        out = self.interpreter.get_tensor(detail["index"])
        if detail["dtype"] != np.float32:
            scale, zp = detail["quantization"]
            return dequantize(out, scale, zp)
        return out.copy()

    def invoke_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one sample; every output, float32, in the ONNX model's output order."""
        self.invoke(x)
        return self.last_outputs()

    def last_outputs(self) -> list[np.ndarray]:
        """Every output of the last invocation, float32, in the ONNX model's output order."""
        return [self._output(d) for d in self.outputs]

    def run_all(self, samples: np.ndarray, on_item: Callable[[], None] | None = None) -> list[np.ndarray]:
        """Every output of every sample, each stacked over the samples (:func:`stack_samples`)."""
        per_sample = []
        for x in samples:
            per_sample.append(self.invoke_all(x[None]))
            if on_item:
                on_item()
        return [stack_samples([outs[k] for outs in per_sample]) for k in range(len(self.outputs))]

    def tensor(self, index: int) -> np.ndarray:
        """Any tensor of the last invocation as a float32 array of its own (int8/uint8/int16
        dequantized with its own scale); intermediate tensors need ``preserve_all_tensors``."""
        raw = self.interpreter.tensor(index)()
        if raw.dtype in (np.int8, np.uint8, np.int16):
            scale, zp = self._quantization[index]
            if scale:
                return dequantize(raw, scale, zp)
        return raw.astype(np.float32)

    def view(self, index: int) -> np.ndarray:
        """:meth:`tensor` without the copy of a float32 tensor: a read-only view of the interpreter's
        buffer, for reading it once. No reference may outlive the call that reads it: the
        interpreter refuses to invoke while one exists."""
        raw = self.interpreter.tensor(index)()
        if raw.dtype != np.float32:
            return self.tensor(index)
        raw.flags.writeable = False
        return raw

    @cached_property
    def _quantization(self) -> dict[int, tuple[float, int]]:
        """(scale, zero point) of every tensor, read once: the interpreter lists them all per call."""
        return {d["index"]: d["quantization"] for d in self.interpreter.get_tensor_details()}

    def run(self, samples: np.ndarray, on_item: Callable[[], None] | None = None) -> np.ndarray:
        """Run every sample of (N, ...) one at a time (the models have batch 1); stacks outputs."""
        outputs = []
        for x in samples:
            outputs.append(self.invoke(x[None]))
            if on_item:
                on_item()
        return stack_samples(outputs)


def stack_samples(outputs: list[np.ndarray]) -> np.ndarray:
    """One output of many single-sample runs as one array: joined on a leading batch axis of 1,
    stacked on a new first axis when the output has none (NanoDet-m's [1600, 80])."""
    if all(o.ndim and o.shape[0] == 1 for o in outputs):
        return np.concatenate(outputs, axis=0)
    return np.stack(outputs)


def stacked_shape(count: int, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`stack_samples` gives ``count`` outputs of one sample's ``sample_shape``."""
    return (count, *sample_shape[1:]) if sample_shape and sample_shape[0] == 1 else (count, *sample_shape)


def sample_of(stacked: np.ndarray, i: int, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Sample ``i`` of a :func:`stack_samples` array, shaped as one run returned it."""
    return stacked[i:i + 1] if sample_shape and sample_shape[0] == 1 else stacked[i]


def per_sample(names: list[str], stacked: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    """Outputs stacked over samples (:func:`stack_samples`) as one dict per sample: each output under
    its name, shaped as one run returned it (``shapes``: one sample's shape per output)."""
    count = len(stacked[0]) if stacked else 0
    return [{name: sample_of(v, i, shape) for name, v, shape in zip(names, stacked, shapes)} for i in range(count)]


def _inputs_by_name(interpreter) -> dict[str, dict]:
    """The input details under the exported model's input names, in its order. onnx2tf's signature
    keeps the ONNX input names; without a signature (one input), the interpreter's own name."""
    details = interpreter.get_input_details()
    by_index = {d["index"]: d for d in details}
    signature = _signature(interpreter)
    if signature is not None and set(signature["inputs"].values()) == set(by_index):
        return {name: by_index[index] for name, index in signature["inputs"].items()}
    return {d["name"]: d for d in details}


def _outputs_in_model_order(interpreter) -> list[dict]:
    """The output details in the exported model's order. onnx2tf's signature names them output_0,
    output_1, ... in the ONNX model's order, while the interpreter lists them in its own order
    (NanoDet-m: reg_s16 first); without such a signature, the interpreter's order."""
    details = interpreter.get_output_details()
    by_index = {d["index"]: d for d in details}
    signature = _signature(interpreter)
    if signature is None:
        return details
    outputs = signature["outputs"]
    names = [f"output_{k}" for k in range(len(outputs))]
    if set(outputs) != set(names) or {outputs[n] for n in names} != set(by_index):
        return details
    return [by_index[outputs[n]] for n in names]


def _signature(interpreter) -> dict | None:
    """The model's one signature ({"inputs": name -> tensor index, "outputs": ...}), or None. The
    public get_signature_list() omits the tensor indices."""
    signatures = interpreter._get_full_signature_list()
    return next(iter(signatures.values())) if len(signatures) == 1 else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def median_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Of several paired (model, reference) latency measurements, the one whose ratio is the median:
    one machine hiccup moves a single pair's ratio by up to 0.2 here."""
    return sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]


def paired_latency_ms(path: str | Path, reference: str | Path, sample: np.ndarray, threads: int = 2, rounds: int = 5,
                      runs: int = 10, warmup: int = 5) -> tuple[float, float]:
    """p50 latency of a model and of a reference model, timed in alternating rounds.

    Two separate measurements on a shared or frequency-scaling CPU can differ by tens of percent
    for the same model; alternating rounds expose both models to the same conditions, so the
    ratio of the two medians is what to compare (e.g. mixed vs full int8)."""
    import time

    runners = (TfliteRunner(path, threads), TfliteRunner(reference, threads))
    x = sample[None]
    for runner in runners:
        for _ in range(warmup):
            runner.invoke(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for runner, bucket in zip(runners, times):
            for _ in range(runs):
                start = time.perf_counter()
                runner.invoke(x)
                bucket.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[0])), float(np.median(times[1]))


def alone_latency_ms(models: dict[int, bytes], threads: int = 2, xnnpack: bool = True, runs: int = 30,
                     warmup: int = 3) -> dict[int, float | None]:
    """p50 latency (ms) of each small model (``model.op_models``' single ops) on zero inputs; None for
    one the runtime cannot load or run alone. ``xnnpack``: the kernels the whole model runs on."""
    import time

    out: dict[int, float | None] = {}
    for key, content in models.items():
        try:
            interpreter = load_interpreter(xnnpack=xnnpack, num_threads=threads, model_content=content)
            for detail in interpreter.get_input_details():
                interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
            for _ in range(warmup):
                interpreter.invoke()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                interpreter.invoke()
                times.append(time.perf_counter() - start)
        except (ValueError, RuntimeError):
            out[key] = None
            continue
        out[key] = 1e3 * float(np.median(times))
    return out
