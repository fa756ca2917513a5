"""One module per compilation target; ``get_target(name)`` returns its TargetSpec."""
from __future__ import annotations

import importlib

from voxc.errors import VoxcError

TARGET_MODULES = {"llvm": "targets.llvm", "cpu": "targets.llvm", "cuda": "targets.cuda", "webgpu": "targets.webgpu",
                  "vulkan": "targets.vulkan", "metal": "targets.vulkan"}


# Targets a module defines besides its TARGET: name -> the module's attribute.
TARGET_ATTRIBUTES = {"metal": "METAL_TARGET"}


def get_target(name: str):
    module_name = TARGET_MODULES.get(name)
    if module_name is None:
        raise VoxcError(f"unknown target {name!r}; choose one of {sorted(set(TARGET_MODULES))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VoxcError(f"target {name!r} is not available in this install: {exc}") from exc
    return getattr(module, TARGET_ATTRIBUTES.get(name, "TARGET"))
