"""Mixed precision on a shared model (default EfficientNet-Lite0) vs the alternatives a user has, at equal k.

Per weight scheme (per-channel, per-tensor): float32, full int8, ours (`tune --max-drop`), the TFLite
QuantizationDebugger heuristic (deny the top-k layers by RMSE/scale), random choice (mean of 5
seeds) and the naive sensitivity prefix without fusion-aware regions, at equal k and (searched like
ours) at the same accuracy budget, where the closing lines compare their latency. Ours is `tune`'s default
(re-ranked: each of the first picks from a fresh analysis of the mixed model so far); beside it
`tune --rerank 0`, which takes the analysis order as it is. Columns:
top-1, drop vs float, share of the int8→float gap recovered, host latency ratio to full int8, Q/DQ ops,
evaluations, logit SQNR vs float32. At equal k, ours grows its k picks into fusion-aware regions, so it
may keep more layers float (shown); and ours and the debugger's choice are compared image by image:
the images only one of them gets right, and the exact McNemar p-value of that split (a lead of a few
images out of hundreds is often chance).

    .venv/bin/python bench/mixed_precision.py [--model efficientnet-lite0] [--eval-num 650] [--max-drop 1.0]
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from _models import MODELS, add_data_args, compile_shared  # noqa: E402
from rich.console import Console
from rich.table import Table

from quantune_edge.analyze.analysis import AnalysisOptions, analyze  # noqa: E402
from quantune_edge.common.console import captured_native_output  # noqa: E402
from quantune_edge.common.metrics import paired_top1, top1_accuracy  # noqa: E402
from quantune_edge.compile.artifacts import CompiledModel  # noqa: E402
from quantune_edge.model.layers import tensor_key  # noqa: E402
from quantune_edge.model.runtime import TfliteRunner, paired_latency_ms  # noqa: E402
from quantune_edge.tune.tuning import MIXED_MODEL, Evaluator, TuneOptions, TuneReport, tune  # noqa: E402


def debugger_ranking(compiled: CompiledModel, calib: np.ndarray, names: dict[int, str]) -> list[int]:
    """TF's QuantizationDebugger layer statistics, ranked by RMSE/scale (TF's selective-quantization tutorial)."""
    import tensorflow as tf

    def data():
        for x in calib:
            yield [x[None]]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(compiled.folder / "saved_model"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = data
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not compiled.per_channel:
        converter._experimental_disable_per_channel = True
    with captured_native_output(True):
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=data)
        debugger.run()
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as fh:
        debugger.layer_statistics_dump(fh)
        fh.flush()
        fh.seek(0)
        rows = list(csv.DictReader(fh))
    by_key = {tensor_key(n): i for i, n in names.items()}
    scored = []
    for row in rows:
        idx = by_key.get(tensor_key(row["tensor_name"]))
        scale = float(row["scale"] or 0)
        if idx is not None and scale > 0:
            scored.append((np.sqrt(float(row["mean_squared_error"])) / scale, idx))
    return [i for _, i in sorted(scored, reverse=True)]


def differ(a: TuneReport, b: TuneReport) -> str:
    """How two choices' float sets differ: equal sets make the same model, whose latencies differ only by noise."""
    diff = len(set(a.chosen["float_layers"]) ^ set(b.chosen["float_layers"]))
    return f"the float sets differ in {diff} layers" if diff else "the same float set"


def slower(a: TuneReport, b: TuneReport) -> str:
    """How much slower (or faster) a is than b, from their latency ratios to full int8, in percent."""
    pct = 100 * (a.chosen["latency_ratio"] / b.chosen["latency_ratio"] - 1)
    return f"{abs(pct):.0f} % {'slower' if pct >= 0 else 'faster'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser, eval_num=650)
    parser.add_argument("--model", default="efficientnet-lite0", choices=sorted(MODELS))
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="per-channel,per-tensor")
    parser.add_argument("--metric", default=None, help="analysis score to rank by (default: the analysis default)")
    parser.add_argument("--ks", default="1,2,3,6,10", help="float-layer counts for the equal-k comparison")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 200))
    offset = MODELS[args.model][2]
    table = Table(title=f"{args.model} mixed precision: top-1 on {args.eval_num} {Path(args.eval_dir).name} images, "
                        f"host latency p50 ({args.threads} threads; a mixed model's ms = its ratio to int8, timed paired, × int8's ms), "
                        f"same k float layers as ours")
    for col in ("weights", "method", "float layers", "top-1 %", "drop pts", "gap recovered", "latency ms", "vs int8", "Q/DQ", "evaluations", "logit SQNR dB"):
        table.add_column(col, justify="right")
    ks = [int(k) for k in args.ks.split(",")]
    methods = ("ours (re-ranked, fusion-aware)", "ours, analysis order", "naive prefix", "TF debugger RMSE/scale", "random (mean of 5)")
    equal_k = Table(title="equal k: top-1 % / latency vs full int8 / Q+DQ ops / logit SQNR dB (random: mean of 5 seeds)")
    for col in ("weights", "k", "share of layers", *methods, "float layers: ours / analysis order", "ours vs debugger: images won / lost (p)"):
        equal_k.add_column(col, justify="right")
    closing: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            out = Path(tmp) / mode
            console.print(f"{mode}: compile, analyze, tune ...")
            compile_shared(args.model, args.calib, out, args.calib_num, per_channel=mode == "per-channel")
            analyze(out, args.calib, AnalysisOptions(num_samples=32))
            ours = tune(out, args.eval_dir, TuneOptions(max_drop=args.max_drop, num_eval=args.eval_num, threads=args.threads,
                                                        best_effort=True, metric=args.metric))
            compiled = CompiledModel.open(out)
            match = compiled.layer_match
            names = {l.index: l.name for l in match.layers}
            n = len(names)
            samples = compiled.load_samples(args.eval_dir, args.eval_num, 1, what="evaluation")
            inputs = compiled.tflite_inputs(samples)
            with captured_native_output(True):
                float_out = TfliteRunner(compiled.float_model, args.threads).run(inputs)
            f_acc = top1_accuracy(float_out, samples.labels, offset)
            ev = Evaluator(compiled, names, inputs, [float_out], samples.labels, args.threads, Path(tmp), True)
            ref = ours.reference
            i8_acc = ref["int8"]["accuracy"]
            gap = f_acc - i8_acc

            with captured_native_output(True):
                float_ms, int8_ms = paired_latency_ms(compiled.float_model, compiled.int8_model, inputs[0], args.threads)
            table.add_row(mode, "float32", str(n), f"{100 * f_acc:.1f}", "0.00", "100 %", f"{float_ms:.2f}",
                          f"{float_ms / int8_ms:.2f}x", "0", "-", "inf")
            table.add_row(mode, "full int8", "0", f"{100 * i8_acc:.1f}", f"{100 * gap:.2f}", "0 %", f"{int8_ms:.2f}",
                          "1.00x", str(ref["int8"]["quantize_ops"]), "-", f"{ref['int8']['output_sqnr_db']:.1f}")
            def same_budget(**how) -> TuneReport:
                return tune(out, args.eval_dir, TuneOptions(max_drop=args.max_drop, num_eval=args.eval_num, threads=args.threads,
                                                            best_effort=True, metric=args.metric, **how))

            unranked = same_budget(rerank=0)
            naive = same_budget(rerank=0, fusion_aware=False)
            budget_rows = (("ours (re-ranked, fusion-aware)", ours), ("ours, analysis order (--rerank 0)", unranked),
                           ("naive prefix (no regions, no re-rank)", naive))
            for label, r in budget_rows:
                c = r.chosen
                table.add_row(mode, label, str(len(c["float_layers"])), f"{100 * c['accuracy']:.1f}",
                              f"{100 * (f_acc - c['accuracy']):.2f}", f"{100 * (c['accuracy'] - i8_acc) / gap:.0f} %" if gap > 0 else "-",
                              f"{c['latency_ratio'] * int8_ms:.2f}", f"{c['latency_ratio']:.2f}x", str(c["quantize_ops"]),
                              f"{r.search['evaluations']} (≤{r.search['bound']})", f"{c['output_sqnr_db']:.1f}")
            if ours.budget["met"] and naive.budget["met"] and (ours.chosen["float_layers"] or naive.chosen["float_layers"]):
                closing.append(f"{mode}, --max-drop {args.max_drop}: ours {ours.chosen['latency_ratio']:.2f}x int8 latency with "
                               f"{len(ours.chosen['float_layers'])} float layers, naive {naive.chosen['latency_ratio']:.2f}x with "
                               f"{len(naive.chosen['float_layers'])}: naive is {slower(naive, ours)} at the same budget "
                               f"({differ(ours, naive)}; fusion-aware in the analysis order vs naive: {differ(unranked, naive)}, "
                               f"naive {slower(naive, unranked)})")
            if gap <= 0:
                continue
            console.print(f"{mode}: equal-k comparison at k = {ks} ...")
            order = unranked.search["order"]
            debugger = debugger_ranking(compiled, compiled.load_samples(args.calib, 32, 0).data, names)

            def measure(float_set) -> tuple[float, float, int, float]:
                result, path = ev.evaluate(frozenset(int(i) for i in float_set))
                with captured_native_output(True):
                    mixed, int8 = paired_latency_ms(path, compiled.int8_model, inputs[0], args.threads)
                return result["accuracy"], mixed / int8, result["quantize_ops"], result["output_sqnr_db"]

            for k in ks:
                runs, sizes = [], []
                for rerank in (None, 0):
                    fixed = tune(out, args.eval_dir, TuneOptions(float_layers=k, num_eval=args.eval_num, threads=args.threads,
                                                                 metric=args.metric, rerank=rerank)).chosen
                    runs.append((fixed["accuracy"], fixed["latency_ratio"], fixed["quantize_ops"], fixed["output_sqnr_db"]))
                    sizes.append(len(fixed["float_layers"]))
                    if rerank is None:  # tune's own evaluation stays inside it: run the model it wrote
                        with captured_native_output(True):
                            ours_correct = ev.image_correct(TfliteRunner(out / MIXED_MODEL, args.threads).run_all(inputs))
                runs += [measure(order[:k]), measure(debugger[:k])]
                rand = [measure(np.random.default_rng(seed).choice(n, k, replace=False)) for seed in range(5)]
                runs.append(tuple(float(np.mean([r[j] for r in rand])) for j in range(4)))
                vs = paired_top1(ours_correct, ev.correct[frozenset(debugger[:k])])
                equal_k.add_row(mode, str(k), f"{100 * k / n:.0f} %",
                                *[f"{100 * a:.1f} / {lat:.2f}x / {q:.0f} / {db:.1f}" for a, lat, q, db in runs],
                                " / ".join(map(str, sizes)), f"{vs['wins']} / {vs['losses']} (p {vs['p_value']:.2f})")
    console.print(table)
    console.print(equal_k)
    for line in closing:
        console.print(line)


if __name__ == "__main__":
    main()
