"""Accuracy confirmed on the device itself: the evaluation samples go to each target as one .npz, the
agent's ``eval`` runs every model there and returns each output reduced as the task asks (argmax for a
classifier), and the host scores those answers by the task, against the labels and against its own
answers for the same model (an ARM build of the kernels may round differently). The agent knows no task."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantune_edge.common.console import captured_native_output
from quantune_edge.common.outputs import temp_folder
from quantune_edge.common.records import sha256_file
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.deploy.device import open_device
from quantune_edge.deploy.targets import Target
from quantune_edge.measure.latency import model_label
from quantune_edge.model.runtime import TfliteRunner


def evaluate_on_device(compiled: CompiledModel, models: list[Path], eval_data: str | Path, num: int, seed: int,
                       targets: list[Target], threads: int = 2, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Per target and model label: the task's metric on the device (labels) and agreement with the host."""
    task = compiled.task
    samples = compiled.load_samples(eval_data, num, seed, what="evaluation")
    x = compiled.tflite_inputs(samples)
    with captured_native_output(True):
        host = {m: task.reduce(TfliteRunner(m, threads).run(x)) for m in models}
    out: dict = {"samples": len(x), "labelled": bool(samples.has_labels), "targets": {}}
    with temp_folder("eval") as tmp:
        npz = Path(tmp) / "eval.npz"
        np.savez(npz, x=x)
        for target in targets:
            device = open_device(target, log=log)
            try:
                remote_npz = f"{device.work_dir}/eval-{sha256_file(npz)[:12]}.npz"
                device.conn.sftp.put(str(npz), remote_npz)
                rows = {}
                for model in models:
                    dep = device.deploy(model, by_content=True)
                    result = device.agent(["eval", dep.remote_path, "--samples", remote_npz, "--threads", str(target.threads),
                                           "--reduce", task.device_reducer])
                    answers = np.asarray(result["reduced"])
                    right = task.reduced_correct(answers, samples.labels)
                    rows[model_label(model)] = {"top1": float(right.mean()) if right.size else None,
                                                "agreement_with_host": float(np.mean(answers == host[model])),
                                                "machine": result["device"]["machine"]}
                device.conn.sftp.remove(remote_npz)
            finally:
                device.conn.close()
            out["targets"][target.name] = rows
    return out
