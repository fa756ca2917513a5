"""schedules.pin_source: a TVMScript kernel builder still parses after its file was edited (an edit
in the checkout while a long build or test runs used to give TVM's parser the new text at the old
line numbers: a DiagnosticError in an unrelated line)."""
from __future__ import annotations

import importlib.util
import sys

BUILDER = '''
from tvm.script import tirx as T

from schedules import pin_source

{pin}


def copy_func(n: int):
    @T.prim_func(private=True, s_tir=True)
    def copy(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in range(n):
            with T.sblock("copy"):
                vi = T.axis.spatial(n, i)
                b[vi] = a[vi]

    return copy
'''


def _import_then_edit(tmp_path, name: str, pin: bool):
    path = tmp_path / f"{name}.py"
    path.write_text(BUILDER.format(pin="pin_source(__name__)" if pin else ""))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    path.write_text("# an edit above the builder\n" * 3 + path.read_text())
    return module


def test_builder_parses_after_its_file_changed(tmp_path):
    module = _import_then_edit(tmp_path, "voxc_pinned_builder", pin=True)
    func = module.copy_func(8)
    assert "copy" in func.script()


def test_unpinned_builder_reads_the_edited_file(tmp_path):
    """What pin_source prevents (if TVM's parser stops reading files at call time, drop both)."""
    import pytest

    module = _import_then_edit(tmp_path, "voxc_unpinned_builder", pin=False)
    with pytest.raises(Exception):
        module.copy_func(8)
