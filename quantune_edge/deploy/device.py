"""Putting the agent and models on a device, and running the agent there.

A model is uploaded over SFTP to a temporary name next to its final place, its sha256 is checked on
the device and the device's runtime must load it (in a forked child, so a crash is an answer), and
only then is it renamed over the deployed one (an atomic POSIX rename), so the model deployed before
stays usable until the new one is verified. A file that is not a TFLite flatbuffer is refused on the
host before any upload. Interrupted uploads leave only a
``.part`` file, which the next deploy of that name removes.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantune_edge.common.records import sha256_file
from quantune_edge.deploy import runtimes
from quantune_edge.deploy.targets import Target
from quantune_edge.deploy.transport import CONNECTION_ERRORS, Connection
from quantune_edge.errors import DeviceError, InputError
from quantune_edge.model import tflite_graph

AGENT_SOURCE = Path(__file__).resolve().parents[2] / "device_agent"
# Free space kept on the device beyond the model itself.
DISK_MARGIN_BYTES = 1 << 20
STALE_PART_S = 300  # a .part file not written to for this long is a dead upload's, not a running one's


def agent_files() -> dict[str, bytes]:
    if not (AGENT_SOURCE / "__main__.py").is_file():
        raise InputError(f"device_agent sources not found at {AGENT_SOURCE}")
    return {p.name: p.read_bytes() for p in sorted(AGENT_SOURCE.glob("*.py"))}


def agent_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


@dataclass
class Deployment:
    target: str
    local_path: str
    remote_path: str
    sha256: str
    size_bytes: int
    uploaded: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Device:
    """A connected target with the agent on it."""

    conn: Connection
    log: Callable[[str], None] = field(default=lambda _m: None)
    work_dir: str = ""
    info: dict = field(default_factory=dict)

    @property
    def target(self) -> Target:
        return self.conn.target

    def _resolve_work_dir(self) -> str:
        work = self.target.work_dir
        if work == "~" or work.startswith("~/"):
            home = self.conn.sftp.normalize(".")
            work = posixpath.join(home, work[2:]) if work != "~" else home
        return work

    def _makedirs(self, path: str) -> None:
        parts = []
        while path not in ("", "/"):
            parts.append(path)
            path = posixpath.dirname(path)
        for p in reversed(parts):
            try:
                self.conn.sftp.stat(p)
            except FileNotFoundError:
                try:
                    self.conn.sftp.mkdir(p)
                except OSError as exc:
                    raise DeviceError(f"target {self.target.name}: cannot create {p}: {exc}") from None

    def agent(self, args: list[str], *, timeout: float | None = None) -> dict:
        """Run ``python -m device_agent ARGS`` in the work dir; its JSON, or a DeviceError naming the failure."""
        result = self.conn.run([self.target.python, "-m", "device_agent", *args], cwd=self.work_dir, timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        try:
            data = json.loads(lines[-1]) if lines else None
        except ValueError:
            data = None
        if data is None:
            detail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
            raise DeviceError(f"target {self.target.name}: the agent failed (exit {result.exit_status}): {detail}")
        if "error" in data:
            hint = " (deploy with --install-runtime)" if data.get("kind") == "runtime_missing" else ""
            raise AgentFailure(f"target {self.target.name}: {data['error']}{hint}", data.get("kind", ""))
        return data

    @property
    def models_dir(self) -> str:
        """Where deployed models live on the device (set by :meth:`bootstrap`)."""
        return posixpath.join(self.work_dir, "models")

    def bootstrap(self, *, install_runtime: bool = False) -> dict:
        """Copy the agent into the work dir unless the same version is there; check Python and runtime."""
        self.work_dir = self._resolve_work_dir()
        self._makedirs(self.models_dir)
        files = agent_files()
        digest = agent_digest(files)
        remote = posixpath.join(self.work_dir, "device_agent")
        marker = posixpath.join(remote, ".digest")
        try:
            with self.conn.sftp.open(marker) as fh:
                current = fh.read().decode().strip()
        except OSError:
            current = ""
        if current != digest:
            staging = remote + ".new"
            self._rmtree(staging)
            self._makedirs(staging)
            for name, data in files.items():
                with self.conn.sftp.open(posixpath.join(staging, name), "wb") as fh:
                    fh.write(data)
            with self.conn.sftp.open(posixpath.join(staging, ".digest"), "wb") as fh:
                fh.write(digest.encode())
            self._rmtree(remote)
            self.conn.sftp.posix_rename(staging, remote)
            self.log(f"{self.target.name}: agent installed in {remote}")
        try:
            info = self.agent(["info"])
        except DeviceError:
            self._require_python()  # the likelier cause, said plainly
            raise
        facts = info["device"]
        if not facts.get("numpy") or tuple(int(v) for v in facts["python"].split(".")[:2]) < (3, 9):
            self._require_python()
        runtime = info.get("runtime")
        if runtime and runtime.get("import") != "ok":
            raise DeviceError(f"target {self.target.name}: {runtime['package']} {runtime['version']} is on the device but its "
                              f"import {runtime.get('import')}; reinstall it or remove it")
        if not runtime:
            try:
                wanted = runtimes.select_runtime(facts)
            except DeviceError as exc:
                raise DeviceError(f"target {self.target.name}: {exc}") from None
            if not install_runtime:
                raise DeviceError(f"target {self.target.name}: no TFLite runtime on the device; rerun with --install-runtime "
                                  f"or pip install {wanted.requirement} there")
            self._install_runtime(wanted, facts.get("in_venv", False))
            info = self.agent(["info"])
            if not info.get("runtime") or info["runtime"].get("import") != "ok":
                raise DeviceError(f"target {self.target.name}: {wanted.requirement} installed but still not importable "
                                  f"({(info.get('runtime') or {}).get('import', 'not found')})")
        rt = info["runtime"]
        if f"{rt['package']} {rt['version']}" not in runtimes.supported_op_versions():
            self.log(f"{self.target.name}: {rt['package']} {rt['version']} is not among the runtimes whose kernels are known "
                     "here; the device's own load checks each model")
        self.info = info
        return info

    def _require_python(self) -> None:
        """Only run when something is off (the agent's own ``info`` reports Python and numpy): one
        more remote Python start on every connection is expensive on a small board."""
        check = self.conn.run([self.target.python, "-c", "import sys, numpy; print(sys.version_info[:2] >= (3, 9))"], cwd=self.work_dir)
        if check.exit_status != 0 or "True" not in check.stdout:
            raise DeviceError(f"target {self.target.name}: '{self.target.python}' needs Python 3.9+ with numpy on the device "
                              f"({(check.stderr.strip().splitlines() or ['too old'])[-1]})")

    def _install_runtime(self, runtime: runtimes.Runtime, in_venv: bool) -> None:
        """pip-install the runtime the selection picked for this board: into the venv, or else for the
        user. Debian/Raspberry Pi OS bookworm and trixie mark the system Python externally managed
        (PEP 668), so a --user install needs --break-system-packages there (it only writes to
        ~/.local); older pips lack that flag. pip fetches everything before it installs anything, so
        a failure leaves the device as it was."""
        requirement = runtime.requirement
        self.log(f"{self.target.name}: installing {requirement} on the device")
        has_pip = self.conn.run([self.target.python, "-m", "pip", "--version"], cwd=self.work_dir)
        if has_pip.exit_status != 0:
            raise DeviceError(f"target {self.target.name}: no pip for {self.target.python} on the device "
                              f"({(has_pip.stderr.strip().splitlines() or ['no output'])[-1]}); install pip (Debian: apt install "
                              f"python3-pip) or {requirement} by hand; nothing was installed")
        variants = [[]] if in_venv else [["--user", "--break-system-packages"], ["--user"]]
        last = None
        for extra in variants:
            last = self.conn.run([self.target.python, "-m", "pip", "install", "--quiet", *extra, requirement],
                                 cwd=self.work_dir)
            if last.exit_status == 0:
                return
        raise DeviceError(f"target {self.target.name}: pip install {requirement} failed (can the device reach the package index?): "
                          f"{(last.stderr.strip().splitlines() or ['no output'])[-1]}; nothing was installed")

    def _rmtree(self, path: str) -> None:
        try:
            entries = self.conn.sftp.listdir_attr(path)
        except OSError:
            return
        for entry in entries:
            child = posixpath.join(path, entry.filename)
            if stat.S_ISDIR(entry.st_mode or 0):
                self._rmtree(child)
            else:
                self.conn.sftp.remove(child)
        self.conn.sftp.rmdir(path)

    def remote_sha256(self, path: str) -> str | None:
        try:
            self.conn.sftp.stat(path)
        except OSError:
            return None
        return self.agent(["hash", path])["sha256"]

    def deploy(self, local: str | Path, name: str | None = None, *, by_content: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Deployment:
        """Upload ``local`` as ``models/NAME`` (default: its file name; with ``by_content``,
        ``<sha256[:12]>-<file name>``, so models from different folders never collide) unless the
        same bytes are there."""
        import time

        local = Path(local)
        self.check_kernels(check_model_file(local), local.name)
        start = time.monotonic()
        sha, size = sha256_file(local), local.stat().st_size
        name = content_name(sha, local) if by_content else name or local.name
        if "/" in name or name.startswith(".") or not name:
            raise InputError(f"invalid model name {name!r}: a plain file name is needed")
        models = self.models_dir
        final = posixpath.join(models, name)
        # what interrupted uploads of this name left, but not another upload of it still running
        self.remove_stale(lambda f: f.startswith(f".{name}.") and f.endswith(".part"), STALE_PART_S)
        if self.remote_sha256(final) == sha:
            return Deployment(self.target.name, str(local), final, sha, size, False, time.monotonic() - start)
        free = self.agent(["info"])["device"]["free_disk_bytes"]
        if free < size + DISK_MARGIN_BYTES:
            raise DeviceError(f"target {self.target.name}: not enough disk in {self.work_dir}: {size} bytes needed "
                              f"(plus 1 MiB margin), {free} free; the deployed model was left as it was")
        part = posixpath.join(models, f".{name}.{secrets.token_hex(4)}.part")
        try:
            self.conn.sftp.put(str(local), part, callback=progress, confirm=True)
        except CONNECTION_ERRORS as exc:
            self._remove_quietly(part)
            reason = str(exc) or type(exc).__name__
            if "Failure" in reason or "No space" in reason:
                reason += " (disk full on the device?)"
            raise DeviceError(f"target {self.target.name}: upload of {local.name} failed: {reason}; "
                              "the deployed model was left as it was") from None
        try:  # the bytes arrived whole, and the device's runtime loads them: only then may they replace a model
            remote = self.agent(["hash", part, "--load-if", sha])["sha256"]
        except AgentFailure as exc:
            self._remove_quietly(part)
            if exc.kind != "model_invalid":
                raise
            reason = str(exc).split(": ", 1)[-1].replace(part, local.name)
            raise DeviceError(f"target {self.target.name}: the device's TFLite runtime cannot load {local.name} ({reason}); "
                              "the deployed model was left as it was") from None
        except BaseException:
            self._remove_quietly(part)
            raise
        if remote != sha:
            self._remove_quietly(part)
            raise DeviceError(f"target {self.target.name}: corrupt upload of {local.name} (sha256 {str(remote)[:12]}… on the "
                              f"device, {sha[:12]}… here); the deployed model was left as it was")
        self.conn.sftp.posix_rename(part, final)
        return Deployment(self.target.name, str(local), final, sha, size, True, time.monotonic() - start)

    def check_kernels(self, graph: tflite_graph.TfliteGraph, label: str) -> None:
        """Refuse, before any upload, a model whose ops need kernels (op versions) the device's runtime
        does not have, naming them and a pinned runtime for this board that has them."""
        runtime = self.info.get("runtime") or {}
        missing = runtimes.kernels_missing(graph.op_versions, runtime.get("package", ""), runtime.get("version", ""))
        if missing:
            board = runtimes.board_of(self.info["device"])
            better = [r.label for r in runtimes.RUNTIMES
                      if r.misfit(*board) is None and runtimes.kernels_missing(graph.op_versions, r.package, r.version) == []]
            raise DeviceError(f"target {self.target.name}: its {runtime['package']} {runtime['version']} cannot run {label}: no "
                              f"kernel for {', '.join(missing)}; nothing was uploaded"
                              + (f" (install {better[0]} on the device)" if better else ""))

    def deployed_by_content(self, local: str | Path) -> tuple[str, str | None]:
        """``local``'s name as ``deploy(by_content=True)`` gives it, and its remote path if those bytes are there."""
        sha = sha256_file(local)
        name = content_name(sha, local)
        final = posixpath.join(self.models_dir, name)
        return name, final if self.remote_sha256(final) == sha else None

    def remove_stale(self, matches: Callable[[str], bool], older_than_s: float) -> list[str]:
        """Remove the files of the models folder that ``matches`` accepts and nothing has written to for
        ``older_than_s`` by the device's own clock (read from a file made for the purpose, so the host's
        clock never enters, and only when some file matches: most calls pay one listing). Returns their names."""
        models = self.models_dir
        found = [e for e in self.conn.sftp.listdir_attr(models) if matches(e.filename)]
        if not found:
            return []
        clock = posixpath.join(models, f".clock.{secrets.token_hex(4)}")
        with self.conn.sftp.open(clock, "w"):
            pass
        try:
            now = self.conn.sftp.stat(clock).st_mtime
        finally:
            self._remove_quietly(clock)
        stale = [e.filename for e in found if now - e.st_mtime > older_than_s]
        for filename in stale:
            self._remove_quietly(posixpath.join(models, filename))
        return stale

    def remove_model(self, remote_path: str) -> None:
        """Delete one file of the models folder (best effort: a file already gone is fine)."""
        if posixpath.dirname(remote_path) != self.models_dir:
            raise InputError(f"{remote_path}: not in {self.work_dir}/models; not removed")
        self._remove_quietly(remote_path)

    def _remove_quietly(self, path: str) -> None:
        try:
            self.conn.sftp.remove(path)
        except CONNECTION_ERRORS:
            pass


class AgentFailure(DeviceError):
    """The agent ran and reported an error; ``kind`` is its machine-readable tag (``model_invalid``, …)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_model_file(path: str | Path) -> tflite_graph.TfliteGraph:
    """Refuse, before anything is uploaded, a file that is not a readable TFLite flatbuffer: a text
    file, a JPEG or a cut-off copy must never replace a deployed model. Returns its graph."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    return tflite_graph.parse(path.read_bytes(), str(path))


def content_name(sha256: str, local: str | Path) -> str:
    """A model's name on the device when deployed by content: models from different folders never collide."""
    return f"{sha256[:12]}-{Path(local).name}"


def open_device(target: Target, *, trust_new_host_key: bool = False, install_runtime: bool = False,
                log: Callable[[str], None] = lambda _m: None) -> Device:
    """Connect, bootstrap the agent and check the runtime; close with ``device.conn.close()``."""
    conn = Connection(target, trust_new_host_key=trust_new_host_key, log=log).connect()
    if conn.trusted_key:  # every command that may trust a key says which one, and where it went
        log(f"{target.name}: trusted a new host key: {conn.trusted_key}, recorded in {conn.known_hosts}")
    try:
        device = Device(conn, log)
        device.bootstrap(install_runtime=install_runtime)
    except BaseException:
        conn.close()
        raise
    return device
