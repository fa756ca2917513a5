"""Imports go one way: every module of voxc/, schedules/ and targets/ imports only modules of lower
layers (or its own package), the runtime never imports the compiler, and no layer is ever imported
by a lower one.  The layers, bottom to top, are the README's architecture picture."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module prefix, layer): a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("voxc.errors", 0),
    ("voxc.config", 1), ("voxc.quant.formats", 1), ("voxc.quant.packing", 1), ("voxc.quant", 1),
    ("voxc.artifact", 2),
    ("voxc.tokenizer", 3), ("voxc.audio", 3),
    ("voxc.runtime", 4), ("voxc.loader", 4),
    ("voxc.quant.gguf_writer", 5),
    ("schedules", 6),
    ("voxc.model", 7),
    ("targets", 8),
    ("voxc.build", 9), ("voxc.cli", 9), ("voxc.quant.cli", 9), ("voxc.server", 9), ("voxc", 9),
]
LAYER_NAMES = {0: "errors", 1: "config and formats", 2: "artifact contract", 3: "tokenizer and audio",
               4: "runtime and loaders", 5: "quantized file writer", 6: "schedules", 7: "model graph",
               8: "targets", 9: "build, CLI and server"}
# Below the model graph nothing needs the compiler: a server installs TVM's runtime libraries only.
COMPILER_FREE_BELOW = 6


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "voxc" and len(parts) > 2 else parts[0] if parts[0] != "voxc" else module


def modules():
    for top in ("voxc", "schedules", "targets"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from voxc import artifact` imports the submodule voxc.artifact, `from voxc.errors import
            # VoxcError` the module voxc.errors
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in KNOWN else base, node.lineno))
    return found


KNOWN = {m for m, _ in modules()}


def violations():
    out = []
    for module, path in modules():
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
        for target, line in imports_of(path, module):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}"
            if own < COMPILER_FREE_BELOW and (target == "tvm" or target.startswith("tvm.")):
                out.append(f"{where}: {module} ({LAYER_NAMES[own]}) imports the compiler ({target})")
            theirs = layer_of(target)
            if theirs is None or package_of(target) == package_of(module):
                continue
            if theirs > own:
                out.append(f"{where}: {module} ({LAYER_NAMES[own]}) imports {target} ({LAYER_NAMES[theirs]}), "
                           f"a higher layer")
            elif theirs == own and package_of(target) != package_of(module) and own not in (9,):
                out.append(f"{where}: {module} imports {target} of the same layer ({LAYER_NAMES[own]}) "
                           f"from another package")
    return sorted(set(out))


def test_imports_only_go_down():
    found = violations()
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_runtime_never_imports_targets_and_targets_never_import_the_runtime():
    for module, path in modules():
        for target, line in imports_of(path, module):
            if module.startswith("voxc.runtime"):
                assert not target.startswith(("targets", "schedules", "voxc.model", "voxc.build")), (module, target)
            if module.startswith("targets"):
                assert not target.startswith("voxc.runtime"), (module, target)


@pytest.mark.parametrize("bad, expected", [
    ("voxc.artifact", "imports voxc.model.graph (model graph), a higher layer"),
    ("voxc.runtime.model", "imports the compiler"),
])
def test_the_check_names_an_upward_import(tmp_path, monkeypatch, bad, expected):
    """The walker itself: a planted upward import is reported with file, line and layers."""
    path = ROOT / (bad.replace(".", "/") + ".py")
    planted = tmp_path / path.name
    extra = "\nfrom voxc.model.graph import VoxtralGraph\n" if "model" in expected else "\nimport tvm.relax\n"
    planted.write_text(path.read_text() + extra)
    real_modules = list(modules())
    monkeypatch.setattr(__import__(__name__), "modules",
                        lambda: [(m, planted if m == bad else p) for m, p in real_modules])
    found = violations()
    assert any(expected in v and bad in v for v in found), found
