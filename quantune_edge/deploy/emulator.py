"""Emulated Raspberry Pi boards: Debian arm64 userlands under qemu-user, each with its own sshd.

Two boards, one per Raspberry Pi OS base: bookworm (Python 3.11) and trixie (today's, Python 3.13).
``up`` builds a board's userland once (debootstrap, cached in its own folder), unpacks into it the
aarch64 wheel of the runtime the selection picks for its Python and glibc (``runtimes.select_runtime``,
as ``--install-runtime`` does on a real board), and starts the userland's sshd on a loopback port with
key-only auth. It writes the connection facts (a target TOML, a client key and the host key for
known_hosts) into the board's folder, so deploying to it goes through exactly the same SSH path as a
real board. Latency measured there is emulated (qemu translates every instruction): good for
pipeline tests, never a Pi's figure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from quantune_edge.deploy import runtimes
from quantune_edge.errors import DeviceError, InputError

PACKAGES = ("openssh-server", "python3", "python3-numpy")


@dataclass(frozen=True)
class Board:
    """One emulated board: its Debian suite, default port and target name never collide with another's."""

    suite: str
    default_port: int
    target_name: str


BOARDS = {b.suite: b for b in (Board("bookworm", 2222, "local-arm"), Board("trixie", 2223, "local-arm-trixie"))}
DEFAULT_SUITE = "bookworm"
# No /sys: with the x86 host's /sys and /proc both in view, ai-edge-litert 2.3.0's CPU detection
# crashes (SIGSEGV) loading any model under qemu-user; with either alone, or on a real board, it does not.
BIND_MOUNTS = ("proc", "dev", "dev/pts")
UNMOUNTS = ("proc", "sys", "dev", "dev/pts")  # what a board started by an older version may still have mounted
BINFMT = Path("/proc/sys/fs/binfmt_misc")
SSHD_CONFIG = "/etc/ssh/quantune_sshd_config"


def board(suite: str) -> Board:
    if suite not in BOARDS:
        raise InputError(f"unknown emulated board suite {suite!r}: choose {' or '.join(BOARDS)}")
    return BOARDS[suite]


def emulator_dir(suite: str = DEFAULT_SUITE) -> Path:
    """A board's folder: the bookworm board's where it always was, the others beside it (``emulator-trixie``)."""
    base = Path(os.environ.get("QUANTUNE_EDGE_EMULATOR_DIR", "~/.cache/quantune-edge/emulator")).expanduser()
    return base if board(suite).suite == DEFAULT_SUITE else base.with_name(f"{base.name}-{suite}")


@dataclass
class EmulatorStatus:
    folder: str
    suite: str
    built: bool
    running: bool
    pid: int | None = None
    port: int | None = None
    rootfs_bytes: int | None = None
    target_file: str | None = None
    runtime: str | None = None  # the runtime unpacked into the userland ("ai-edge-litert==2.3.0")

    def to_dict(self) -> dict:
        return asdict(self)


def host_debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The host's own Debian mirror (from its apt sources), so nothing names a host in the repo."""
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and any(s in (*BOARDS, "stable") for s in suites.group(1).split()):
                return uris.group(1)
    for path in [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) in (*BOARDS, "stable"):
                    return m.group(1)
    raise DeviceError("no Debian mirror in the host's apt sources; pass --mirror URL")


def _require_host() -> None:
    if os.geteuid() != 0:
        raise DeviceError("the emulated target needs root (debootstrap, chroot and bind mounts)")
    missing = [tool for tool in ("debootstrap", "update-binfmts", "chroot") if shutil.which(tool) is None]
    if missing or not Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P").exists() and shutil.which("qemu-aarch64-static") is None:
        raise DeviceError("the emulated target needs Debian's qemu-user-static, debootstrap and binfmt-support: "
                          "apt-get install qemu-user-static debootstrap binfmt-support")


def _enable_binfmt() -> None:
    """Register qemu-aarch64 with binfmt_misc (fix-binary, so it also works inside the chroot)."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise DeviceError("could not register qemu-aarch64 with binfmt_misc (is /proc/sys/fs/binfmt_misc available?)")


def _run(argv: list[str], what: str, timeout: float = 1800) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DeviceError(f"emulator: {what} failed (exit {proc.returncode}): {tail[0]}")


RUNTIME_MARKER = ".quantune-runtime"


def board_facts(rootfs: Path) -> dict:
    """The userland's own Python, machine and glibc, as the agent's ``info`` reports them on a board."""
    code = ("import json, platform; print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
            "'libc': dict(zip(('name', 'version'), platform.libc_ver()))}))")
    proc = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise DeviceError(f"emulator: the userland's python3 did not run: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _install_runtime(rootfs: Path, folder: Path, log: Callable[[str], None]) -> runtimes.Runtime:
    """pip-download, on the host, the aarch64 wheel of the runtime the selection picks for the
    userland's Python and glibc, and unpack it into the userland (its only dependency it needs to
    load models is numpy, which Debian's python3-numpy provides; the userland has no pip, as a
    minimal image has none). Another runtime unpacked before is removed first."""
    facts = board_facts(rootfs)
    runtime = runtimes.select_runtime(facts)
    machine, (major, minor), glibc = runtimes.board_of(facts)
    assert glibc is not None  # select_runtime needs it
    site = rootfs / f"usr/local/lib/python{major}.{minor}/dist-packages"
    marker = site / RUNTIME_MARKER
    if marker.is_file() and marker.read_text().strip() == runtime.requirement:
        return runtime
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{runtime.package.replace('-', '_')}-{runtime.version}-cp{major}{minor}-*{machine}.whl"
    if not list(wheels.glob(pattern)):
        log(f"downloading the {machine} {runtime.requirement} wheel for Python {major}.{minor}")
        platforms = [arg for tag in runtimes.pip_platforms(machine, glibc) for arg in ("--platform", tag)]
        _run([sys.executable, "-m", "pip", "download", runtime.requirement, "--no-deps", "--only-binary=:all:",
              *platforms, "--python-version", f"{major}.{minor}", "--abi", f"cp{major}{minor}",
              "--implementation", "cp", "-d", str(wheels), "-q"], f"pip download of the {machine} {runtime.requirement} wheel")
    site.mkdir(parents=True, exist_ok=True)
    for old in [*site.glob("tflite_runtime*"), *site.glob("ai_edge_litert*")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    with zipfile.ZipFile(sorted(wheels.glob(pattern))[-1]) as zf:
        zf.extractall(site)
    _run(["chroot", str(rootfs), "/usr/bin/python3", "-c", f"import {runtime.module}, numpy"], f"importing {runtime.module} in the userland")
    marker.write_text(runtime.requirement + "\n")
    return runtime


def installed_runtime(rootfs: Path) -> str | None:
    found = sorted(rootfs.glob(f"usr/local/lib/python3*/dist-packages/{RUNTIME_MARKER}"))
    return found[-1].read_text().strip() if found else None


def build(folder: Path, suite: str, mirror: str | None, log: Callable[[str], None]) -> Path:
    """The cached userland; built into ``rootfs.partial`` and renamed only when complete. A userland
    built before holds whatever runtime the selection picked then: it is replaced when that changed."""
    rootfs = folder / "rootfs"
    if (rootfs / ".quantune-complete").is_file():
        _install_runtime(rootfs, folder, log)
        return rootfs
    partial = folder / "rootfs.partial"
    bootstrapped = partial / ".quantune-debootstrapped"  # a later step failed (say, the wheel download): keep the userland
    if partial.exists() and not bootstrapped.is_file():
        _unmount(partial)
        shutil.rmtree(partial)
    if not partial.exists():
        folder.mkdir(parents=True, exist_ok=True)
        mirror = mirror or host_debian_mirror()
        log(f"building the Debian {suite} arm64 userland from {mirror} (once; about 3-5 minutes)")
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(partial), mirror],
             "debootstrap")
        bootstrapped.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    _install_runtime(partial, folder, log)
    _run(["chroot", str(partial), "/usr/bin/ssh-keygen", "-A"], "host key generation in the userland")
    (partial / ".quantune-complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    if rootfs.exists():
        shutil.rmtree(rootfs)
    partial.rename(rootfs)
    return rootfs


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as fh:
        return any(line.split()[1] == target for line in fh)


def _mount(rootfs: Path) -> None:
    for sub in BIND_MOUNTS:
        point = rootfs / sub
        point.mkdir(parents=True, exist_ok=True)
        if not _mounted(point):
            _run(["mount", "--bind", f"/{sub}", str(point)], f"bind-mounting /{sub}")


def _unmount(rootfs: Path) -> None:
    for sub in reversed(UNMOUNTS):
        point = rootfs / sub
        if point.exists() and _mounted(point):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _processes_in(rootfs: Path) -> list[int]:
    root = str(rootfs.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == root:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _state(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _client_key(folder: Path, rootfs: Path) -> Path:
    key = folder / "id_ed25519"
    if not key.is_file():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "quantune-edge-emulator", "-f", str(key)], "client key")
    ssh = rootfs / "root/.ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    os.chmod(ssh / "authorized_keys", 0o600)
    return key


def _write_target(folder: Path, spec: Board, port: int, key: Path) -> Path:
    path = folder / f"{spec.target_name}.toml"
    path.write_text(
        f'description = "Emulated Raspberry Pi-class board: Debian {spec.suite} arm64 under qemu-user (latency is NOT a Pi\'s)"\n'
        f'host = "127.0.0.1"\nport = {port}\nuser = "root"\nidentity_file = "{key}"\n'
        f'known_hosts = "{folder / "known_hosts"}"\npython = "python3"\nwork_dir = "/root/quantune-edge"\n'
        "threads = 2\nemulated = true\ncommand_timeout_s = 1800.0\n")
    return path


def _wait_port(port: int, pid: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise DeviceError(f"emulator: sshd exited at start (port {port} taken?); see its log in the userland's /var/log/quantune-sshd.log")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeviceError(f"emulator: sshd did not open 127.0.0.1:{port} within {seconds:.0f} s")


def up(port: int | None = None, *, suite: str = DEFAULT_SUITE, mirror: str | None = None, folder: Path | None = None,
       log: Callable[[str], None] = lambda _m: None) -> EmulatorStatus:
    """Build (once) and start the emulated board of ``suite`` (on its default port unless ``port``);
    idempotent when it already runs on that port."""
    spec = board(suite)
    port = spec.default_port if port is None else port
    folder = folder or emulator_dir(suite)
    _require_host()
    _enable_binfmt()
    current = status(folder, disk_usage=False, suite=suite)
    if current.running:
        if current.port != port:
            flag = "" if suite == DEFAULT_SUITE else f" --suite {suite}"
            raise DeviceError(f"emulator already running on port {current.port}; run 'targets emulate down{flag}' first")
        return status(folder, suite=suite)
    rootfs = build(folder, suite, mirror, log)
    _mount(rootfs)
    key = _client_key(folder, rootfs)
    (rootfs / "run/sshd").mkdir(parents=True, exist_ok=True)
    (rootfs / SSHD_CONFIG.lstrip("/")).write_text(
        f"Port {port}\nListenAddress 127.0.0.1\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\nHostKey /etc/ssh/ssh_host_rsa_key\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nAuthorizedKeysFile .ssh/authorized_keys\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\nPidFile /run/quantune-sshd.pid\n")
    log(f"starting the userland's sshd on 127.0.0.1:{port}")
    proc = subprocess.Popen(["chroot", str(rootfs), "/usr/sbin/sshd", "-D", "-f", SSHD_CONFIG, "-E", "/var/log/quantune-sshd.log"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port, proc.pid)
    except DeviceError:
        _stop(folder, rootfs, proc.pid)
        raise
    host_key = (rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    target = _write_target(folder, spec, port, key)
    (folder / "state.json").write_text(json.dumps({"pid": proc.pid, "port": port, "started": time.time(), "target": str(target)}))
    return status(folder, suite=suite)


def _stop(folder: Path, rootfs: Path, pid: int | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = set(_processes_in(rootfs)) | ({pid} if _alive(pid) else set())
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
    _unmount(rootfs)
    (folder / "state.json").unlink(missing_ok=True)


def down(folder: Path | None = None, *, suite: str = DEFAULT_SUITE) -> EmulatorStatus:
    """Stop sshd (and anything else running in the userland), then unmount in reverse order."""
    folder = folder or emulator_dir(suite)
    _stop(folder, folder / "rootfs", _state(folder).get("pid"))
    return status(folder, suite=suite)


def status(folder: Path | None = None, disk_usage: bool = True, *, suite: str = DEFAULT_SUITE) -> EmulatorStatus:
    """Built? running (pid, port)? and, unless ``disk_usage`` is off, the userland's size (a ``du``)."""
    folder = folder or emulator_dir(suite)
    rootfs = folder / "rootfs"
    state = _state(folder)
    built = (rootfs / ".quantune-complete").is_file()
    size = None
    if built and disk_usage:
        out = subprocess.run(["du", "-sbx", str(rootfs)], capture_output=True, text=True)
        size = int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else None
    running = _alive(state.get("pid"))
    return EmulatorStatus(str(folder), board(suite).suite, built, running, state.get("pid") if running else None,
                          state.get("port") if running else None, size,
                          state.get("target") if running else None, installed_runtime(rootfs) if built else None)
