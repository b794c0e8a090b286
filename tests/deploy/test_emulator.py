"""The emulated Raspberry Pi: a real aarch64 userland under qemu-user with its own sshd on loopback
(the ``emulated_target`` fixture in conftest builds it once per machine and starts it)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_IMAGES, HIDE_RUNTIMES

from quantune_edge.deploy import emulator, runtimes
from quantune_edge.deploy.device import open_device
from quantune_edge.deploy.targets import load_target
from quantune_edge.errors import DeviceError

CLI = [sys.executable, "-m", "quantune_edge.cli"]


def test_bench_on_emulated_arm_reports_aarch64(emulated_target, effnet_compiled, tmp_path):
    results = tmp_path / "results"
    cli = subprocess.run([*CLI, "bench", str(effnet_compiled / "model_int8.tflite"), "--target", str(emulated_target),
                          "--runs", "2", "--warmup", "0", "--results", str(results), "--json"],
                         capture_output=True, text=True, timeout=1200)
    assert cli.returncode == 0, cli.stderr[-2000:]
    (row,) = json.loads(cli.stdout)["results"]
    assert row["machine"] == "aarch64" and row["emulated"] and row["runtime"] == "ai-edge-litert 2.3.0"  # the pick for Python 3.11
    report = subprocess.run([*CLI, "report", str(results)], capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    assert report.returncode == 0 and "aarch64" in report.stderr and "(emu)" in report.stderr
    assert "emulated" in (results / "report.html").read_text()


@pytest.mark.parametrize("board", ["emulated_target", "emulated_trixie"])
def test_eval_on_emulated_arm_matches_host(board, request, effnet_compiled, tmp_path):
    """The same model's outputs on each board (bookworm: Python 3.11, trixie: 3.13, each with the
    runtime the selection picks for it) agree with the host's."""
    from quantune_edge.compile.artifacts import CompiledModel
    from quantune_edge.model.runtime import TfliteRunner

    samples = CompiledModel.open(effnet_compiled).load_samples(DEMO_IMAGES, 4, seed=5)
    npz = tmp_path / "s.npz"
    np.savez(npz, x=samples.data, labels=samples.labels)
    model = effnet_compiled / "model_int8.tflite"
    device = open_device(load_target(str(request.getfixturevalue(board))))
    try:
        dep = device.deploy(model)
        remote = f"{device.work_dir}/samples.npz"
        device.conn.sftp.put(str(npz), remote)
        result = device.agent(["eval", dep.remote_path, "--samples", remote, "--threads", "2", "--reduce", "none",
                               "--outputs", f"{device.work_dir}/outputs"])
        with device.conn.sftp.open(result["output_files"][0]["file"], "rb") as fh:
            logits = np.load(io.BytesIO(fh.read()))
    finally:
        device.conn.close()
    host = TfliteRunner(model, 2).run(samples.data)
    python = {"emulated_target": "3.11", "emulated_trixie": "3.13"}[board]
    assert result["device"]["machine"] == "aarch64" and result["device"]["python"].startswith(python + ".")
    assert result["runtime"] == {"package": "ai-edge-litert", "module": "ai_edge_litert.interpreter", "version": "2.3.0"}
    assert logits.shape == host.shape and (logits.argmax(1) == host.argmax(1)).all()
    # ARM's and x86's int8 kernels round some accumulations differently: measured 26.4 dB SQNR between
    # the board's and the host's logits (at most 5 output steps apart), the same top-1 everywhere
    assert 10 * np.log10(np.sum(host ** 2) / np.sum((logits - host) ** 2)) >= 20


def test_a_fleet_of_both_boards_in_one_bench_call(emulated_target, emulated_trixie, effnet_compiled, tmp_path):
    """bookworm and trixie side by side: one `bench`, one row each, each board in its own folder, port and target file."""
    from quantune_edge.measure.saved import load_reports

    folder = tmp_path / "targets"
    folder.mkdir()
    for name, path in (("bookworm", emulated_target), ("trixie", emulated_trixie)):
        (folder / f"{name}.toml").write_text(Path(path).read_text())
    results = tmp_path / "results"
    cli = subprocess.run([*CLI, "bench", str(effnet_compiled / "model_int8.tflite"), "--target", "bookworm,trixie", "--targets-dir",
                          str(folder), "--runs", "2", "--warmup", "0", "--results", str(results), "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert cli.returncode == 0, cli.stderr[-2000:]
    rows = {r["target"]: r for r in json.loads(cli.stdout)["results"]}
    assert set(rows) == {"bookworm", "trixie"} and all(r["machine"] == "aarch64" and r["emulated"] and r["p50_ms"] > 0 for r in rows.values())
    facts = {data["target"]["name"]: data["device"] for _, data in load_reports(results)}
    assert facts["bookworm"]["python"].startswith("3.11.") and "bookworm" in facts["bookworm"]["os"]
    assert facts["trixie"]["python"].startswith("3.13.") and "trixie" in facts["trixie"]["os"]
    boards = [emulator.status(suite=s, disk_usage=False) for s in ("bookworm", "trixie")]
    assert len({b.folder for b in boards}) == len({b.port for b in boards}) == len({b.target_file for b in boards}) == 2
    assert [b.runtime for b in boards] == ["ai-edge-litert==2.3.0", "ai-edge-litert==2.3.0"]


def test_run_with_device_eval_on_the_trixie_board(emulated_trixie, tmp_path):
    """`run --eval-on-device` on today's Raspberry Pi OS base (a small two-input model, fidelity task)."""
    import onnx
    from conftest import image_and_vector_net, run_cli

    rng = np.random.default_rng(0)
    onnx.save(image_and_vector_net(), tmp_path / "two.onnx")
    np.savez(tmp_path / "two.npz", image=rng.normal(size=(12, 3, 32, 32)).astype(np.float32),
             meta=rng.normal(size=(12, 16)).astype(np.float32))
    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "pi5.toml").write_text(Path(emulated_trixie).read_text())
    proc = run_cli("run", tmp_path / "two.onnx", "--calib", tmp_path / "two.npz", "--eval", tmp_path / "two.npz", "--target", "pi5",
                   "--targets-dir", folder, "--out", tmp_path / "run", "--task", "fidelity", "--min-sqnr", 30, "--num-calib", 12,
                   "--num-samples", 8, "--num-eval", 12, "--runs", 2, "--eval-on-device", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    rows = report["accuracy"]["device"]["targets"]["pi5"]
    assert set(rows) == {"float32", "int8", "mixed"} and all(r["machine"] == "aarch64" for r in rows.values())
    host = report["accuracy"]["host"]
    assert rows["float32"]["value"] >= 100 and host["float32"] == "inf"  # float kernels: the same to float rounding
    for label in ("int8", "mixed"):  # ARM's int8 kernels round differently: measured 38.3 dB on the board, 40.2 on the host
        assert 30 <= rows[label]["value"] and abs(rows[label]["value"] - host[label]) <= 3, (label, rows[label]["value"], host[label])
    assert {r["machine"] for r in report["device"] if r["target"] == "pi5"} == {"aarch64"}


def test_the_trixie_board_has_no_pip_and_install_runtime_says_so(emulated_trixie):
    """A minimal image without pip: --install-runtime on it when no runtime is found is one clear line,
    and nothing changes on the board."""
    board = emulator.status(suite="trixie", disk_usage=False)
    rootfs = Path(board.folder) / "rootfs"
    hidden = rootfs / "root" / "hide-runtime"
    hidden.mkdir(exist_ok=True)
    (hidden / "sitecustomize.py").write_text(HIDE_RUNTIMES)
    wrapper = rootfs / "root" / "python-no-runtime"
    wrapper.write_text("#!/bin/sh\nPYTHONPATH=/root/hide-runtime exec /usr/bin/python3 \"$@\"\n")
    wrapper.chmod(0o755)
    target = Path(board.target_file).with_name("no-runtime.toml")
    target.write_text(Path(board.target_file).read_text().replace('python = "python3"', 'python = "/root/python-no-runtime"'))
    site = sorted(p.name for p in rootfs.glob("usr/local/lib/python3.13/dist-packages/*"))
    try:
        with pytest.raises(DeviceError) as err:
            open_device(load_target(str(target)), install_runtime=True)
    finally:
        target.unlink()
    said = str(err.value)
    assert said.startswith("target no-runtime: no pip for /root/python-no-runtime on the device (") and "No module named pip" in said
    assert said.endswith("install pip (Debian: apt install python3-pip) or ai-edge-litert==2.3.0 by hand; nothing was installed")
    assert sorted(p.name for p in rootfs.glob("usr/local/lib/python3.13/dist-packages/*")) == site


def test_emulated_board_refuses_a_model_its_runtime_cannot_load(emulated_target, effnet_compiled, tmp_path):
    """A model with an op version the board's runtime lacks is refused on the host, op named, before
    any upload; and where the host cannot know (a runtime release not in the table), the board's
    runtime loads it in a forked child before the rename: it never replaces the working model."""
    import re

    from conftest import future_op_model

    model = effnet_compiled / "model_int8.tflite"
    future = future_op_model(model, tmp_path / "future.tflite")
    device = open_device(load_target(str(emulated_target)))
    try:
        name = f"refusal-{os.getpid()}.tflite"
        dep = device.deploy(model, name)
        listing = sorted(device.conn.sftp.listdir(device.models_dir))
        with pytest.raises(DeviceError, match=r"its ai-edge-litert 2.3.0 cannot run future.tflite: no kernel for \w+ version 99 "
                                              r"\(it has up to \d+\); nothing was uploaded$"):
            device.deploy(future, name)
        assert sorted(device.conn.sftp.listdir(device.models_dir)) == listing
        device.info["runtime"] = {**device.info["runtime"], "version": "9.9.9"}
        with pytest.raises(DeviceError, match=r"the device's TFLite runtime cannot load future.tflite \(.*version '99'"):
            device.deploy(future, name)
        assert device.agent(["hash", dep.remote_path])["sha256"] == dep.sha256
        assert not [f for f in device.conn.sftp.listdir(device.models_dir) if re.fullmatch(rf"\.{re.escape(name)}\..*\.part", f)]
        # the table (probed on the host's wheel of this release) holds on the board's aarch64 build: the
        # top version it lists resolves there, one more does not
        top = runtimes.supported_op_versions()["ai-edge-litert 2.3.0"]
        for op in ("CONV_2D", "FULLY_CONNECTED"):
            at_top = future_op_model(model, tmp_path / f"{op}-top.tflite", op, top[op])
            try:
                device.remove_model(device.deploy(at_top, f"top-{name}").remote_path)
            except DeviceError as exc:  # a kernel exists; the raised version may want options the op lacks
                assert "Didn't find op" not in str(exc), exc
            beyond = future_op_model(model, tmp_path / f"{op}-beyond.tflite", op, top[op] + 1)
            with pytest.raises(DeviceError, match=rf"Didn't find op for builtin opcode '{op}' version '{top[op] + 1}'"):
                device.deploy(beyond, name)
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
