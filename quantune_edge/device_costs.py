"""Latency costs measured on a target, for latency-aware tuning.

The TFLite Python runtimes have no per-op profiler, so the agent's ``profile`` times three variants
of the model side by side on the device: full int8, float32, and int8 with a probe set of cheap,
non-adjacent layers float (few MACs, many QUANTIZE/DEQUANTIZE). From those three the cost model's
per-MAC int8 cost, per-MAC float cost and per-converted-element cost are solved for that device.
The result is kept as ``device_costs_<target>.json`` beside the models and reused while the models
and the target stay the same.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .artifacts import CompiledModel
from .console import captured_native_output
from .deploy import open_device
from .reports import now_iso, sha256_file, write_json
from .selection import CostModel, LayerGraph, boundary_probe
from .targets import Target


def profile_on_device(target: Target, models: list[Path], *, runs: int = 5, rounds: int = 3, warmup: int = 1,
                      log: Callable[[str], None] = lambda _m: None) -> tuple[list[float], dict]:
    """p50 latency (ms) of each model on the target, timed in alternating rounds; and the device facts."""
    device = open_device(target, log=log)
    try:
        remote = [device.deploy(m, by_content=True).remote_path for m in models]
        result = device.agent(["profile", *remote, "--runs", str(runs), "--rounds", str(rounds), "--warmup", str(warmup),
                               "--threads", str(target.threads)])
    finally:
        device.conn.close()
    return [m["latency_ms"]["p50"] for m in result["models"]], {"device": result["device"], "runtime": result["runtime"]}


def device_cost_model(compiled: CompiledModel, lg: LayerGraph, names: dict[int, str], target: Target, work: Path, *,
                      quiet: bool = True, log: Callable[[str], None] = lambda _m: None) -> tuple[CostModel, dict]:
    """The cost model measured on ``target`` (cached per target and int8 model)."""
    cache = compiled.folder / f"device_costs_{target.name}.json"
    int8_sha = sha256_file(compiled.int8_model)
    address = target.resolved().address
    try:
        saved = json.loads(cache.read_text())
        if saved["int8_sha256"] == int8_sha and saved["target"]["address"] == address:
            return CostModel(**saved["cost_model"]), saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = boundary_probe(lg)
    probe_path = work / "probe.tflite"
    with captured_native_output(quiet):
        probe_path.write_bytes(compiled.requantize([names[i] for i in sorted(probe)]))
    log(f"measuring layer costs on {target.name} (int8, float32 and a {len(probe)}-layer float probe)")
    (int8_ms, float_ms, probe_ms), facts = profile_on_device(target, [compiled.int8_model, compiled.float_model, probe_path], log=log)
    cost = CostModel.fit(lg, int8_ms, float_ms, probe, probe_ms)
    record = {"kind": "quantune-edge/device-costs", "created": now_iso(), "int8_sha256": int8_sha,
              "target": {"name": target.name, "address": address, "emulated": target.emulated},
              "measured_p50_ms": {"int8": int8_ms, "float32": float_ms, "probe": probe_ms}, "probe_layers": sorted(probe),
              "cost_model": asdict(cost), **facts}
    write_json(cache, record)
    return cost, record
