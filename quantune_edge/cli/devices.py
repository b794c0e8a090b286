"""`targets` (and `targets emulate`), `deploy`, `bench`, `report`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from quantune_edge.cli.shared import InstallRuntime, JsonOut, Quiet, TargetsDir, TrustNew, app, emulate_app, load_targets, one_line_errors, print_json, print_results, targets_app
from quantune_edge.common.console import Reporter


@targets_app.command("list")
def targets_list_cmd(targets_dir: TargetsDir = None, json_out: JsonOut = False) -> None:
    """List the targets and their addresses."""
    from quantune_edge.deploy.targets import list_targets
    from quantune_edge.deploy.targets import targets_dir as resolve_dir

    with one_line_errors():
        targets, problems = list_targets(targets_dir)
        folder = resolve_dir(targets_dir)
    if json_out:
        print_json({"folder": str(folder), "targets": [t.to_dict() for t in targets], "problems": problems})
        return
    reporter = Reporter()
    table = Table(title=f"targets in {folder}", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("name", "address", "threads", "description"):
        table.add_column(col)
    for t in targets:
        table.add_row(t.name, t.address, str(t.threads), t.description + (" [yellow](emulated)[/]" if t.emulated else ""))
    reporter.console.print(table)
    for problem in problems:
        reporter.warn(problem)


@targets_app.command("check")
def targets_check_cmd(
    name: Annotated[str, typer.Argument(help="Target name (targets/NAME.toml) or path to a .toml.")],
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    json_out: JsonOut = False,
) -> None:
    """Connect, install the agent, and report arch, Python, TFLite runtime and free disk."""
    from quantune_edge.deploy.device import open_device

    reporter = Reporter(quiet=json_out)
    with one_line_errors():
        (target,) = load_targets(name, targets_dir)
        device = open_device(target, trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, log=reporter.info)
        device.conn.close()
    from quantune_edge.deploy.runtimes import selection_table

    info = device.info
    selection = selection_table(info["device"])
    if json_out:
        print_json({"target": target.to_dict(), "work_dir": device.work_dir, **info, "runtime_selection": selection})
        return
    dev, rt = info["device"], info["runtime"]
    libc = dev.get("libc") or {}
    reporter.console.print(
        f"[bold]{target.name}[/] ({target.address}{', emulated' if target.emulated else ''}): {dev['machine']}, {dev['cpu_count']} cores, "
        f"{dev['os']}, Python {dev['python']}, {libc.get('name') or 'libc'} {libc.get('version') or '?'}, {rt['package']} {rt['version']}, "
        f"{dev['free_disk_bytes'] / 2**30:.1f} GiB free in {device.work_dir}")
    table = Table(title="device runtimes (--install-runtime installs the selected one)", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("runtime", "Python", "wheels", "fits this board", "kernels known"):
        table.add_column(col)
    for row in selection:
        table.add_row(("[bold green]" if row["selected"] else "") + row["runtime"] + (" (selected)[/]" if row["selected"] else ""),
                      row["python"], row["machines"], row["fits"], "yes" if row["kernels_known"] else "no")
    reporter.console.print(table)


Suite = Annotated[str, typer.Option("--suite", help="Which emulated board: bookworm (Python 3.11) or trixie "
                                                      "(today's Raspberry Pi OS base, Python 3.13).")]


@emulate_app.command("up")
def emulate_up_cmd(
    port: Annotated[Optional[int], typer.Option("--port", help="Loopback port for the board's sshd (default: bookworm 2222, "
                                                               "trixie 2223).")] = None,
    mirror: Annotated[Optional[str], typer.Option("--mirror", help="Debian mirror (default: the host's apt sources).")] = None,
    suite: Suite = "bookworm",
    json_out: JsonOut = False,
) -> None:
    """Build (once, cached) and start an emulated ARM board; prints its target file."""
    from quantune_edge.deploy import emulator

    reporter = Reporter(quiet=json_out)
    with one_line_errors():
        state = emulator.up(port, suite=suite, mirror=mirror, log=reporter.info)
    if json_out:
        print_json(state.to_dict())
    else:
        reporter.console.print(f"emulated ARM board ({state.suite}, {state.runtime}) running: sshd pid {state.pid} on "
                               f"127.0.0.1:{state.port}; target file {state.target_file} (use --target {state.target_file})")


@emulate_app.command("down")
def emulate_down_cmd(suite: Suite = "bookworm", json_out: JsonOut = False) -> None:
    """Stop an emulated board's sshd and unmount its userland."""
    from quantune_edge.deploy import emulator

    with one_line_errors():
        state = emulator.down(suite=suite)
    if json_out:
        print_json(state.to_dict())
    else:
        Reporter().console.print(f"emulated ARM board stopped ({state.folder})")


@emulate_app.command("status")
def emulate_status_cmd(suite: Suite = "bookworm", json_out: JsonOut = False) -> None:
    """Is an emulated board built and running?"""
    from quantune_edge.deploy import emulator

    with one_line_errors():
        state = emulator.status(suite=suite)
    if json_out:
        print_json(state.to_dict())
        return
    size = f", {state.rootfs_bytes / 1e6:.0f} MB" if state.rootfs_bytes else ""
    Reporter().console.print(f"{state.folder} ({state.suite}): {'built' if state.built else 'not built'}{size}"
                             + (f", {state.runtime}" if state.runtime else "") + "; "
                             + (f"running (sshd pid {state.pid}, port {state.port})" if state.running else "stopped"))


@app.command("deploy")
def deploy_cmd(
    model: Annotated[Path, typer.Argument(help=".tflite model to put on the device.")],
    target: Annotated[str, typer.Option("--target", help="Target name or .toml path.")],
    name: Annotated[Optional[str], typer.Option("--name", help="File name on the device (default: the model's).")] = None,
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    json_out: JsonOut = False,
) -> None:
    """Upload a model (temp name, sha256 checked on the device, then an atomic rename)."""
    from quantune_edge.deploy.device import check_model_file, open_device

    reporter = Reporter(quiet=json_out)
    with one_line_errors():
        check_model_file(model)  # before connecting: a file that is not a model never reaches the device
        (tgt,) = load_targets(target, targets_dir)
        device = open_device(tgt, trust_new_host_key=trust_new_host_key, install_runtime=install_runtime, log=reporter.info)
        try:
            deployment = device.deploy(model, name)
        finally:
            device.conn.close()
    if json_out:
        print_json({**deployment.to_dict(), "device": device.info["device"], "runtime": device.info["runtime"]})
    else:
        what = "uploaded and verified" if deployment.uploaded else "already there (same sha256)"
        reporter.console.print(f"{model.name} -> {tgt.name}:{deployment.remote_path}: {what} ({deployment.sha256[:12]}, "
                               f"{deployment.size_bytes / 1e6:.2f} MB, {deployment.seconds:.1f} s; device {device.info['device']['machine']})")


@app.command("bench")
def bench_cmd(
    models: Annotated[list[Path], typer.Argument(help=".tflite models to benchmark.")],
    target: Annotated[str, typer.Option("--target", help="Target name(s), comma-separated; run in parallel.")],
    warmup: Annotated[int, typer.Option("--warmup")] = 10,
    runs: Annotated[int, typer.Option("--runs")] = 100,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Interpreter threads (default: the target's).")] = None,
    no_xnnpack: Annotated[bool, typer.Option("--no-xnnpack", help="Builtin kernels instead of the XNNPACK delegate.")] = False,
    results: Annotated[Path, typer.Option("--results", help="Where reports are saved.")] = Path("results"),
    targets_dir: TargetsDir = None,
    trust_new_host_key: TrustNew = False,
    install_runtime: InstallRuntime = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Deploy (if needed) and benchmark models on one or more targets; reports go to --results."""
    from quantune_edge.measure.latency import BenchOptions, bench_with_progress
    from quantune_edge.measure.saved import summarize

    reporter = Reporter(quiet=quiet or json_out)
    with one_line_errors():
        tgts = load_targets(target, targets_dir)
        options = BenchOptions(warmup=warmup, runs=runs, threads=threads, xnnpack=not no_xnnpack, install_runtime=install_runtime,
                               trust_new_host_key=trust_new_host_key, results_dir=results)
        outcomes = bench_with_progress(models, tgts, options, reporter)
    failed = [o for o in outcomes if not o.ok]
    saved = {p for o in outcomes for p in o.reports}
    if json_out:
        rows = [r.to_dict() for r in summarize(results) if r.report in saved] if saved else []
        print_json({"outcomes": [o.to_dict() for o in outcomes], "results": rows})
    else:
        if saved:
            print_results(reporter, [r for r in summarize(results) if r.report in saved])
        for o in failed:
            typer.echo(f"error: {o.error}", err=True)
        reporter.info(f"{len(outcomes) - len(failed)}/{len(outcomes)} targets ok; "
                      + (f"{len(saved)} report(s) in {results}/" if saved else "no report written"))
    if failed:
        raise typer.Exit(3)


@app.command("report")
def report_cmd(
    results: Annotated[Path, typer.Argument(help="Results folder written by 'bench'.")] = Path("results"),
    html_path: Annotated[Optional[Path], typer.Option("--html", help="HTML page to write (default RESULTS/report.html).")] = None,
    json_out: JsonOut = False,
) -> None:
    """Compare float / int8 / mixed per target (latest report of each) and write an HTML page."""
    from quantune_edge.common.outputs import check_output_page, write_page
    from quantune_edge.measure.saved import summarize
    from quantune_edge.report.bench_page import render_html

    page = html_path or results / "report.html"
    with one_line_errors():
        rows = summarize(results)
        check_output_page(page, "--html", {"the results folder": results})
        write_page(page, render_html(rows))
    if json_out:
        print_json({"schema_version": 1, "kind": "bench_summary", "rows": [r.to_dict() for r in rows], "html": str(page)})
        return
    reporter = Reporter()
    print_results(reporter, rows)
    reporter.info(f"wrote {page}")
