"""Deployment against a real OpenSSH sshd on loopback (this machine is the device): host keys, key
auth, verified atomic uploads, failures mid-upload, parallel bench, saved reports and the report."""
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import blocked_runtime_env, future_op_model

from quantune_edge.deploy.device import open_device
from quantune_edge.deploy.targets import Target, load_target
from quantune_edge.deploy.transport import Connection
from quantune_edge.errors import DeviceError, InputError
from quantune_edge.measure.latency import BenchOptions, bench, machine_of
from quantune_edge.measure.saved import summarize
from quantune_edge.testing.loopback_sshd import LoopbackSshd, free_port, keygen

# Outside CI a machine without sshd skips these; in CI (CI=true, set by .ci/run) they run and fail.
pytestmark = pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists() and not os.environ.get("CI"),
                                reason="needs OpenSSH's sshd (make test installs openssh-server)")
CLI = [sys.executable, "-m", "quantune_edge.cli"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = LoopbackSshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture()
def target_path(sshd, tmp_path):
    return sshd.target_toml(tmp_path / "targets" / "loop.toml", python=sys.executable, work_dir=tmp_path / "device")


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def models(effnet_compiled):
    return effnet_compiled / "model_float32.tflite", effnet_compiled / "model_int8.tflite"


def test_check_deploy_bench_report(target_path, models, tmp_path):
    _mk(target_path)
    target = load_target(str(target_path))
    device = open_device(target)
    try:
        assert device.info["device"]["machine"] == platform.machine()
        assert device.info["runtime"]["package"] in ("tflite-runtime", "ai-edge-litert")
        assert (tmp_path / "device" / "device_agent" / "__main__.py").is_file()
        first = device.deploy(models[1])
        assert first.uploaded and sha(first.remote_path) == sha(models[1])
        again = device.deploy(models[1])
        assert not again.uploaded and again.sha256 == first.sha256
    finally:
        device.conn.close()
    results = tmp_path / "results"
    outcomes = bench(list(models), [target], BenchOptions(warmup=1, runs=5, results_dir=results))
    assert outcomes[0].ok and len(outcomes[0].reports) == 2, outcomes
    report = json.loads(Path(outcomes[0].reports[1]).read_text())
    assert report["model"]["sha256"] == sha(models[1]) and report["host"]["label"] == "int8"
    assert report["target"]["name"] == "loop" and report["device"]["machine"] == platform.machine()
    assert report["settings"]["runs"] == 5 and report["latency_ms"]["p50"] > 0
    rows = {r.label: r for r in summarize(results)}
    assert rows["float32"].speedup_vs_float == pytest.approx(1.0)
    assert rows["int8"].speedup_vs_float == pytest.approx(rows["float32"].p50_ms / rows["int8"].p50_ms)
    cli = subprocess.run([*CLI, "report", str(results), "--json"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    summary = json.loads(cli.stdout)
    assert {r["label"] for r in summary["rows"]} == {"float32", "int8"}
    page = Path(summary["html"]).read_text()
    assert "<svg" in page and "int8" in page and "<script" not in page
    # Two targets on one machine are timed one after the other, not at once.
    seen = []
    both = bench([models[1]], [target, dataclasses.replace(target, name="twin")], BenchOptions(warmup=1, runs=2, results_dir=tmp_path / "r2"),
                 status=lambda name, text, done: seen.append((name, text)))
    assert [o.target for o in both] == ["loop", "twin"] and all(o.ok for o in both), both
    assert seen.index(("twin", "connecting")) > seen.index(("loop", "[green]done[/]")), seen


def test_targets_on_one_machine_share_a_key():
    pi = Target("pi", host="pi.local", port=22)
    assert machine_of(pi) == machine_of(Target("pi-2222", host="PI.local", port=2222)) != machine_of(Target("pi5", host="pi5.local"))
    assert machine_of(Target("arm", host="127.0.0.1", port=2222)) == machine_of(Target("loop", host="localhost")) \
        == machine_of(Target("qemu", host="10.0.0.9", emulated=True)) == "this host"


def test_unknown_host_key_refused_then_trusted_on_request(sshd, tmp_path):
    known = tmp_path / "kh" / "known_hosts"
    path = sshd.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=tmp_path / "d", known_hosts=str(known))
    target = load_target(str(path))
    with pytest.raises(DeviceError, match="unknown host key .*--trust-new-host-key"):
        Connection(target).connect()
    assert not known.exists()
    other = "# my notes\nsk.example sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIA== x"
    known.parent.mkdir()
    known.write_text(other)  # lines paramiko cannot parse must survive trust-on-first-use
    with Connection(target, trust_new_host_key=True) as conn:
        assert conn.trusted_key and conn.run(["echo", "hi"]).stdout == "hi\n"
    assert known.read_text().startswith(other + "\n") and f"[127.0.0.1]:{sshd.port}" in known.read_text()
    with Connection(target) as conn:  # now known: no trust needed
        assert conn.trusted_key is None


def test_changed_host_key_always_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other")
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    path = sshd.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=tmp_path / "d", known_hosts=str(known))
    for trust in (False, True):
        with pytest.raises(DeviceError, match="CHANGED"):
            Connection(load_target(str(path)), trust_new_host_key=trust).connect()
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {kind} {blob}\n"


def test_wrong_client_key_and_unreachable(sshd, tmp_path):
    wrong = keygen(tmp_path / "wrong")
    path = sshd.target_toml(_mk(tmp_path / "a.toml"), python=sys.executable, work_dir=tmp_path / "d")
    path.write_text(path.read_text().replace(str(sshd.client_key), str(wrong)))
    with pytest.raises(DeviceError, match="authentication failed"):
        Connection(load_target(str(path))).connect()
    closed = path.read_text().replace(f"port = {sshd.port}", f"port = {free_port()}").replace(str(wrong), str(sshd.client_key))
    path.write_text(closed)
    with pytest.raises(DeviceError, match="cannot reach"):
        Connection(load_target(str(path))).connect()
    path.write_text(closed.replace(str(sshd.client_key), str(tmp_path / "nope")))
    with pytest.raises(InputError, match="identity file"):
        Connection(load_target(str(path))).connect()


def test_sshd_killed_mid_upload_keeps_deployed_model(models, tmp_path):
    server = LoopbackSshd(tmp_path / "own-sshd").start()
    path = server.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=tmp_path / "device")
    deployed = tmp_path / "device" / "models" / "model.tflite"
    try:
        device = open_device(load_target(str(path)))
        device.deploy(models[1], "model.tflite")
        killed = []

        def kill_midway(sent: int, total: int) -> None:
            if sent > total // 4 and not killed:
                server.stop()
                killed.append(sent)

        with pytest.raises(DeviceError, match="upload of model_float32.tflite failed.*left as it was"):
            device.deploy(models[0], "model.tflite", progress=kill_midway)
        device.conn.close()
        assert killed and sha(deployed) == sha(models[1])
        server.start()
        device = open_device(load_target(str(path)))
        redo = device.deploy(models[0], "model.tflite")
        assert redo.uploaded and sha(deployed) == sha(models[0])
        # The dead upload's part is seconds old: it could be another upload of the same name still
        # running, so it stays until it has not been written to for STALE_PART_S.
        parts = [p for p in deployed.parent.iterdir() if p.name.endswith(".part")]
        assert len(parts) == 1
        live = deployed.parent / ".model.tflite.0123abcd.part"
        live.write_bytes(b"another upload, still running")
        an_hour_ago = time.time() - 3600
        os.utime(parts[0], (an_hour_ago, an_hour_ago))
        device.deploy(models[1], "model.tflite")
        device.conn.close()
        assert [p.name for p in deployed.parent.iterdir() if p.name.endswith(".part")] == [live.name]
        assert sha(deployed) == sha(models[1]) and not [p for p in deployed.parent.iterdir() if p.name.startswith(".clock.")]
        # With no part of the name left, a deploy lists the folder and does not read the device clock.
        live.unlink()
        device = open_device(load_target(str(path)))
        opened, sftp_open = [], device.conn.sftp.open
        device.conn.sftp.open = lambda p, *args, **kw: opened.append(p) or sftp_open(p, *args, **kw)
        assert not device.deploy(models[1], "model.tflite").uploaded
        device.conn.close()
        assert not [p for p in opened if ".clock." in p]
    finally:
        server.stop()


def test_corrupt_upload_and_corrupt_model_on_device(target_path, models, tmp_path, monkeypatch):
    _mk(target_path)
    target = load_target(str(target_path))
    device = open_device(target)
    deployed = tmp_path / "device" / "models" / "m.tflite"
    try:
        device.deploy(models[1], "m.tflite")
        real_put = device.conn.sftp.put

        def corrupting_put(local, remote, callback=None, confirm=True):
            damaged = tmp_path / "damaged.tflite"
            data = bytearray(Path(local).read_bytes())
            data[len(data) // 2] ^= 0xFF
            damaged.write_bytes(data)
            return real_put(str(damaged), remote, callback=callback, confirm=confirm)

        monkeypatch.setattr(device.conn.sftp, "put", corrupting_put)
        with pytest.raises(DeviceError, match="corrupt upload .*left as it was"):
            device.deploy(models[0], "m.tflite")
        assert sha(deployed) == sha(models[1])
        assert not [p for p in deployed.parent.iterdir() if p.name.endswith(".part")]
        monkeypatch.undo()
        deployed.write_bytes(models[1].read_bytes()[:4096])  # damaged on the device itself
        with pytest.raises(DeviceError, match="corrupt or truncated"):
            device.agent(["bench", str(deployed), "--runs", "1"])
        repaired = device.deploy(models[1], "m.tflite")  # the sha differs, so it is uploaded again
        assert repaired.uploaded and sha(deployed) == sha(models[1])
    finally:
        device.conn.close()


def test_device_without_runtime(sshd, tmp_path):
    env = blocked_runtime_env(tmp_path)
    wrapper = tmp_path / "python-no-runtime"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={env['PYTHONPATH']} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    path = sshd.target_toml(_mk(tmp_path / "t.toml"), python=str(wrapper), work_dir=tmp_path / "device")
    with pytest.raises(DeviceError, match="no TFLite runtime on the device; rerun with --install-runtime or pip install "
                                          "ai-edge-litert==2.3.0 there$"):  # what the selection picks for this x86_64 Python 3.11
        open_device(load_target(str(path)))


def _python_with(tmp_path: Path, name: str, packages: dict[str, str], **env) -> Path:
    """A device Python (a wrapper script) that sees ``packages`` (name -> __init__.py text) first."""
    extra = tmp_path / f"{name}-site"
    for pkg, init in packages.items():
        (extra / pkg).mkdir(parents=True, exist_ok=True)
        (extra / pkg / "__init__.py").write_text(init)
    settings = " ".join(f"{k}={v}" for k, v in {"PYTHONPATH": extra, **env}.items())
    wrapper = tmp_path / name
    wrapper.write_text(f"#!/bin/sh\n{settings} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def test_the_agent_uses_the_newest_runtime_and_reports_one_that_crashes_on_import(sshd, models, tmp_path):
    """Both runtimes present: ai-edge-litert is used and named in every document, errors included. A
    runtime whose import kills the process (as a wheel for another CPU does, SIGILL) is reported as
    such, by `info` at connect time and by a command that needs it, and the agent survives to say so."""
    both = _python_with(tmp_path, "python-both", {"tflite_runtime": "raise ImportError('an old runtime, never to be used')\n"})
    path = sshd.target_toml(_mk(tmp_path / "both.toml"), python=str(both), work_dir=tmp_path / "device")
    device = open_device(load_target(str(path)))
    try:
        assert device.info["runtime"] == {"package": "ai-edge-litert", "module": "ai_edge_litert.interpreter", "version": "2.1.0",
                                          "import": "ok"}
        dep = device.deploy(models[1], "m.tflite")
        bench = device.agent(["bench", dep.remote_path, "--runs", "1", "--warmup", "0"])
        assert bench["runtime"]["package"] == "ai-edge-litert" and device.agent(["hash", dep.remote_path])["runtime"]["package"] == "ai-edge-litert"
        with pytest.raises(DeviceError) as err:
            device.agent(["bench", str(tmp_path / "missing.tflite")])
        assert "missing.tflite" in str(err.value)
    finally:
        device.conn.close()
    error = subprocess.run([str(both), "-m", "device_agent", "bench", "missing.tflite"], capture_output=True, text=True,
                           cwd=tmp_path / "device")
    assert json.loads(error.stdout)["runtime"]["package"] == "ai-edge-litert"  # the error document names it too

    crashing = _python_with(tmp_path, "python-crash", {"ai_edge_litert": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"})
    path = sshd.target_toml(_mk(tmp_path / "crash.toml"), python=str(crashing), work_dir=tmp_path / "device")
    with pytest.raises(DeviceError, match=re.escape("target crash: ai-edge-litert 2.1.0 is on the device but its import crashed "
                                                    "(SIGSEGV); reinstall it or remove it")):
        open_device(load_target(str(path)))
    agent = subprocess.run([str(crashing), "-m", "device_agent", "bench", dep.remote_path, "--runs", "1"], capture_output=True,
                           text=True, cwd=tmp_path / "device")
    said = json.loads(agent.stdout)
    assert agent.returncode == 1 and said["kind"] == "runtime_broken"
    assert said["error"] == "ai-edge-litert is installed but its import crashed (SIGSEGV)"


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="mounting a tiny tmpfs needs root (in CI, a failure)")
def test_disk_full_leaves_deployed_model(sshd, models, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        path = sshd.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=mount / "device")
        device = open_device(load_target(str(path)))
        try:
            device.deploy(models[1], "m.tflite")  # 5 MB fits
            with pytest.raises(DeviceError, match="not enough disk.*left as it was"):
                device.deploy(models[0], "m.tflite")  # 18 MB does not
        finally:
            device.conn.close()
        assert sha(mount / "device" / "models" / "m.tflite") == sha(models[1])
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_names_and_paths_are_quoted(sshd, models, tmp_path):
    work = tmp_path / "work dir $(touch PWNED-dir)"
    path = sshd.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=work)
    device = open_device(load_target(str(path)))
    try:
        name = "we ird;$(touch PWNED) `touch PWNED2`.tflite"
        dep = device.deploy(models[1], name)
        assert Path(dep.remote_path) == work / "models" / name and sha(dep.remote_path) == sha(models[1])
        assert device.agent(["bench", dep.remote_path, "--runs", "1", "--warmup", "0"])["model"]["sha256"] == dep.sha256
        with pytest.raises(InputError, match="plain file name"):
            device.deploy(models[1], "../escape.tflite")
    finally:
        device.conn.close()
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.home().glob("PWNED*"))


def test_device_timer_leaves_deployed_models_alone(sshd, models, tmp_path):
    """tune's DeviceTimer times a model deployed by content where it is, uploads any other under a name
    of its own, and removes only those: the same bytes deployed by content meanwhile (as `bench`
    would) stay on the device."""
    from quantune_edge.tune.costs import DeviceTimer

    float_model, int8_model = models
    target = load_target(str(sshd.target_toml(_mk(tmp_path / "t.toml"), python=sys.executable, work_dir=tmp_path / "device")))
    folder = tmp_path / "device" / "models"
    device = open_device(target)
    try:
        int8_there = device.deploy(int8_model, by_content=True).remote_path
        # what a tune killed outright left two days ago, and a copy another tune is timing right now
        killed, running = folder / "timing-0badf00d-0123456789ab-model.tflite", folder / "timing-5afe5afe-0123456789ab-model.tflite"
        killed.write_bytes(b"left by a SIGKILL")
        running.write_bytes(b"in use")
        os.utime(killed, (time.time() - 2 * 86400,) * 2)
        logged = []
        with DeviceTimer(target, runs=1, rounds=1, warmup=0, log=logged.append) as timer:
            ms = timer.p50_by_model([int8_model, float_model, int8_model])
            timing_copies = [p.name for p in folder.iterdir() if p.name.startswith("timing-") and p != running]
            float_there = device.deploy(float_model, by_content=True)  # a bench deploying the same bytes meanwhile
        assert set(ms) == {int8_model, float_model} and min(ms.values()) > 0
        assert len(timing_copies) == 1 and timing_copies[0].endswith(Path(float_there.remote_path).name)
        assert float_there.uploaded  # its own file, not the timer's
        assert [m for m in logged if "killed tune left" in m] == [f"{target.name}: removed 1 timing copy a killed tune left ({killed.name})"]
    finally:
        device.conn.close()
    assert running.read_bytes() == b"in use"  # the other tune's copy stayed; the dead one went
    running.unlink()
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in (int8_there, float_there.remote_path))
    assert sha(folder / Path(float_there.remote_path).name) == sha(float_model)


def test_parallel_bench_one_target_failing(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    sshd.target_toml(_mk(folder / "good.toml"), python=sys.executable, work_dir=tmp_path / "device")
    bad = (folder / "good.toml").read_text().replace(f"port = {sshd.port}", f"port = {free_port()}")
    (folder / "dead.toml").write_text(bad)
    results = tmp_path / "results"
    cli = subprocess.run([*CLI, "bench", str(models[1]), "--target", "dead,good", "--targets-dir", str(folder),
                          "--runs", "3", "--warmup", "0", "--results", str(results), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 3, cli.stderr
    out = json.loads(cli.stdout)
    by_name = {o["target"]: o for o in out["outcomes"]}
    assert by_name["good"]["ok"] and len(by_name["good"]["reports"]) == 1
    assert not by_name["dead"]["ok"] and "cannot reach" in by_name["dead"]["error"]
    assert [r["target"] for r in out["results"]] == ["good"]
    assert (results / "good").is_dir() and not (results / "dead").exists()


def _package_index_reachable() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "index", "versions", "ai-edge-litert"], capture_output=True,
                          timeout=120).returncode == 0


# --install-runtime pip-installs from the package index, as it does on a real board: offline this test
# is skipped (and says why); in CI (CI=true), where the index is reachable, it must run.
@pytest.mark.skipif(not os.environ.get("CI") and not _package_index_reachable(),
                    reason="needs the package index (PyPI) for pip install ai-edge-litert")
def test_install_runtime_on_a_device_without_one(sshd, tmp_path):
    """A fresh venv with numpy only: refused without --install-runtime; with it but no way to the
    package index, one clear line and nothing installed; then the runtime the selection picks for this
    board (x86_64, Python 3.11) is pip-installed and used."""
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "numpy==1.26.4"], check=True, timeout=600)
    path = sshd.target_toml(tmp_path / "t.toml", python=str(venv / "bin" / "python"), work_dir=tmp_path / "device")
    with pytest.raises(DeviceError, match="no TFLite runtime"):
        open_device(load_target(str(path)))
    site = next((venv / "lib").glob("python3*/site-packages"))
    before = sorted(p.name for p in site.iterdir())
    offline = tmp_path / "python-offline"  # the index at a closed port, no local wheels or config: a device behind a firewall
    offline.write_text(f"#!/bin/sh\nPIP_CONFIG_FILE=/dev/null PIP_INDEX_URL=http://127.0.0.1:{free_port()}/simple PIP_RETRIES=0 "
                       f"exec {venv / 'bin' / 'python'} \"$@\"\n")
    offline.chmod(0o755)
    cut_off = sshd.target_toml(tmp_path / "offline.toml", python=str(offline), work_dir=tmp_path / "device")
    with pytest.raises(DeviceError) as err:
        open_device(load_target(str(cut_off)), install_runtime=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("target offline: pip install ai-edge-litert==2.3.0 failed (can the device "
                                                        "reach the package index?): ") and message.endswith("; nothing was installed")
    assert sorted(p.name for p in site.iterdir()) == before
    device = open_device(load_target(str(path)), install_runtime=True)
    device.conn.close()
    assert device.info["runtime"] == {"package": "ai-edge-litert", "module": "ai_edge_litert.interpreter", "version": "2.3.0",
                                      "import": "ok"}
    assert device.info["device"]["in_venv"] is True and device.info["device"]["libc"]["name"] == "glibc"


def test_check_and_deploy_cli(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    sshd.target_toml(folder / "loop.toml", python=sys.executable, work_dir=tmp_path / "device")
    check = subprocess.run([*CLI, "targets", "check", "loop", "--targets-dir", str(folder), "--json"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    facts = json.loads(check.stdout)
    assert facts["device"]["machine"] == platform.machine() and facts["work_dir"] == str(tmp_path / "device")
    from quantune_edge.deploy.runtimes import RUNTIMES, select_runtime

    selection = facts["runtime_selection"]  # the pins and the selection table, from their one place
    assert [r["runtime"] for r in selection] == [r.requirement for r in RUNTIMES]
    assert [r["runtime"] for r in selection if r["selected"]] == [select_runtime(facts["device"]).requirement]
    shown = subprocess.run([*CLI, "targets", "check", "loop", "--targets-dir", str(folder)], capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="200"))
    assert shown.returncode == 0 and "ai-edge-litert==2.3.0 (selected)" in shown.stdout + shown.stderr
    assert all(r.requirement in shown.stdout + shown.stderr for r in RUNTIMES)
    deploy = subprocess.run([*CLI, "deploy", str(models[1]), "--target", "loop", "--targets-dir", str(folder), "--name", "app.tflite"],
                            capture_output=True, text=True)
    assert deploy.returncode == 0 and "uploaded and verified" in deploy.stderr, deploy.stderr
    assert sha(tmp_path / "device" / "models" / "app.tflite") == sha(models[1])
    again = subprocess.run([*CLI, "deploy", str(models[1]), "--target", "loop", "--targets-dir", str(folder), "--name", "app.tflite"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "already there" in again.stderr


def test_server_gone_mid_command_is_an_error_not_a_hang(tmp_path):
    import threading
    import time

    server = LoopbackSshd(tmp_path / "own-sshd").start()
    path = server.target_toml(tmp_path / "t.toml", python=sys.executable, work_dir=tmp_path / "d")
    conn = Connection(load_target(str(path))).connect()
    timer = threading.Timer(1.0, server.stop)
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(DeviceError, match="connection lost while running sleep"):
            conn.run(["sleep", "60"], timeout=120)
        assert time.monotonic() - start < 30
    finally:
        timer.join()
        conn.close()
        server.stop()


def bad_model_files(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might pass as a model, each with the reason the host gives for refusing it."""
    from conftest import DEMO_IMAGES

    folder.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    (folder / "half.tflite").write_bytes(raw[: len(raw) // 2])
    (folder / "cut.tflite").write_bytes(raw[: len(raw) * 9 // 10])
    (folder / "notes.tflite").write_text("these are my notes, not a model\n")
    (folder / "photo.tflite").write_bytes(next(DEMO_IMAGES.glob("*.jpg")).read_bytes())
    (folder / "empty.tflite").write_bytes(b"")
    return {"half": (folder / "half.tflite", "not a valid .tflite model"), "cut": (folder / "cut.tflite", "not a valid .tflite model"),
            "text": (folder / "notes.tflite", "not a TFLite model (no TFL3 file identifier)"),
            "jpeg": (folder / "photo.tflite", "not a TFLite model (no TFL3 file identifier)"),
            "empty": (folder / "empty.tflite", "not a TFLite model (empty file)")}


def test_deploy_never_replaces_a_model_with_what_the_device_cannot_load(target_path, models, tmp_path):
    _mk(target_path)
    device = open_device(load_target(str(target_path)))
    folder = tmp_path / "device" / "models"
    try:
        device.deploy(models[1], "m.tflite")
        for name, (path, reason) in bad_model_files(models[1], tmp_path / "bad").items():
            with pytest.raises(InputError, match=re.escape(reason)):
                device.deploy(path, "m.tflite")
            assert sha(folder / "m.tflite") == sha(models[1]) and os.listdir(folder) == ["m.tflite"], name
        # a kernel the device's runtime lacks (from the probed table): refused on the host, op named, nothing uploaded
        newer = future_op_model(models[1], tmp_path / "newer.tflite", "ADD", 6)
        with pytest.raises(DeviceError, match=re.escape("target loop: its ai-edge-litert 2.1.0 cannot run newer.tflite: no kernel for "
                                                        "ADD version 6 (it has up to 5); nothing was uploaded (install ai-edge-litert "
                                                        "2.3.0 on the device)")):
            device.deploy(newer, "m.tflite")
        assert sha(folder / "m.tflite") == sha(models[1]) and os.listdir(folder) == ["m.tflite"]
        future = future_op_model(models[1], tmp_path / "future.tflite")
        with pytest.raises(DeviceError, match=r"cannot run future.tflite: no kernel for \w+ version 99 \(it has up to \d+\); "
                                              r"nothing was uploaded$"):  # no pinned runtime has it: nothing to suggest
            device.deploy(future, "m.tflite")
        # a runtime release the table does not know: the device's own load is the check, in a forked child
        device.info["runtime"] = {**device.info["runtime"], "version": "9.9.9"}
        with pytest.raises(DeviceError, match=r"the device's TFLite runtime cannot load future.tflite \(.*version '99'.*\); "
                                              r"the deployed model was left as it was"):
            device.deploy(future, "m.tflite")
        assert sha(folder / "m.tflite") == sha(models[1]) and os.listdir(folder) == ["m.tflite"]  # the .part went too
    finally:
        device.conn.close()


def test_deploy_and_bench_cli_refuse_bad_models_in_one_line(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    sshd.target_toml(folder / "loop.toml", python=sys.executable, work_dir=tmp_path / "device")
    bad = bad_model_files(models[1], tmp_path / "bad")
    for path, reason in (bad["text"], bad["half"]):
        for args in (["deploy", str(path), "--target", "loop", "--name", "app.tflite"],
                     ["bench", str(path), "--target", "loop", "--results", str(tmp_path / "results")]):
            cli = subprocess.run([*CLI, *args, "--targets-dir", str(folder)], capture_output=True, text=True, timeout=300)
            lines = cli.stderr.strip().splitlines()
            assert cli.returncode == 2 and len(lines) == 1 and reason in lines[0], cli.stderr
    assert not (tmp_path / "device" / "models").exists() or not os.listdir(tmp_path / "device" / "models")
    assert not (tmp_path / "results").exists()


def test_trusting_a_new_host_key_says_which_and_where(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    known = tmp_path / "kh" / "known_hosts"
    sshd.target_toml(folder / "loop.toml", python=sys.executable, work_dir=tmp_path / "device", known_hosts=str(known))
    cli = subprocess.run([*CLI, "deploy", str(models[1]), "--target", "loop", "--targets-dir", str(folder), "--trust-new-host-key"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    said = " ".join(cli.stderr.split())  # rich wraps long lines
    fingerprint = re.search(r"trusted a new host key: \[127.0.0.1\]:\d+ ssh-ed25519 (SHA256:[A-Za-z0-9+/]+), recorded in (\S+)", said)
    assert fingerprint and fingerprint.group(2) == str(known), cli.stderr
    assert subprocess.run(["ssh-keygen", "-lf", str(known)], capture_output=True, text=True).stdout.split()[1] == fingerprint.group(1)


def _listener(mode: str):
    """A loopback port that answers but is not SSH: it closes at once, speaks HTTP, or stays silent."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if mode == "close":
                conn.close()
            elif mode == "http":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.close()
            else:
                held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize("mode", ["close", "http", "silent", "refused"])
def test_a_port_that_is_not_ssh_is_one_clear_line(mode, tmp_path):
    server = _listener(mode) if mode != "refused" else None
    port = server.getsockname()[1] if server else free_port()
    (tmp_path / "t.toml").write_text(f'host = "127.0.0.1"\nport = {port}\nidentity_file = "{keygen(tmp_path / "k")}"\n'
                                     f'known_hosts = "{tmp_path / "kh"}"\nconnect_timeout_s = 1.0\n')
    try:
        start = time.monotonic()
        cli = subprocess.run([*CLI, "targets", "check", str(tmp_path / "t.toml")], capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
    finally:
        if server:
            server.close()
    *notes, error = cli.stderr.strip().splitlines()
    assert cli.returncode == 3 and "Traceback" not in cli.stderr and "Exception" not in cli.stderr, cli.stderr
    assert not notes or (mode in ("silent", "refused") and " ".join(notes).endswith("retrying once")), cli.stderr  # the one retry, said
    lines = [error]
    expected = {"close": "the port answers but is not an SSH server", "http": "the port answers but is not an SSH server",
                "silent": "no SSH answer within 1 s (connect_timeout_s in the target file)", "refused": "connection refused"}[mode]
    assert lines[0].startswith(f"error: target t: cannot reach 127.0.0.1:{port}: {expected}"), lines[0]
    if mode in ("close", "http"):
        assert "retrying" not in cli.stderr and seconds < 60  # a wrong answer is not tried twice


def test_bench_with_every_target_failing_promises_no_results_folder(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    sshd.target_toml(_mk(folder / "good.toml"), python=sys.executable, work_dir=tmp_path / "device")
    (folder / "dead.toml").write_text((folder / "good.toml").read_text().replace(f"port = {sshd.port}", f"port = {free_port()}"))
    results = tmp_path / "results"
    cli = subprocess.run([*CLI, "bench", str(models[1]), "--target", "dead", "--targets-dir", str(folder), "--runs", "1",
                          "--results", str(results)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 3 and "0/1 targets ok; no report written" in cli.stderr, cli.stderr
    assert not results.exists()


def test_bench_and_report_write_only_their_own_folders_and_pages(sshd, models, tmp_path):
    folder = tmp_path / "targets"
    sshd.target_toml(_mk(folder / "loop.toml"), python=sys.executable, work_dir=tmp_path / "device")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    base = [*CLI, "bench", str(models[1]), "--target", "loop", "--targets-dir", str(folder), "--runs", "1", "--warmup", "0"]
    for results, message in ((mine, "holds files and is not a bench results folder (no .quantune-results)"),
                             (models[1].parent, "holds the model model_int8.tflite, an input of this command")):
        cli = subprocess.run([*base, "--results", str(results)], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and message in cli.stderr, cli.stderr
    results = tmp_path / "results"
    assert subprocess.run([*base, "--results", str(results)], capture_output=True, text=True, timeout=300).returncode == 0
    assert (results / ".quantune-results").is_file()
    report = [*CLI, "report", str(results)]
    for page, message in ((mine / "thesis.tex", "exists and is not a page quantune-edge wrote; not replaced"),
                          (mine, "is a folder, not an HTML page")):
        cli = subprocess.run([*report, "--html", str(page)], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2 and message in cli.stderr, cli.stderr
    assert (mine / "thesis.tex").read_text() == "keep"
    for _ in range(2):  # a page it wrote is replaced
        cli = subprocess.run([*report, "--html", str(mine / "page.html")], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
    assert "quantune-edge benchmark report" in (mine / "page.html").read_text()
