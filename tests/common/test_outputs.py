"""What a command may replace, and the staged swap, on real folders (no model needed)."""
import os
import subprocess
import sys

import pytest

from quantune_edge.common import outputs
from quantune_edge.common.outputs import check_output_folder, check_output_page, staged_folder, temp_folder
from quantune_edge.compile.artifacts import COMPILE_FOLDER
from quantune_edge.errors import InputError


def _earlier(folder):
    folder.mkdir()
    (folder / "compile.json").write_text("{}")
    (folder / "old.txt").write_text("old")
    return folder


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_staged_folder_swaps_in_the_new_and_removes_the_old(atomic, tmp_path, monkeypatch):
    if not atomic:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = _earlier(tmp_path / "out")
    with staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_failure_inside_or_at_the_swap_leaves_the_old_folder(atomic, tmp_path, monkeypatch):
    if not atomic:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = _earlier(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out) as stage:
            (stage / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["compile.json", "old.txt"] and os.listdir(tmp_path) == ["out"]
    if not atomic:  # the second rename fails: the old folder is renamed back
        real = os.rename

        def failing(src, dst):
            if ".partial-" in str(src):
                raise OSError("injected")
            return real(src, dst)

        monkeypatch.setattr(outputs.Path, "rename", lambda self, target: failing(self, target) or type(self)(target))
        with pytest.raises(OSError, match="injected"):
            with staged_folder(out) as stage:
                (stage / "new.txt").write_text("new")
        assert sorted(os.listdir(out)) == ["compile.json", "old.txt"] and os.listdir(tmp_path) == ["out"]


def test_what_may_be_written(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    check_output_folder(tmp_path / "new", COMPILE_FOLDER, "--out")
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", COMPILE_FOLDER, "--out", replace=False)
    earlier = _earlier(tmp_path / "earlier")
    check_output_folder(earlier, COMPILE_FOLDER, "--out")
    with pytest.raises(InputError, match="already exists; pass --force"):
        check_output_folder(earlier, COMPILE_FOLDER, "--out", replace=False)
    for out, message in ((data / "images", "is the --calib data, an input"), (data, "holds the --calib data, an input")):
        with pytest.raises(InputError, match=message):
            check_output_folder(out, COMPILE_FOLDER, "--out", {"the --calib data": data / "images"})
    check_output_folder(data / "images" / "out", COMPILE_FOLDER, "--out", {"the --calib data": data / "images"})  # beside, not over
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(InputError, match="holds the --calib data"):  # a link is judged by where it points
        check_output_folder(link, COMPILE_FOLDER, "--out", {"the --calib data": data / "images"})


def test_pages_it_may_replace(tmp_path):
    ours, old, theirs = tmp_path / "ours.html", tmp_path / "old.html", tmp_path / "theirs.html"
    ours.write_text(f"<html><head>{outputs.PAGE_MARKER}<title>x</title>")
    old.write_text("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>quantune-edge benchmark report</title>")
    theirs.write_text("<html><head><title>my notes</title>")
    for page in (ours, old, tmp_path / "new.html"):
        check_output_page(page, "--html")
    with pytest.raises(InputError, match="not a page quantune-edge wrote"):
        check_output_page(theirs, "--html")


def test_temp_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(outputs.tempfile, "tempdir", None)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    gone, kept = tmp_path / f"quantune-eval-{dead}-a", tmp_path / f"quantune-eval-{os.getppid()}-b"
    gone.mkdir()
    kept.mkdir()
    with temp_folder("eval") as folder:
        assert folder.parent == tmp_path and folder.name.startswith(f"quantune-eval-{os.getpid()}-")
    assert not gone.exists() and kept.exists() and not folder.exists()
