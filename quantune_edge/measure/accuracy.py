"""Accuracy confirmed on the device itself: the evaluation samples go to each target as one .npz and
the agent's ``eval`` runs every model there. A task judged sample by sample (a classifier) gets each
output reduced there (argmax) and scores the answers; a task judged over the whole set (COCO mAP,
fidelity, a custom metric) gets every output back whole and computes its metric from the device's
outputs. Either way the host also compares with its own run of the same model (an ARM build of the
kernels may round differently). The agent knows no task."""
from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantune_edge.common.console import captured_native_output
from quantune_edge.common.outputs import temp_folder
from quantune_edge.common.records import sha256_file
from quantune_edge.compile.artifacts import CompiledModel
from quantune_edge.deploy.device import Device, open_device
from quantune_edge.deploy.targets import Target
from quantune_edge.errors import DeviceError
from quantune_edge.measure.latency import model_label
from quantune_edge.model.runtime import TfliteRunner
from quantune_edge.tasks.base import reference_labels

WHOLE_OUTPUTS = "none"  # the agent's reducer that keeps every output whole (written to files)


def evaluate_on_device(compiled: CompiledModel, models: list[Path], eval_data: str | Path, num: int, seed: int,
                       targets: list[Target], threads: int = 2, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Per target and model label: the task's metric on the device and how it compares with the host."""
    task = compiled.task
    samples = compiled.load_samples(eval_data, num, seed, what="evaluation")
    x = compiled.tflite_inputs(samples)
    whole = task.device_reducer == WHOLE_OUTPUTS
    with captured_native_output(True):
        host = {m: TfliteRunner(m, threads).run_all(x) for m in models}
        labels, against = reference_labels(task, samples, lambda: compiled.judged_outputs(TfliteRunner(compiled.float_model, threads).run_all(x)))
    out: dict = {"samples": len(x), "labelled": labels is not None, "judged_against": against, "metric": task.metric_name, "targets": {}}
    with temp_folder("eval") as tmp:
        npz = Path(tmp) / "eval.npz"
        np.savez(npz, x=x)
        for target in targets:
            device = open_device(target, log=log)
            remote_npz = f"{device.work_dir}/eval-{sha256_file(npz)[:12]}.npz"
            try:
                device.conn.sftp.put(str(npz), remote_npz)
                rows = {}
                for model in models:
                    dep = device.deploy(model, by_content=True)
                    args = ["eval", dep.remote_path, "--samples", remote_npz, "--threads", str(target.threads)]
                    if whole:
                        rows[model_label(model)] = _whole_outputs(device, args, compiled, host[model], labels, Path(tmp))
                    else:
                        rows[model_label(model)] = _reduced(device, args, compiled, host[model], samples.labels)
            finally:
                with contextlib.suppress(OSError):  # the samples do not stay on the device, whatever happened
                    device.conn.sftp.remove(remote_npz)
                device.conn.close()
            out["targets"][target.name] = rows
    return out


def _reduced(device: Device, args: list[str], compiled: CompiledModel, host: list[np.ndarray], labels: np.ndarray) -> dict:
    """The agent reduces each output (argmax); the task scores the answers and the host's run its own."""
    task = compiled.task
    result = device.agent([*args, "--reduce", task.device_reducer])
    answers, host_answers = np.asarray(result["reduced"]), task.reduce(host[0])
    right, host_right = task.reduced_correct(answers, labels), task.reduced_correct(host_answers, labels)
    return {"metric": task.metric_name, "value": float(right.mean()) if right.size else None,
            "host_value": float(host_right.mean()) if host_right.size else None,
            "agreement_with_host": float(np.mean(answers == host_answers)), "machine": result["device"]["machine"],
            "kernels": result.get("kernels")}


def _whole_outputs(device: Device, args: list[str], compiled: CompiledModel, host: list[np.ndarray], labels: np.ndarray | None,
                   tmp: Path) -> dict:
    """The agent writes every output; the host fetches them and computes the task's metric from the
    device's outputs exactly as from its own."""
    task = compiled.task
    remote = posixpath.join(device.work_dir, f"eval-outputs-{posixpath.basename(args[1])}")
    result = device.agent([*args, "--reduce", WHOLE_OUTPUTS, "--outputs", remote])
    values = []
    try:
        for k, entry in enumerate(result["output_files"]):
            local = tmp / f"device-output-{k}.npy"
            device.conn.sftp.get(entry["file"], str(local))
            values.append(np.load(local, allow_pickle=False))
            device.conn.sftp.remove(entry["file"])
    finally:
        with contextlib.suppress(OSError):
            device.conn.sftp.rmdir(remote)
    if [v.size for v in values] != [h.size for h in host]:
        raise DeviceError(f"{device.target.name}: the agent returned outputs of sizes {[v.size for v in values]}, the host's run "
                          f"{[h.size for h in host]}; the deployed model is not the one evaluated here")
    values = [v.reshape(h.shape) for v, h in zip(values, host)]  # as the host's run stacks them
    diff = max(float(np.max(np.abs(v - h))) for v, h in zip(values, host))
    judged = labels is not None
    device_scores = task.scores(compiled.judged_outputs(values), labels) if judged else None
    host_scores = task.scores(compiled.judged_outputs(host), labels) if judged else None
    name = task.metric_name
    return {"metric": name, "value": device_scores[name] if device_scores else None,
            "host_value": host_scores[name] if host_scores else None, "scores": device_scores,
            "max_abs_diff_vs_host": diff, "machine": result["device"]["machine"], "kernels": result.get("kernels")}
