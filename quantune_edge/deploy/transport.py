"""SSH to a target with paramiko: verified host keys, key authentication, timeouts, quoted commands.

Host keys are checked against the target's ``known_hosts`` file (default ``~/.ssh/known_hosts``).
An unknown key is refused unless the caller asks to trust it on first use, which records it; a key
that differs from the recorded one is always refused. Passwords are never sent. Commands are argv
lists joined with :func:`shlex.join`, so no user string reaches the remote shell unquoted.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from quantune_edge.deploy.targets import Target
from quantune_edge.errors import DeviceError, InputError

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# What a transfer or command over a connection that broke raises: callers catch these without importing paramiko.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, paramiko.SSHException, EOFError)
# paramiko's transport thread logs each failed handshake with a traceback; the one-line DeviceError says it all.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint, as ``ssh-keygen -lf`` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@dataclass
class CommandResult:
    argv: list[str]
    exit_status: int
    stdout: str
    stderr: str
    seconds: float


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown key: refuse, or (trust on first use) record it in the known_hosts file."""

    def __init__(self, known_hosts: Path, trust_new: bool, target: Target) -> None:
        self.known_hosts, self.trust_new, self.target = known_hosts, trust_new, target
        self.trusted: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.trust_new:
            raise DeviceError(
                f"target {self.target.name}: unknown host key for {hostname} ({key.get_name()} {fingerprint(key)}), "
                f"not in {self.known_hosts}; check it and rerun with --trust-new-host-key to record it")
        client.get_host_keys().add(hostname, key.get_name(), key)
        # Append one line rather than rewrite the file (paramiko's save would drop what it cannot parse).
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = paramiko.hostkeys.HostKeyEntry([hostname], key).to_line()
        existing = self.known_hosts.read_bytes() if self.known_hosts.exists() else b""
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(("" if not existing or existing.endswith(b"\n") else "\n") + line)
        self.trusted = f"{hostname} {key.get_name()} {fingerprint(key)}"


class Connection:
    """One SSH session to a target (use as a context manager)."""

    def __init__(self, target: Target, *, trust_new_host_key: bool = False, retries: int = 1,
                 log: Callable[[str], None] | None = None) -> None:
        self.target = resolve(target)
        self.trust_new_host_key = trust_new_host_key
        self.retries = retries
        self.log = log or (lambda _m: None)
        self.known_hosts = Path(self.target.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.trusted_key: str | None = None

    def __enter__(self) -> Connection:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _identity(self) -> str | None:
        if not self.target.identity_file:
            return None
        path = Path(self.target.identity_file).expanduser()
        if not path.is_file():
            raise InputError(f"target {self.target.name}: identity file {path} does not exist")
        return str(path)

    def connect(self) -> Connection:
        identity = self._identity()
        for attempt in range(max(0, self.retries) + 1):  # every pass returns, retries, or raises
            client = paramiko.SSHClient()
            if self.known_hosts.is_file():
                client.load_host_keys(str(self.known_hosts))
            policy = _HostKeyPolicy(self.known_hosts, self.trust_new_host_key, self.target)
            client.set_missing_host_key_policy(policy)
            t = self.target
            started = time.monotonic()
            try:
                client.connect(t.host, port=t.port, username=t.user or None, key_filename=identity,
                               allow_agent=True, look_for_keys=identity is None, password=None,
                               timeout=t.connect_timeout_s, banner_timeout=t.connect_timeout_s,
                               auth_timeout=t.connect_timeout_s)
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise DeviceError(
                    f"target {t.name}: the host key of {t.host}:{t.port} CHANGED ({exc.key.get_name()} {fingerprint(exc.key)}, "
                    f"{self.known_hosts} has {fingerprint(exc.expected_key)}); refusing to connect (possible "
                    f"man-in-the-middle; if the device was reinstalled, remove the old line from {self.known_hosts})") from None
            except paramiko.AuthenticationException as exc:
                client.close()
                raise DeviceError(f"target {t.name}: authentication failed for {t.address} "
                                  f"(key {identity or 'from ssh-agent/~/.ssh'}): {exc}") from None
            except DeviceError:
                client.close()
                raise
            except (TimeoutError, OSError, paramiko.SSHException, EOFError) as exc:
                client.close()
                reason, final = _connect_failure(exc, t.connect_timeout_s, time.monotonic() - started)
                if attempt < self.retries and not final:
                    self.log(f"{t.name}: connection failed ({reason}), retrying once")
                    time.sleep(1.0)
                    continue
                raise DeviceError(f"target {t.name}: cannot reach {t.address}: {reason}") from None
            client.get_transport().set_keepalive(15)  # a peer that vanishes is noticed, not waited on forever
            self.client = client
            self.trusted_key = policy.trusted
            return self
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            if self.client is None:
                raise DeviceError(f"target {self.target.name}: not connected")
            try:
                self._sftp = self.client.open_sftp()
            except (OSError, paramiko.SSHException) as exc:
                raise DeviceError(f"target {self.target.name}: SFTP unavailable: {_reason(exc)}") from None
        return self._sftp

    def run(self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run ``argv`` (every element quoted) in ``cwd``; stdout and stderr are drained together."""
        if self.client is None:
            raise DeviceError(f"target {self.target.name}: not connected")
        timeout = timeout or self.target.command_timeout_s
        command = shlex.join(argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        start = time.monotonic()
        try:
            transport = self.client.get_transport()
            chan = transport.open_session(timeout=self.target.connect_timeout_s)
            chan.exec_command(command)
            out, err = bytearray(), bytearray()
            while True:
                progressed = False
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                    progressed = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    progressed = True
                pending = chan.recv_ready() or chan.recv_stderr_ready()
                if chan.exit_status_ready() and (chan.eof_received or chan.closed) and not pending:
                    break
                if (chan.closed or not transport.is_active()) and not pending:
                    break
                if time.monotonic() - start > timeout:
                    chan.close()
                    raise DeviceError(f"target {self.target.name}: '{shlex.join(argv)[:80]}' timed out after {timeout:.0f} s")
                if not progressed:
                    time.sleep(0.005)
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if status == -1 and not transport.is_active():
                raise DeviceError(f"target {self.target.name}: connection lost while running {argv[0]}")
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise DeviceError(f"target {self.target.name}: connection lost while running {argv[0]}: {_reason(exc)}") from None
        return CommandResult(list(argv), status, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.monotonic() - start)


def resolve(target: Target) -> Target:
    """``target`` with its ``ssh_config_host`` applied from ~/.ssh/config (explicit fields win), read by
    paramiko like the connection itself."""
    if not target.ssh_config_host:
        return target
    config_path = Path("~/.ssh/config").expanduser()
    if not config_path.is_file():
        raise InputError(f"target {target.name}: ssh_config_host = {target.ssh_config_host!r} but {config_path} does not exist")
    entry = paramiko.SSHConfig.from_path(str(config_path)).lookup(target.ssh_config_host)
    identity = target.identity_file or (entry.get("identityfile") or [None])[0]
    known = target.known_hosts or (entry.get("userknownhostsfile") or "").split()[:1] or [None]
    return Target(**{**target.to_dict(), "host": target.host or entry.get("hostname", target.ssh_config_host),
                     "port": int(entry.get("port", target.port)) if target.port == 22 else target.port,
                     "user": target.user or entry.get("user", ""), "identity_file": identity,
                     "known_hosts": known[0] if isinstance(known, list) else known})


def _connect_failure(exc: BaseException, timeout_s: float, seconds: float) -> tuple[str, bool]:
    """What a failed connect means, in words, and whether trying again is pointless (a peer that
    answers but does not speak SSH answers the same way twice). paramiko words a silent peer in
    several ways, so the time it waited tells that case apart."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        causes = {(getattr(e, "strerror", None) or str(e)).lower() for e in exc.errors.values()}
        return ", ".join(sorted(causes)) or "unable to connect", False
    text = str(exc)
    if isinstance(exc, socket.timeout) or isinstance(exc.__context__, socket.timeout) or "No existing session" in text \
            or seconds >= 0.9 * timeout_s:
        return (f"no SSH answer within {timeout_s:g} s (connect_timeout_s in the target file): a silent port or a "
                "very slow device"), False
    if "protocol banner" in text:
        return "the port answers but is not an SSH server (no SSH banner; it closed or sent something else)", True
    return _reason(exc), False


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."
