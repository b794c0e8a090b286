"""Latency-aware choice (layer costs measured on the target) vs the MAC-estimated choice (costs
priced from host latencies), at equal k float layers: accuracy, and latency on the target and on the
host, per-tensor EfficientNet-Lite0. With ``--budget R`` also a latency budget of R × full int8, met by
``tune`` timing its candidates on the host vs on the target: the float layers each keeps, and both
choices timed on the target side by side.

    .venv/bin/python bench/latency_aware.py [--target local-arm] [--ks 3,6,10] [--eval-num 200] [--budget 1.2]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _models import ASSETS, compile_shared  # noqa: E402
from rich.console import Console
from rich.table import Table

from quantune_edge.analyze.analysis import AnalysisOptions, analyze  # noqa: E402
from quantune_edge.common.console import captured_native_output  # noqa: E402
from quantune_edge.compile.artifacts import CompiledModel  # noqa: E402
from quantune_edge.deploy.targets import load_target  # noqa: E402
from quantune_edge.model.layers import float_units  # noqa: E402
from quantune_edge.model.runtime import TfliteRunner, paired_latency_ms  # noqa: E402
from quantune_edge.tune import selection  # noqa: E402
from quantune_edge.tune.costs import device_cost_model, profile_on_device  # noqa: E402
from quantune_edge.tune.tuning import MIXED_MODEL, Evaluator, TuneOptions, predicted_gain, tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="local-arm")
    parser.add_argument("--ks", default="3,6,10")
    parser.add_argument("--eval-num", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=None, help="also --max-latency-ratio R, timed on the host vs on the target")
    args = parser.parse_args()
    target = load_target(args.target)
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eff-pt"
        console.print("compile (per-tensor) and analyze ...")
        compile_shared("efficientnet-lite0", ASSETS / "imagenet-samples", out, 100, per_channel=False)
        analysis = analyze(out, ASSETS / "imagenet-samples", AnalysisOptions(num_samples=32))
        compiled = CompiledModel.open(out)
        qg, match = compiled.int8_graph, compiled.layer_match
        names = {l.index: l.name for l in match.layers}
        lg = selection.LayerGraph.build(qg, match.layers, float_units(match, qg))
        samples = compiled.load_samples(ASSETS / "imagenet-val", args.eval_num, 1, what="evaluation")
        inputs = compiled.tflite_inputs(samples)
        with captured_native_output(True):
            float_out = TfliteRunner(compiled.float_model, args.threads).run(inputs)
            host_float, host_int8 = paired_latency_ms(compiled.float_model, compiled.int8_model, inputs[0], args.threads)  # as tune prices
        host_cost = selection.CostModel.from_measurements(lg, host_int8, host_float)
        console.print(f"measuring layer costs on {target.name} ...")
        device_cost, record = device_cost_model(compiled, lg, names, target, Path(tmp), log=console.print)
        ev = Evaluator(compiled, names, inputs, [float_out], samples.labels, args.threads, Path(tmp), True)
        rows, models, gain = [], [], predicted_gain(analysis.to_dict())
        for k in (int(x) for x in args.ks.split(",")):
            order = analysis.sensitivity_order
            pair = []
            for cost in (host_cost, device_cost):
                chosen = selection.prefix_choices(order[:k], lg, cost, predicted_gain=gain)[k]
                result, path = ev.evaluate(chosen)
                with captured_native_output(True):
                    mixed, int8 = paired_latency_ms(path, compiled.int8_model, inputs[0], args.threads, runs=20)
                pair.append({"set": chosen, "acc": result["accuracy"], "qdq": result["quantize_ops"], "host": mixed / int8,
                             "path": path})
                models.append(path)
            rows.append((k, pair))
        budget_rows = []
        for where, source in (("host", None), (target.name, target)) if args.budget else ():
            start = time.perf_counter()
            report = tune(out, ASSETS / "imagenet-val", TuneOptions(max_latency_ratio=args.budget, num_eval=args.eval_num, threads=args.threads,
                                                                    latency_source=source, best_effort=True))
            path = Path(tmp) / f"budget_{where}.tflite"
            shutil.copy(out / MIXED_MODEL, path)
            models.append(path)
            budget_rows.append((where, report, path, time.perf_counter() - start))
        console.print(f"timing {len(models)} models + int8 on {target.name} in alternating rounds ...")
        p50s, _facts = profile_on_device(target, [compiled.int8_model, *models], runs=3, rounds=3)
        device_int8, device = p50s[0], dict(zip(models, p50s[1:]))
    m = record["cost_model"]
    table = Table(title=f"latency-aware (costs measured on {target.name}{', emulated' if target.emulated else ''}) vs "
                        f"MAC-estimated choice; per-tensor EfficientNet-Lite0, top-1 on {args.eval_num} imagenet-val")
    for col in ("k", "choice", "float layers", "Q/DQ", "top-1 %", f"{target.name} vs int8", "host vs int8"):
        table.add_column(col, justify="right")
    for k, pair in rows:
        for label, p in zip(("MAC-estimated (host)", f"latency-aware ({target.name})"), pair):
            table.add_row(str(k), label, str(len(p["set"])), str(p["qdq"]), f"{100 * p['acc']:.1f}",
                          f"{device[p['path']] / device_int8:.2f}x", f"{p['host']:.2f}x")
    console.print(table)
    if budget_rows:
        table = Table(title=f"latency budget {args.budget}x full int8 (tune --max-latency-ratio), timed on the host vs on {target.name}")
        for col in ("timed on", "float layers", "Q/DQ", "top-1 %", "host vs int8", f"{target.name} vs int8", "evaluations", "tune s"):
            table.add_column(col, justify="right")
        for where, report, path, seconds in budget_rows:
            c = report.chosen
            table.add_row(where, str(len(c["float_layers"])), str(c["quantize_ops"]), f"{100 * c['accuracy']:.1f}", f"{c['latency_ratio']:.2f}x",
                          f"{device[path] / device_int8:.2f}x", str(report.search["evaluations"]), f"{seconds:.0f}")
        console.print(table)
    console.print(f"{target.name} cost model: int8 {m['int8_ms_per_mac'] * 1e6:.3f} ms/MMAC, float {m['float_ms_per_mac'] * 1e6:.3f} ms/MMAC, "
                  f"conversion {m['boundary_ms_per_element'] * 1e3:.3f} ms per 1000 elements (measured p50: {record['measured_p50_ms']}); "
                  f"host: int8 {host_cost.int8_ms_per_mac * 1e6:.4f}, float {host_cost.float_ms_per_mac * 1e6:.4f} ms/MMAC, "
                  f"conversion {host_cost.boundary_ms_per_element * 1e3:.4f} ms per 1000 (a 20x-int8-MAC guess)")


if __name__ == "__main__":
    main()
