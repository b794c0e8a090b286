"""The device runtime selection table and the kernels each pinned runtime has (issue 28)."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
from conftest import future_op_model

from quantune_edge.deploy import runtimes
from quantune_edge.errors import DeviceError
from quantune_edge.model import tflite_graph


def board(machine: str, python: str, glibc: str | None) -> dict:
    return {"machine": machine, "python": python, "libc": {"name": "glibc", "version": glibc} if glibc else {"name": "", "version": ""}}


@pytest.mark.parametrize("facts, chosen", [
    (board("aarch64", "3.13.5", "2.41"), "ai-edge-litert==2.3.0"),  # Raspberry Pi OS trixie (today's)
    (board("aarch64", "3.11.2", "2.36"), "ai-edge-litert==2.3.0"),  # bookworm: both load our models, the newest is taken
    (board("aarch64", "3.9.2", "2.31"), "ai-edge-litert==2.1.0"),   # bullseye: 2.3.0 has no cp39 wheel
    (board("armv7l", "3.11.2", "2.36"), "tflite-runtime==2.14.0"),  # 32-bit bookworm: only tflite-runtime builds armv7l
    (board("x86_64", "3.11.7", "2.36"), "ai-edge-litert==2.3.0"),
])
def test_the_newest_runtime_with_a_wheel_for_the_board_is_chosen(facts, chosen):
    assert runtimes.select_runtime(facts).requirement == chosen
    rows = runtimes.selection_table(facts)
    assert [r["runtime"] for r in rows if r["selected"]] == [chosen]
    assert all(r["kernels_known"] for r in rows)


@pytest.mark.parametrize("facts, said", [
    (board("armv7l", "3.13.5", "2.41"), "no TFLite runtime wheel for armv7l with Python 3.13 and glibc 2.41: ai-edge-litert has no "
                                         "armv7l wheel; tflite-runtime 2.14.0 has wheels for Python 3.8-3.11 only"),
    (board("armv7l", "3.9.2", "2.31"), "no TFLite runtime wheel for armv7l with Python 3.9 and glibc 2.31: ai-edge-litert has no "
                                        "armv7l wheel; tflite-runtime 2.14.0 needs glibc 2.34+ on armv7l"),
    (board("aarch64", "3.12.1", None), "no TFLite runtime wheel for aarch64 with Python 3.12 and no glibc: ai-edge-litert 2.3.0 needs "
                                        "glibc 2.27+ on aarch64; ai-edge-litert 2.1.0 needs glibc 2.27+ on aarch64; tflite-runtime "
                                        "2.14.0 has wheels for Python 3.8-3.11 only"),
])
def test_a_board_no_runtime_fits_gets_one_line_naming_what_is_missing(facts, said):
    with pytest.raises(DeviceError) as err:
        runtimes.select_runtime(facts)
    assert str(err.value) == said


def test_bad_facts_are_one_line():
    with pytest.raises(DeviceError, match="no usable Python version"):
        runtimes.select_runtime({"machine": "aarch64", "python": "", "libc": {}})


def test_the_table_holds_what_the_host_runtime_loads():
    """The table's row for the host's own runtime is what probing it again finds, op by op."""
    from ai_edge_litert import interpreter

    label = f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}"
    assert runtimes.probe_op_versions(interpreter) == runtimes.supported_op_versions()[label]


def test_tflite_runtime_2_14_lacks_kernels_the_newer_runtimes_have():
    table = runtimes.supported_op_versions()
    old, new = table["tflite-runtime 2.14.0"], table["ai-edge-litert 2.3.0"]
    assert all(new.get(op, 0) >= v for op, v in old.items())  # the newer runtime is a superset
    assert old["FULLY_CONNECTED"] < new["FULLY_CONNECTED"] and old["STABLEHLO_ADD"] == 0


def test_kernels_missing_names_the_op_and_its_version(effnet_compiled, tmp_path):
    model = effnet_compiled / "model_int8.tflite"
    graph = tflite_graph.read(model)
    assert graph.op_versions["CONV_2D"] >= 1 and "DEQUANTIZE" in graph.op_versions or "QUANTIZE" in graph.op_versions
    for r in runtimes.RUNTIMES:  # TF 2.19's converter output runs on every pinned runtime
        assert runtimes.kernels_missing(graph.op_versions, r.package, r.version) == [], r.label
    future = tflite_graph.read(future_op_model(model, tmp_path / "future.tflite"))
    (raised,) = [op for op, v in future.op_versions.items() if v == 99]
    has = runtimes.supported_op_versions()["tflite-runtime 2.14.0"][raised]
    assert runtimes.kernels_missing(future.op_versions, "tflite-runtime", "2.14.0") == [f"{raised} version 99 (it has up to {has})"]
    assert runtimes.kernels_missing({"STABLEHLO_ADD": 1, "CUSTOM:Foo": 3}, "tflite-runtime", "2.14.0") == ["STABLEHLO_ADD version 1 (no kernel at all)"]
    assert runtimes.kernels_missing(graph.op_versions, "tflite-runtime", "2.15.0") is None  # not in the table


def _package_index_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.environ.get("CI") and not _package_index_reachable(),
                    reason="needs the package index (PyPI); in CI (CI=true) it must run")
@pytest.mark.parametrize("machine, python, glibc", [("armv7l", "3.11", "2.36"), ("armv7l", "3.13", "2.41"), ("aarch64", "3.9", "2.31")])
def test_the_table_matches_the_wheels_the_package_index_has(machine, python, glibc, tmp_path):
    """What the selection says about a board is what pip finds for it: the chosen wheel exists, and
    where nothing fits, no pinned runtime has a wheel."""
    facts = board(machine, python, glibc)
    try:
        chosen = [runtimes.select_runtime(facts)]
    except DeviceError:
        chosen = []
    for r in runtimes.RUNTIMES:
        tag = python.replace(".", "")
        platforms = [a for p in runtimes.pip_platforms(machine, runtimes.board_of(facts)[2]) for a in ("--platform", p)]
        proc = subprocess.run([sys.executable, "-m", "pip", "download", r.requirement, "--no-deps", "--only-binary=:all:", "--quiet",
                               *platforms, "--python-version", python, "--abi", f"cp{tag}",
                               "--implementation", "cp", "-d", str(tmp_path)], capture_output=True, text=True, timeout=600)
        fits = r.misfit(*runtimes.board_of(facts)) is None
        assert (proc.returncode == 0) == fits, (r.label, machine, python, proc.stderr[-500:])
        if r in chosen:
            assert fits


def test_the_agent_names_the_package_the_selection_picks():
    """The agent's runtime_missing hint (it cannot import the host's table) agrees with the table."""
    from device_agent.runtime import runtime_for

    for machine in ("aarch64", "armv7l", "x86_64"):
        for minor in range(8, 15):
            try:
                expected = runtimes.select_runtime(board(machine, f"3.{minor}.0", "2.41")).package
            except DeviceError:
                expected = "(no runtime has a wheel for this machine and Python)"
            assert runtime_for(machine, (3, minor)) == expected, (machine, minor)
