"""Latency costs measured on a target (or on the host), for latency-aware tuning.

The TFLite Python runtimes have no per-op profiler, so the agent's ``profile`` times three variants
of the model side by side on the device: full int8, float32, and int8 with a probe set of cheap,
non-adjacent layers float (few MACs, many QUANTIZE/DEQUANTIZE). From those three the cost model's
per-MAC int8 cost, per-MAC float cost and per-converted-element cost are solved for that device.
The result is kept as ``device_costs_<target>.json`` beside the models and reused while the models
and the target stay the same. The host's float32 and int8 latencies, which price layers by default,
are kept the same way (``host_latency.json``).
"""
from __future__ import annotations

import json
import os
import platform
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantune_edge.common.console import captured_native_output
from quantune_edge.common.records import now_iso, sha256_file, write_json
from quantune_edge.compile.artifacts import HOST_LATENCY_JSON, CompiledModel, device_costs_file
from quantune_edge.deploy.device import Device, open_device
from quantune_edge.deploy.targets import Target
from quantune_edge.deploy.transport import resolve
from quantune_edge.model.layers import requantizations
from quantune_edge.model.op_models import single_op_models
from quantune_edge.model.runtime import TfliteRunner, alone_latency_ms, median_ratio, paired_latency_ms
from quantune_edge.tune.selection import AloneTimes, CostModel, LayerGraph, boundary_probe

HOST_MEASUREMENTS = 3  # paired float32/int8 measurements; the one with the median ratio is kept


# A timer's own copies live minutes (a sweep under emulation: ten); one untouched for a day was left
# by a tune killed outright (SIGKILL, power loss), whose close never ran.
STALE_TIMING_S = 24 * 3600
TIMING_PREFIX = "timing-"  # the names of a timer's own copies: timing-<random>-<content name>


class DeviceTimer:
    """Models timed side by side on one target over one SSH connection, opened at the first timing
    (a tune that never times on the device never connects).

    A model already deployed by content is timed where it is and left alone. Any other is uploaded
    under a name of this timer's own and removed again when it closes, so timing tune's candidates
    leaves the device's models folder as it was, and a `bench` or another tune deploying the same
    bytes meanwhile never gets a file that this timer then removes.
    """

    def __init__(self, target: Target, *, runs: int = 5, rounds: int = 3, warmup: int = 1,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.target, self.runs, self.rounds, self.warmup, self.log = target, runs, rounds, warmup, log
        self.device: Device | None = None
        self.facts: dict = {}
        self._remote: dict[Path, str] = {}
        self._uploaded: list[str] = []
        self._tag = f"{TIMING_PREFIX}{secrets.token_hex(4)}"

    def _deployed(self, model: Path) -> str:
        if self.device is None:
            self.device = open_device(self.target, log=self.log)
            left = self.device.remove_stale(lambda f: f.startswith(TIMING_PREFIX), STALE_TIMING_S)
            if left:
                self.log(f"{self.target.name}: removed {len(left)} timing cop{'y' if len(left) == 1 else 'ies'} a killed tune left ({', '.join(left[:3])}"
                         f"{', …' if len(left) > 3 else ''})")
        if model not in self._remote:
            name, shared = self.device.deployed_by_content(model)
            if shared is None:
                shared = self.device.deploy(model, f"{self._tag}-{name}").remote_path
                self._uploaded.append(shared)
            self._remote[model] = shared
        return self._remote[model]

    def p50_ms(self, models: list[Path]) -> list[float]:
        """p50 latency (ms) of each model, timed in alternating rounds."""
        remote = [self._deployed(Path(m)) for m in models]
        result = self.device.agent(["profile", *remote, "--runs", str(self.runs), "--rounds", str(self.rounds),
                                    "--warmup", str(self.warmup), "--threads", str(self.target.threads)])
        self.facts = {"device": result["device"], "runtime": result["runtime"]}
        return [m["latency_ms"]["p50"] for m in result["models"]]

    def p50_by_model(self, models: list[Path]) -> dict[Path, float]:
        """:meth:`p50_ms` keyed by model, each distinct file timed once."""
        distinct = list(dict.fromkeys(models))
        return dict(zip(distinct, self.p50_ms(distinct)))

    def close(self) -> None:
        if self.device is None:
            return
        try:
            for remote in self._uploaded:
                self.device.remove_model(remote)
        finally:
            self.device.conn.close()

    def __enter__(self) -> DeviceTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def profile_on_device(target: Target, models: list[Path], *, runs: int = 5, rounds: int = 3, warmup: int = 1,
                      log: Callable[[str], None] = lambda _m: None) -> tuple[list[float], dict]:
    """p50 latency (ms) of each model on the target, timed in alternating rounds; and the device facts."""
    with DeviceTimer(target, runs=runs, rounds=rounds, warmup=warmup, log=log) as timer:
        return timer.p50_ms(models), timer.facts


def device_cost_model(compiled: CompiledModel, lg: LayerGraph, names: dict[int, str], target: Target, work: Path, *,
                      quiet: bool = True, log: Callable[[str], None] = lambda _m: None) -> tuple[CostModel, dict]:
    """The cost model measured on ``target`` (cached per target and int8 model)."""
    cache = compiled.folder / device_costs_file(target.name)
    int8_sha = sha256_file(compiled.int8_model)
    address = resolve(target).address
    try:
        saved = json.loads(cache.read_text())
        if saved["int8_sha256"] == int8_sha and saved["target"]["address"] == address:
            return CostModel.from_record(saved["cost_model"]), saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = boundary_probe(lg)
    probe_path = work / "probe.tflite"
    with captured_native_output(quiet):
        probe_path.write_bytes(compiled.mixed([names[i] for i in sorted(probe)]))
    log(f"measuring layer costs on {target.name} (int8, float32 and a {len(probe)}-layer float probe)")
    (int8_ms, float_ms, probe_ms), facts = profile_on_device(target, [compiled.int8_model, compiled.float_model, probe_path], log=log)
    cost = CostModel.fit(lg, int8_ms, float_ms, probe, probe_ms)
    record = {"kind": "quantune-edge/device-costs", "created": now_iso(), "int8_sha256": int8_sha,
              "target": {"name": target.name, "address": address, "emulated": target.emulated},
              "measured_p50_ms": {"int8": int8_ms, "float32": float_ms, "probe": probe_ms}, "probe_layers": sorted(probe),
              "cost_model": cost.record(), **facts}
    write_json(cache, record)
    return cost, record


def host_latencies(compiled: CompiledModel, sample: np.ndarray, threads: int, runs: int = 50, *, remeasure: bool = False,
                   quiet: bool = True) -> dict:
    """p50 host latency (ms) of the compile's float32 and full-int8 models, and every layer's op timed
    alone (``alone_ms``, :func:`alone_times`), measured once per models, machine and thread count and
    kept in the folder.

    They price every layer when tune grows float regions, so a new measurement can change the
    choice: four tune calls on one MobileNetV2 compile here measured the float32/int8 ratio at
    1.47-1.94x and kept the stem conv float in three of them. Kept, the same command makes the same
    choice; the one measurement is the median-ratio one of three, each in alternating rounds.
    """
    cache = compiled.folder / HOST_LATENCY_JSON
    key = {"float32_sha256": sha256_file(compiled.float_model), "int8_sha256": sha256_file(compiled.int8_model),
           "threads": threads, "machine": {"node": platform.node(), "arch": platform.machine(), "cpus": os.cpu_count()}}
    saved: dict | None = None
    if not remeasure:
        try:
            saved = json.loads(cache.read_text())
            if {k: saved[k] for k in key} != key:
                saved = None
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
    if saved is not None and "alone_ms" in saved:
        return {**saved, "reused": True}
    if saved is None:
        with captured_native_output(quiet):
            pairs = [paired_latency_ms(compiled.float_model, compiled.int8_model, sample, threads, rounds=5, runs=max(1, runs // 5))
                     for _ in range(HOST_MEASUREMENTS)]
        float_ms, int8_ms = median_ratio(pairs)
        saved = {"kind": "quantune-edge/host-latency", "created": now_iso(), **key, "float32_ms": float_ms, "int8_ms": int8_ms,
                 "ratios": [round(f / i, 3) for f, i in pairs]}
        reused = False
    else:  # kept from before ops were timed alone: the two latencies stay, the ops are added
        reused = True
    with captured_native_output(quiet):
        record = {**saved, "alone_ms": alone_times(compiled, threads).to_dict()}
    write_json(cache, record)
    return {**record, "reused": reused}


def alone_times(compiled: CompiledModel, threads: int) -> AloneTimes:
    """Every layer's int8 and float op, every requantize op and the int8 model's own input/output
    conversions, each timed alone on this host (``model.op_models``), on the kernels each whole model
    runs on. About 2 s for YOLOv5n's 263 layers."""
    match, graph = compiled.layer_match, compiled.int8_graph
    requantize_ops = [r.op for r in requantizations(match, graph)]
    conversions = [op.index for op in graph.ops if op.type in ("QUANTIZE", "DEQUANTIZE") and op.index not in requantize_ops]
    int8_ops = [layer.int8_op for layer in match.layers]
    int8_models = single_op_models(compiled.int8_model.read_bytes(), [*int8_ops, *requantize_ops, *conversions])
    float_models = single_op_models(compiled.float_model.read_bytes(), [layer.float_op for layer in match.layers])
    int8_ms = alone_latency_ms(int8_models, threads, xnnpack=TfliteRunner(compiled.int8_model, threads).xnnpack_failure is None)
    float_ms = alone_latency_ms(float_models, threads, xnnpack=TfliteRunner(compiled.float_model, threads).xnnpack_failure is None)
    converted = [(int8_ms[k], int(np.prod(graph.tensors[graph.ops[k].outputs[0]].shape))) for k in conversions]
    converted = [(ms, n) for ms, n in converted if ms is not None]
    per_element = sum(ms for ms, _ in converted) / sum(n for _, n in converted) if converted else None
    return AloneTimes({layer.index: int8_ms[layer.int8_op] for layer in match.layers},
                      {layer.index: float_ms[layer.float_op] for layer in match.layers},
                      {k: int8_ms[k] for k in requantize_ops}, per_element)
