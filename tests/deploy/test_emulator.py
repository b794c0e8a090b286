"""The emulated Raspberry Pi: a real aarch64 userland under qemu-user with its own sshd on loopback
(the ``emulated_target`` fixture in conftest builds it once per machine and starts it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import DEMO_IMAGES

from quantune_edge.deploy import emulator
from quantune_edge.deploy.device import open_device
from quantune_edge.deploy.targets import load_target

CLI = [sys.executable, "-m", "quantune_edge.cli"]


def test_bench_on_emulated_arm_reports_aarch64(emulated_target, effnet_compiled, tmp_path):
    results = tmp_path / "results"
    cli = subprocess.run([*CLI, "bench", str(effnet_compiled / "model_int8.tflite"), "--target", str(emulated_target),
                          "--runs", "2", "--warmup", "0", "--results", str(results), "--json"],
                         capture_output=True, text=True, timeout=1200)
    assert cli.returncode == 0, cli.stderr[-2000:]
    (row,) = json.loads(cli.stdout)["results"]
    assert row["machine"] == "aarch64" and row["emulated"] and row["runtime"] == "tflite-runtime 2.14.0"
    report = subprocess.run([*CLI, "report", str(results)], capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    assert report.returncode == 0 and "aarch64" in report.stderr and "(emu)" in report.stderr
    assert "emulated" in (results / "report.html").read_text()


def test_eval_on_emulated_arm_matches_host(emulated_target, effnet_compiled, tmp_path):
    from quantune_edge.compile.artifacts import CompiledModel
    from quantune_edge.model.runtime import TfliteRunner

    samples = CompiledModel.open(effnet_compiled).load_samples(DEMO_IMAGES, 4, seed=5)
    npz = tmp_path / "s.npz"
    np.savez(npz, x=samples.data, labels=samples.labels)
    model = effnet_compiled / "model_int8.tflite"
    device = open_device(load_target(str(emulated_target)))
    try:
        dep = device.deploy(model)
        remote = f"{device.work_dir}/samples.npz"
        device.conn.sftp.put(str(npz), remote)
        result = device.agent(["eval", dep.remote_path, "--samples", remote, "--threads", "2"])
    finally:
        device.conn.close()
    host = TfliteRunner(model, 2).run(samples.data).argmax(axis=1).tolist()
    assert result["device"]["machine"] == "aarch64"
    assert result["reducer"] == "argmax" and result["reduced"] == host


def test_emulated_board_refuses_a_model_its_runtime_cannot_load(emulated_target, effnet_compiled, tmp_path):
    """tflite-runtime 2.14 on aarch64 loads the deployed model in a forked child before the rename: a
    model with an op version it lacks never replaces the working one."""
    import re

    import pytest
    from conftest import future_op_model

    from quantune_edge.errors import DeviceError

    model = effnet_compiled / "model_int8.tflite"
    future = future_op_model(model, tmp_path / "future.tflite")
    device = open_device(load_target(str(emulated_target)))
    try:
        name = f"refusal-{os.getpid()}.tflite"
        dep = device.deploy(model, name)
        with pytest.raises(DeviceError, match=r"the device's TFLite runtime cannot load future.tflite \(.*version '99'"):
            device.deploy(future, name)
        assert device.agent(["hash", dep.remote_path])["sha256"] == dep.sha256
        assert not [f for f in device.conn.sftp.listdir(device.models_dir) if re.fullmatch(rf"\.{re.escape(name)}\..*\.part", f)]
        device.remove_model(dep.remote_path)
    finally:
        device.conn.close()


def test_status_down_and_up_again_through_the_cli(emulated_target):
    """`targets emulate status|down|up` as a user types them (issue 29: the CLI had no test)."""
    def cli(*args):
        return subprocess.run([*CLI, "targets", "emulate", *args], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, COLUMNS="200"))

    status = cli("status", "--json")
    state = json.loads(status.stdout)
    assert status.returncode == 0 and state["running"] and state["built"] and state["port"]
    port, rootfs = state["port"], Path(state["folder"]) / "rootfs"
    elsewhere = cli("up", "--port", str(port + 1))
    assert elsewhere.returncode != 0 and elsewhere.stderr.strip().splitlines()[-1] == \
        f"error: emulator already running on port {port}; run 'targets emulate down' first"
    down = cli("down")
    assert down.returncode == 0 and "emulated ARM board stopped" in down.stderr + down.stdout
    assert "stopped" in (cli("status").stderr + cli("status").stdout) and not emulator.status().running
    mounts = Path("/proc/mounts").read_text()
    assert str(rootfs.resolve()) not in mounts and not emulator._processes_in(rootfs)
    up = cli("up", "--port", str(port))
    said = " ".join((up.stderr + up.stdout).split())
    assert up.returncode == 0 and f"on 127.0.0.1:{port}" in said and str(emulated_target) in said
    again = json.loads(cli("status", "--json").stdout)
    assert again["running"] and again["port"] == port
