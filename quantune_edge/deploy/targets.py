"""Device definitions: one TOML file per device under ``targets/``.

A target says how to reach a device (host, port, user, identity file, or an ``ssh_config_host`` alias
resolved through ``~/.ssh/config``) and how to run the agent there (python, work dir, threads).
Passwords are refused outright: key authentication (agent or identity file) only.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from quantune_edge.errors import InputError

REPO_TARGETS = Path(__file__).resolve().parents[2] / "targets"
_SECRET_KEYS = {"password", "passphrase", "passwd", "pass"}


@dataclass(frozen=True)
class Target:
    name: str
    host: str = ""
    port: int = 22
    user: str = ""
    identity_file: str | None = None
    python: str = "python3"
    work_dir: str = "~/quantune-edge"
    threads: int = 4
    ssh_config_host: str | None = None
    known_hosts: str | None = None
    emulated: bool = False
    description: str = ""
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 900.0
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def address(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host or self.ssh_config_host}:{self.port}"


_TYPES: dict[str, type | tuple[type, ...]] = {"name": str, "host": str, "port": int, "user": str, "identity_file": str, "python": str, "work_dir": str,
          "threads": int, "ssh_config_host": str, "known_hosts": str, "emulated": bool, "description": str,
          "connect_timeout_s": (int, float), "command_timeout_s": (int, float)}


def parse_target(data: dict, source: str, default_name: str) -> Target:
    secrets = sorted(_SECRET_KEYS & {k.lower() for k in data})
    if secrets:
        raise InputError(f"{source}: '{secrets[0]}' is not allowed in a target file; use key authentication "
                         "(ssh-agent or identity_file), passwords are never stored")
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise InputError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_TYPES))})")
    for key, value in data.items():
        want = _TYPES[key]
        if isinstance(value, bool) and want is not bool or not isinstance(value, want):
            raise InputError(f"{source}: '{key}' must be {getattr(want, '__name__', 'a number')}, got {value!r}")
    if not data.get("host") and not data.get("ssh_config_host"):
        raise InputError(f"{source}: needs 'host' or 'ssh_config_host'")
    if not 0 < data.get("port", 22) < 65536 or data.get("threads", 1) < 1:
        raise InputError(f"{source}: port must be 1-65535 and threads >= 1")
    return Target(**{"name": default_name, **data, "path": source})


def targets_dir(explicit: str | Path | None = None) -> Path:
    """--targets-dir, else $QUANTUNE_EDGE_TARGETS, else ./targets, else the repository's targets/."""
    for candidate in (explicit, os.environ.get("QUANTUNE_EDGE_TARGETS"), Path("targets")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    if explicit:
        raise InputError(f"targets folder {explicit} does not exist")
    return REPO_TARGETS


def load_target(name_or_path: str, directory: str | Path | None = None) -> Target:
    """A target by name (``targets/NAME.toml``) or by path to a .toml file."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = targets_dir(directory) / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(t.name for t in list_targets(directory)[0]) or "none"
        raise InputError(f"unknown target '{name_or_path}' (known: {known}; looked in {path.parent})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    return parse_target(data, str(path), path.stem)


def list_targets(directory: str | Path | None = None) -> tuple[list[Target], list[str]]:
    """The valid targets of the folder, and one error line per file that is not."""
    targets, problems = [], []
    for path in sorted(targets_dir(directory).glob("*.toml")):
        try:
            targets.append(load_target(str(path)))
        except InputError as exc:
            problems.append(str(exc))
    return targets, problems
