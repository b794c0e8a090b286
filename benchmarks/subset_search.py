"""Could a search over layer combinations beat the ranking's k float layers? Held-out answer.

EfficientNet-Lite0, per-tensor int8 (the case with an accuracy gap). Every k-subset of the ranking's
top M layers is built and run once on all evaluation images. Then, over many random splits of the
images into halves A and B: the subset with the best top-1 on A is picked (what a search that
evaluates on the images it reports would pick) and measured on B, which took no part in the choice.
Beside it: our choice (the `tune --float-layers k` set), the subset with the best logit SQNR on A, and
the best subset on B itself (a ceiling no selection can know in advance). Top-1 is the mean over the
splits, with the share of the float-int8 gap it recovers. "Best on all images" is the subset a search
of every k-subset would report on the whole set (in-sample, share of the whole set's gap).

With ``--swap``, each k's best subset on all images is then improved by one-layer swaps with any layer
of the model (not only the top M) until no swap gains: an in-sample local optimum over all layers.

    .venv/bin/python bench/subset_search.py [--eval-num 650] [--top 10] [--ks 1,2,3] [--swap]
"""
from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
from _models import MODELS, add_data_args, compile_shared  # noqa: E402
from rich.console import Console
from rich.progress import track
from rich.table import Table

from quantune_edge.analyze.analysis import AnalysisOptions, analyze  # noqa: E402
from quantune_edge.common.console import captured_native_output  # noqa: E402
from quantune_edge.compile.artifacts import CompiledModel  # noqa: E402
from quantune_edge.compile.tracing import onnx_label  # noqa: E402
from quantune_edge.model.runtime import TfliteRunner  # noqa: E402
from quantune_edge.tune.tuning import TuneOptions, tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(parser, eval_num=650)
    parser.add_argument("--top", type=int, default=10, help="search every k-subset of the ranking's top M layers")
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--splits", type=int, default=200, help="random half splits to average over")
    parser.add_argument("--swap", action="store_true",
                        help="then climb from the best subset on all images by swapping one layer for any other of the model")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 200))
    offset = MODELS["efficientnet-lite0"][2]
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "per-tensor"
        console.print("compile (per-tensor), analyze ...")
        compile_shared("efficientnet-lite0", args.calib, out, args.calib_num, per_channel=False)
        analysis = analyze(out, args.calib, AnalysisOptions(num_samples=32))
        compiled = CompiledModel.open(out)
        samples = compiled.load_samples(args.eval_dir, args.eval_num, 1, what="evaluation")
        inputs = compiled.tflite_inputs(samples)
        splits = [np.random.default_rng(seed).permutation(len(samples)) for seed in range(args.splits)]
        splits = [(p[: len(p) // 2], p[len(p) // 2:]) for p in splits]
        layers = {layer["index"]: layer for layer in analysis.layers}
        model = Path(tmp) / "candidate.tflite"

        def run(path: Path) -> dict:
            with captured_native_output(True):
                logits = TfliteRunner(path, args.threads, logits=True).run(inputs)
            return {"correct": np.argmax(logits, 1) - offset == samples.labels, "logits": logits}

        reference = run(compiled.float_model)
        cache: dict[frozenset[int], dict] = {}

        def evaluate(float_set) -> dict:
            key = frozenset(int(i) for i in float_set)
            if key not in cache:
                with captured_native_output(True):
                    model.write_bytes(compiled.mixed([layers[i]["name"] for i in sorted(key)]))
                r = run(model)
                noise = np.sum((r["logits"] - reference["logits"]) ** 2, axis=1)
                signal = np.sum(reference["logits"] ** 2, axis=1)
                cache[key] = {"correct": r["correct"], "noise": noise, "signal": signal, "set": sorted(key)}
            return cache[key]

        def top1(r: dict, idx: np.ndarray) -> float:
            return 100 * float(np.mean(r["correct"][idx]))

        def sqnr(r: dict, idx: np.ndarray) -> float:
            noise = float(np.sum(r["noise"][idx]))
            return math.inf if noise == 0 else 10 * math.log10(float(np.sum(r["signal"][idx])) / noise)

        int8 = evaluate(())
        top = analysis.sensitivity_order[: args.top]

        def label(r: dict) -> str:
            return "{" + ", ".join(onnx_label(layers[i]) or layers[i]["short_name"] for i in r["set"]) + "}"

        float_b = np.mean([top1(reference, b) for _, b in splits])
        int8_b = np.mean([top1(int8, b) for _, b in splits])
        everything = np.arange(len(samples))
        float_all, int8_all = top1(reference, everything), top1(int8, everything)

        if float_all <= int8_all:
            console.print(f"int8 ({int8_all:.2f}) is not below float32 ({float_all:.2f}) on these images: no gap for float layers to recover")
            return

        def share(value: float, low: float, high: float) -> str:
            return f"{100 * (value - low) / (high - low):.0f} %" if high > low else "-"

        def cell(values: list[float]) -> str:
            mean = float(np.mean(values))
            return f"{mean:.2f} ({share(mean, int8_b, float_b)})"

        def climb(start: dict, idx: np.ndarray) -> tuple[dict, int]:
            """Best-improvement hill climbing on ``idx`` over one-layer swaps with every layer of the model:
            in-sample, so its optimum bounds from above what any k-subset search could report there."""
            best, runs = start, 0
            while True:
                swaps = [sorted((set(best["set"]) - {old}) | {new}) for old in best["set"] for new in layers if new not in best["set"]]
                runs += len(swaps)
                tried = [evaluate(s) for s in track(swaps, description=f"swaps of {label(best)}", console=console)]
                top_swap = max(tried, key=lambda r: (top1(r, idx), sqnr(r, idx)))
                if (top1(top_swap, idx), sqnr(top_swap, idx)) <= (top1(best, idx), sqnr(best, idx)):
                    return best, runs
                best = top_swap

        climbs: list[tuple[int, tuple[dict, int]]] = []
        table = Table(title=f"k float layers, EfficientNet-Lite0 per-tensor: held-out top-1 % (share of the float-int8 gap), mean over "
                            f"{len(splits)} random halves of {len(samples)} {Path(args.eval_dir).name} images; subsets of the ranking's top {len(top)}")
        for col in ("k", "subsets run", "ours", "best top-1 on A", "A-best beats / loses to ours", "best SQNR on A",
                    "best on B (ceiling)", "best on all images", "ours (layers)"):
            table.add_column(col, justify="right")
        for k in ks:
            chosen = tune(out, args.eval_dir, TuneOptions(float_layers=k, num_eval=args.eval_num, threads=args.threads)).chosen
            ours = evaluate(chosen["float_layers"])
            runs = [evaluate(s) for s in track(list(itertools.combinations(top, k)), description=f"k = {k}", console=console)]
            rows = []
            for a, b in splits:
                by_a = max(runs, key=lambda r: (top1(r, a), sqnr(r, a)))
                by_sqnr = max(runs, key=lambda r: sqnr(r, a))
                rows.append((top1(ours, b), top1(by_a, b), top1(by_sqnr, b), max(top1(r, b) for r in runs)))
            cols = list(zip(*rows))
            beats = np.mean(np.array(cols[1]) > np.array(cols[0]))
            loses = np.mean(np.array(cols[1]) < np.array(cols[0]))
            best_all = max(runs, key=lambda r: (top1(r, everything), sqnr(r, everything)))
            best_all_top1 = top1(best_all, everything)
            if args.swap:
                climbs.append((k, climb(best_all, everything)))
            table.add_row(str(k), str(len(runs)), cell(cols[0]), cell(cols[1]), f"{100 * beats:.0f} % / {100 * loses:.0f} %",
                          cell(cols[2]), cell(cols[3]),
                          f"{best_all_top1:.2f} ({share(best_all_top1, int8_all, float_all)}) {label(best_all)}",
                          label(ours))
        console.print(table)
        for k, (best, runs) in climbs:
            console.print(f"k = {k}, one-layer swaps from the best subset on all images ({runs} subsets run): local optimum "
                          f"{top1(best, everything):.2f} ({share(top1(best, everything), int8_all, float_all)}), "
                          f"{sqnr(best, everything):.2f} dB, {label(best)}")
        console.print(f"held-out halves: float32 {float_b:.2f}, int8 {int8_b:.2f}, 95 % of the gap = {int8_b + 0.95 * (float_b - int8_b):.2f}; "
                      f"all {len(samples)} images: float32 {float_all:.2f}, int8 {int8_all:.2f}")


if __name__ == "__main__":
    main()
