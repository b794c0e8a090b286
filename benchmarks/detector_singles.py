"""How far one float layer moves a detector's mAP: the analysis's top-ranked layers against layers drawn
at random from the bottom half of its ranking, each kept float alone (closed over its scale-tied chain
or requantized tail, not grown), mAP50-95 on the evaluation images.

Where full int8 loses little (NanoDet-m: 1.5 points), a budget near that loss can be met by chance:
if bottom-ranked layers score as well as top-ranked ones, the evaluation set cannot tell the ranking's
picks from any others at that budget.

    .venv/bin/python benchmarks/detector_singles.py FOLDER [--eval DIR] [--eval-num 128] [--top 12] [--bottom 8] [--max-drop 1]

FOLDER: a `quantune-edge compile --task detect` + `analyze` folder (docs/detect.md has the commands).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _models import ASSETS
from rich.console import Console
from rich.table import Table

from quantune_edge.common.console import captured_native_output
from quantune_edge.compile.artifacts import ANALYSIS_JSON, CompiledModel
from quantune_edge.model.layers import float_units
from quantune_edge.model.runtime import TfliteRunner
from quantune_edge.tasks.base import reference_labels
from quantune_edge.tune import selection
from quantune_edge.tune.tuning import Evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--eval", dest="eval_dir", default=str(ASSETS / "detection" / "coco-val2017-128"))
    parser.add_argument("--eval-num", type=int, default=128)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--bottom", type=int, default=8)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    compiled = CompiledModel.open(args.folder)
    qg, match = compiled.int8_graph, compiled.layer_match
    lg = selection.LayerGraph.build(qg, match.layers, float_units(match, qg))
    names = {layer.index: layer.name for layer in match.layers}
    analysis = json.loads((args.folder / ANALYSIS_JSON).read_text())
    order = analysis["sensitivity_order"]
    share = {layer["index"]: layer.get("output_share") for layer in analysis["layers"]}
    weighted = [i for i in order if match.layers[i].macs > 0]
    bottom = [int(i) for i in np.random.default_rng(args.seed).choice(weighted[len(weighted) // 2:], args.bottom, replace=False)]
    samples = compiled.load_samples(args.eval_dir, args.eval_num, 0, what="evaluation")
    inputs = compiled.tflite_inputs(samples)
    with captured_native_output(True):
        float_values = TfliteRunner(compiled.float_model, 2).run_all(inputs)
    labels, _ = reference_labels(compiled.task, samples, lambda: compiled.judged_outputs(float_values))
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        ev = Evaluator(compiled, names, inputs, float_values, labels, 2, Path(tmp), True)
        float_map = 100 * ev.accuracy(float_values, None)
        int8_map = 100 * ev.evaluate(frozenset())[0]["accuracy"]
        needed = float_map - args.max_drop
        table = Table(title=f"{args.folder.name}: one layer float, mAP50-95 on {len(inputs)} images "
                            f"(float32 {float_map:.2f}, full int8 {int8_map:.2f}, --max-drop {args.max_drop} needs {needed:.2f})")
        for column in ("group", "rank", "layer", "op", "output share", "mAP50-95", "meets"):
            table.add_column(column, justify="left" if column in ("group", "op") else "right")
        groups: dict[str, list[float]] = {"top": [], "bottom half": []}
        for group, layers in (("top", order[:args.top]), ("bottom half", bottom)):
            for i in layers:
                value = 100 * ev.evaluate(lg.closed({i}))[0]["accuracy"]
                groups[group].append(value)
                table.add_row(group, str(order.index(i)), str(i), match.layers[i].op_type, f"{share[i]:+.3g}" if share[i] is not None else "-",
                              f"{value:.2f}", "yes" if value >= needed - 1e-9 else "")
        console.print(table)
        for group, values in groups.items():
            console.print(f"{group}: mean {np.mean(values):.2f}, range {min(values):.2f}-{max(values):.2f}, "
                          f"{sum(v >= needed - 1e-9 for v in values)} of {len(values)} meet --max-drop {args.max_drop}")


if __name__ == "__main__":
    main()
