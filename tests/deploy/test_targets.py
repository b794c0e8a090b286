"""Target files: what is accepted, what is refused (passwords above all), and how names resolve."""
import json
import subprocess
import sys

import pytest
from conftest import REPO

from quantune_edge.deploy.targets import list_targets, load_target, parse_target
from quantune_edge.deploy.transport import resolve
from quantune_edge.errors import InputError

CLI = [sys.executable, "-m", "quantune_edge.cli"]


def test_shipped_targets_parse():
    targets, problems = list_targets(REPO / "targets")
    assert not problems and {"rpi4", "rpi5", "local-arm", "local-arm-trixie"} <= {t.name for t in targets}
    from quantune_edge.deploy.emulator import BOARDS

    for board in BOARDS.values():  # each shipped board file holds the defaults `emulate up` writes
        arm = load_target(board.target_name, REPO / "targets")
        assert arm.emulated and arm.host == "127.0.0.1" and arm.port == board.default_port and board.suite in arm.description
        assert arm.identity_file and arm.known_hosts


@pytest.mark.parametrize("data, message", [
    ({"host": "pi", "password": "raspberry"}, "'password' is not allowed .* key authentication"),
    ({"host": "pi", "Passphrase": "x"}, "'passphrase' is not allowed"),
    ({"host": "pi", "prot": 22}, "unknown key 'prot'"),
    ({"host": "pi", "port": "22"}, "'port' must be int"),
    ({"host": "pi", "emulated": 1}, "'emulated' must be bool"),
    ({"user": "pi"}, "needs 'host' or 'ssh_config_host'"),
    ({"host": "pi", "port": 70000}, "port must be 1-65535"),
])
def test_bad_target_files(data, message):
    with pytest.raises(InputError, match=message):
        parse_target(data, "t.toml", "t")


def test_unknown_target_lists_known(tmp_path):
    (tmp_path / "a.toml").write_text('host = "x"\n')
    (tmp_path / "broken.toml").write_text('host = \n')
    with pytest.raises(InputError, match=r"unknown target 'b' \(known: a;"):
        load_target("b", tmp_path)
    targets, problems = list_targets(tmp_path)
    assert [t.name for t in targets] == ["a"] and "not valid TOML" in problems[0]


def test_ssh_config_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host pi5\n  HostName 10.0.0.5\n  User pi\n  Port 2200\n  IdentityFile ~/.ssh/pi_key\n")
    target = resolve(parse_target({"ssh_config_host": "pi5"}, "t.toml", "pi5"))
    assert (target.host, target.user, target.port) == ("10.0.0.5", "pi", 2200)
    assert target.identity_file == str(tmp_path / ".ssh" / "pi_key")
    explicit = resolve(parse_target({"ssh_config_host": "pi5", "user": "me", "port": 2022}, "t.toml", "pi5"))
    assert (explicit.user, explicit.port) == ("me", 2022)


def test_targets_cli(tmp_path):
    listed = subprocess.run([*CLI, "targets", "list", "--targets-dir", str(REPO / "targets"), "--json"], capture_output=True, text=True)
    assert listed.returncode == 0 and "rpi4" in {t["name"] for t in json.loads(listed.stdout)["targets"]}
    (tmp_path / "pw.toml").write_text('host = "pi"\npassword = "raspberry"\n')
    bad = subprocess.run([*CLI, "targets", "check", "pw", "--targets-dir", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "password" in bad.stderr
    missing = subprocess.run([*CLI, "deploy", str(tmp_path / "none.tflite"), "--target", "pw"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such model file" in missing.stderr
