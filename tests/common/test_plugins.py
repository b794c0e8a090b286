"""User code named as FILE.py:function: imported once per version of the file, every mistake one InputError."""
import os
import time

import pytest

from quantune_edge.common.plugins import load_callable
from quantune_edge.errors import InputError


def test_a_plugin_is_imported_once_per_version_of_its_file(tmp_path):
    plugin = tmp_path / "plug.py"
    log = tmp_path / "imports.txt"
    plugin.write_text(f"open({str(log)!r}, 'a').write('x')\ndef f():\n    return 1\n")
    first, second = load_callable(f"{plugin}:f", "metric"), load_callable(f"{plugin}:f", "metric")
    assert first is second and first() == 1 and log.read_text() == "x"  # a metric runs at every evaluation: no re-import
    plugin.write_text("def f():\n    return 2\n")
    later = time.time_ns() + 10**9
    os.utime(plugin, ns=(later, later))
    assert load_callable(f"{plugin}:f", "metric")() == 2


@pytest.mark.parametrize("spec, message", [
    ("nocolon.py", "--metric must look like FILE.py:function"),
    ("x.txt:f", "--metric must look like FILE.py:function"),
    ("{dir}/absent.py:f", "absent.py does not exist"),
    ("{dir}/bad.py:f", "importing .*bad.py failed: SyntaxError"),
    ("{dir}/ok.py:g", "has no function 'g'"),
    ("{dir}/ok.py:VALUE", "has no function 'VALUE'"),
])
def test_every_mistake_is_one_input_error(tmp_path, spec, message):
    (tmp_path / "bad.py").write_text("def f(:\n")
    (tmp_path / "ok.py").write_text("VALUE = 3\ndef f():\n    return 1\n")
    with pytest.raises(InputError, match=message):
        load_callable(spec.format(dir=tmp_path), "metric")
