"""Running .tflite models on the host with the LiteRT interpreter (XNNPACK, fixed threads)."""
from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

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


class TfliteRunner:
    """One interpreter on one model; quantizes inputs and dequantizes outputs of int8-I/O models,
    so callers always pass and get float32.

    ``logits=True`` returns the input of a final SOFTMAX instead of its output: softmax saturates, so
    the SQNR of probabilities swings with a few confident samples and can fall while every tensor
    before it improves; logits are where output error is comparable between models.
    """

    def __init__(self, path: str | Path, num_threads: int = 2, preserve_all_tensors: bool = False, logits: bool = False) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from quantune_edge.model import tflite_graph

        self.path = Path(path)
        self.threads = num_threads
        self.logits_tensor = softmax_input(tflite_graph.read(self.path)) if logits else None
        preserve_all_tensors = preserve_all_tensors or self.logits_tensor is not None
        try:
            self.interpreter = Interpreter(
                model_path=str(self.path),
                num_threads=num_threads,
                experimental_preserve_all_tensors=preserve_all_tensors,
            )
            self.interpreter.allocate_tensors()
        except ValueError as exc:
            raise InputError(f"{self.path}: the TFLite runtime cannot load this model ({str(exc).splitlines()[0]})") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.invocations = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.input["shape"])

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """Run one sample (batch of 1, float32, the model's input layout); returns float32 output."""
        scale, zp = self.input["quantization"]
        if self.input["dtype"] != np.float32:
            x = quantize(x, scale, zp, self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"], copy=False))
        self.interpreter.invoke()
        self.invocations += 1
        if self.logits_tensor is not None:
            return self.tensor(self.logits_tensor)
        out = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] != np.float32:
            scale, zp = self.output["quantization"]
            return dequantize(out, scale, zp)
        return out.copy()

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
        return np.concatenate(outputs, axis=0)


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
