"""Hand-written TensorIR kernels (see README.md).

The kernels are TVMScript functions defined inside Python builders (their shapes are closure
values), so TVM's parser reads each builder's source when it is *called*, from the module's file
through ``linecache``.  If the file changes after the import (an edit in the checkout while a long
test or build runs), the parser reads the new text at the old line numbers and fails with a
DiagnosticError pointing into an unrelated line.  :func:`pin_source` keeps the text the module was
imported from for the parser instead.
"""
from __future__ import annotations


def pin_source(module_name: str) -> None:
    """Keep the source ``module_name`` was imported from in ``linecache`` for good: an entry whose
    mtime is None is never re-read by ``linecache.checkcache`` (what ``inspect`` and TVMScript's
    parser call before reading a function's lines)."""
    import linecache
    import sys

    module = sys.modules[module_name]
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return
    linecache.cache[path] = (len(text), None, text.splitlines(True), path)
