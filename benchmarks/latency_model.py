"""How well tune's latency model predicts mixed models: priced per MAC vs per op (each layer's op timed
alone, scaled to the whole int8 and float32 models), against paired host measurements.

For each compile folder (with its analysis): the float sets the analysis order gives at several k
(closed over scale-tied chains and requantized tails, not grown, so both models price the same sets),
an element-wise probe (every zero-MAC layer float), a MAC probe (every weighted layer float) and all
float. Each is spliced, timed paired with full int8 (median ratio of three measurements, 2 threads),
and estimated by both models. The table shows measured and estimated ratios to full int8, and the
mean absolute error per model.

    .venv/bin/python benchmarks/latency_model.py FOLDER [FOLDER ...] [--ks 1,2,4,8,16,32] [--threads 2]

A folder is what `quantune-edge compile` + `quantune-edge analyze` write (docs/detect.md has the
detectors' commands).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _models import REPO  # noqa: F401  (puts the repository on the path)
from rich.console import Console
from rich.table import Table

from quantune_edge.common.console import captured_native_output
from quantune_edge.compile.artifacts import ANALYSIS_JSON, CompiledModel
from quantune_edge.model.layers import float_units, requantizations
from quantune_edge.model.runtime import median_ratio, paired_latency_ms
from quantune_edge.tune import selection
from quantune_edge.tune.costs import host_latencies


def candidate_sets(lg: selection.LayerGraph, order: list[int], ks: list[int]) -> dict[str, frozenset[int]]:
    sets = {f"k={k}": lg.closed(order[:k]) for k in ks if k <= len(order)}
    sets["element-wise probe"] = lg.closed(i for i in lg.layers if lg.macs[i] == 0)
    sets["MAC probe"] = frozenset(i for i in lg.layers if lg.macs[i] > 0)
    sets["all float"] = frozenset(lg.layers)
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    console = Console(width=160)
    summary = Table(title="mean absolute error of the estimated latency ratio")
    for column in ("model", "sets", "per MAC", "per op"):
        summary.add_column(column, justify="right" if column != "model" else "left")
    for folder in args.folders:
        compiled = CompiledModel.open(folder)
        order = json.loads((folder / ANALYSIS_JSON).read_text())["sensitivity_order"]
        qg, match = compiled.int8_graph, compiled.layer_match
        names = {layer.index: layer.name for layer in match.layers}
        lg = selection.LayerGraph.build(qg, match.layers, float_units(match, qg), requantizations(match, qg))
        sample = compiled.tflite_inputs(compiled.load_samples(compiled.report.calibration["source"], 1, what="timing"))[0]
        host = host_latencies(compiled, sample, args.threads, remeasure=True)  # the totals of this run, beside the mixed models
        per_mac = selection.CostModel.from_measurements(lg, host["int8_ms"], host["float32_ms"])
        per_op = selection.CostModel.from_measurements(lg, host["int8_ms"], host["float32_ms"], selection.AloneTimes.from_dict(host["alone_ms"]))
        table = Table(title=f"{folder.name}: {len(lg.layers)} layers, int8 {host['int8_ms']:.1f} ms, float32 {host['float32_ms']:.1f} ms (host, {args.threads} threads)")
        for column in ("float set", "layers", "measured", "per MAC", "per op"):
            table.add_column(column, justify="right" if column != "float set" else "left")
        errors: dict[str, list[float]] = {"mac": [], "op": []}
        base_mac, base_op = per_mac.latency_ms(lg, ()), per_op.latency_ms(lg, ())
        with tempfile.TemporaryDirectory() as tmp:
            for label, fs in candidate_sets(lg, order, ks).items():
                path = Path(tmp) / "mixed.tflite"
                with captured_native_output(True):
                    path.write_bytes(compiled.mixed([names[i] for i in sorted(fs)]))
                    pairs = [paired_latency_ms(path, compiled.int8_model, sample, args.threads, rounds=5, runs=6) for _ in range(3)]
                mixed_ms, int8_ms = median_ratio(pairs)
                measured = mixed_ms / int8_ms
                mac, op = per_mac.latency_ms(lg, fs) / base_mac, per_op.latency_ms(lg, fs) / base_op
                errors["mac"].append(abs(mac - measured))
                errors["op"].append(abs(op - measured))
                table.add_row(label, str(len(fs)), f"{measured:.3f}", f"{mac:.3f}", f"{op:.3f}")
        console.print(table)
        summary.add_row(folder.name, str(len(errors["op"])), f"{np.mean(errors['mac']):.3f}", f"{np.mean(errors['op']):.3f}")
    console.print(summary)


if __name__ == "__main__":
    main()
