"""Could a search over layer combinations beat the ranking's k float layers? Held-out answer.

EfficientNet-Lite0, per-tensor int8 (the case with an accuracy gap). The evaluation images are split
in two halves at random: every k-subset of the ranking's top M layers is built and run, the subset
with the best top-1 on half A is picked (what a search that evaluates on the images it reports would
pick), and then measured on half B, which took no part in the choice. Beside it: our choice (the
`tune --float-layers k` set), the subset with the best logit SQNR on A, and the best subset on B
itself (a ceiling no selection can know in advance). ±σ is the paired binomial standard error of a
top-1 difference against ours on B: √(images where exactly one of the two is right) / images.

    .venv/bin/python bench/subset_search.py [--eval-num 650] [--top 10] [--ks 1,2,3]
"""
from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from _models import ASSETS, MODELS  # noqa: E402
from quantune_edge import CompileOptions, compile_model, make_preprocessing  # noqa: E402
from quantune_edge.analysis import AnalysisOptions, analyze  # noqa: E402
from quantune_edge.artifacts import CompiledModel  # noqa: E402
from quantune_edge.console import captured_native_output  # noqa: E402
from quantune_edge.runtime import TfliteRunner  # noqa: E402
from quantune_edge.tuning import TuneOptions, tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default=str(ASSETS / "imagenet-samples"))
    parser.add_argument("--calib-num", type=int, default=100)
    parser.add_argument("--eval", dest="eval_dir", default=str(ASSETS / "imagenet-val"))
    parser.add_argument("--eval-num", type=int, default=650)
    parser.add_argument("--top", type=int, default=10, help="search every k-subset of the ranking's top M layers")
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args()

    console = Console(width=max(Console().width, 200))
    file, prep_kwargs, offset = MODELS["efficientnet-lite0"]
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "per-tensor"
        console.print("compile (per-tensor), analyze ...")
        compile_model(ASSETS / "models" / file, args.calib, out,
                      CompileOptions(preprocessing=make_preprocessing(**prep_kwargs), num_calib=args.calib_num,
                                     per_channel=False, label_offset=offset))
        analysis = analyze(out, args.calib, AnalysisOptions(num_samples=32))
        compiled = CompiledModel.open(out)
        samples = compiled.load_samples(args.eval_dir, args.eval_num, 1, what="evaluation")
        inputs = compiled.tflite_inputs(samples)
        half = np.random.default_rng(args.split_seed).permutation(len(samples))
        a_idx, b_idx = half[: len(half) // 2], half[len(half) // 2:]
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
                    model.write_bytes(compiled.requantize([layers[i]["name"] for i in sorted(key)]))
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

        def sigma(r: dict, ref: dict) -> float:
            return 100 * math.sqrt(float(np.sum(r["correct"][b_idx] != ref["correct"][b_idx]))) / len(b_idx)

        int8 = evaluate(())
        top = analysis.sensitivity_order[: args.top]

        def label(r: dict) -> str:
            return "{" + ", ".join(layers[i]["short_name"] for i in r["set"]) + "}"

        table = Table(title=f"k float layers, EfficientNet-Lite0 per-tensor: top-1 % on half A (choice) → half B (held out), "
                            f"{len(a_idx)} + {len(b_idx)} {Path(args.eval_dir).name} images; subsets of the ranking's top {len(top)}")
        for col in ("k", "subsets run", "ours A → B", "best top-1 on A → B (±σ vs ours)", "best SQNR on A → B",
                    "best on B (ceiling)", "ours", "best top-1 on A"):
            table.add_column(col, justify="right")
        for k in ks:
            chosen = tune(out, args.eval_dir, TuneOptions(float_layers=k, num_eval=args.eval_num, threads=args.threads)).chosen
            ours = evaluate(chosen["float_layers"])
            runs = [evaluate(s) for s in track(list(itertools.combinations(top, k)), description=f"k = {k}", console=console)]
            by_a = max(runs, key=lambda r: (top1(r, a_idx), sqnr(r, a_idx)))
            by_sqnr = max(runs, key=lambda r: sqnr(r, a_idx))
            by_b = max(runs, key=lambda r: top1(r, b_idx))
            table.add_row(str(k), str(len(runs)), f"{top1(ours, a_idx):.1f} → {top1(ours, b_idx):.1f}",
                          f"{top1(by_a, a_idx):.1f} → {top1(by_a, b_idx):.1f} (±{sigma(by_a, ours):.1f})",
                          f"{top1(by_sqnr, a_idx):.1f} → {top1(by_sqnr, b_idx):.1f}", f"{top1(by_b, b_idx):.1f}",
                          label(ours), label(by_a))
        f_b, i_b = top1(reference, b_idx), top1(int8, b_idx)
        console.print(table)
        console.print(f"half A: float32 {top1(reference, a_idx):.1f}, int8 {top1(int8, a_idx):.1f}; "
                      f"half B: float32 {f_b:.1f}, int8 {i_b:.1f}, 95 % of the gap = {i_b + 0.95 * (f_b - i_b):.1f}")


if __name__ == "__main__":
    main()
