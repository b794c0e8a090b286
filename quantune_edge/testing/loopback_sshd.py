"""A real OpenSSH sshd on loopback for the deployment tests: key-only, its own host and client keys,
a temp known_hosts; started and stopped (by pid) by the tests themselves."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "quantune-edge-test", "-f", str(path)], check=True)
    return path


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


class LoopbackSshd:
    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = folder / "host_ed25519"
        self.client_key = folder / "client_ed25519"
        if not self.host_key.exists():
            keygen(self.host_key)
            keygen(self.client_key)
        (folder / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line())
        self.config = folder / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            f"PidFile {folder / 'sshd.pid'}\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n")
        self.proc: subprocess.Popen | None = None

    def known_hosts_line(self) -> str:
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def start(self) -> LoopbackSshd:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "sshd.log", "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.folder / 'sshd.log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        """Kill the listener and every session it forked (by pid), then reap it."""
        if self.proc is None:
            return
        for pid in [*_children(self.proc.pid), self.proc.pid]:
            for kid in _children(pid):
                try:
                    os.kill(kid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    def target_toml(self, path: Path, *, python: str, work_dir: Path, **extra) -> Path:
        import json

        fields = {"host": "127.0.0.1", "port": self.port, "user": getpass.getuser(), "identity_file": str(self.client_key),
                  "known_hosts": str(self.known_hosts), "python": python, "work_dir": str(work_dir), "threads": 2,
                  "connect_timeout_s": 5.0, "command_timeout_s": 300.0, **extra}
        lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in fields.items()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path
