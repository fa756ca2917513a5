"""The native WebGPU device plugin: voxc's C++ DeviceAPI + module loader for TVM's runtime on top of
wgpu-native (``targets/wgpu_plugin/voxc_wgpu_device.cc``), built once per toolchain into a cache and
copied into every vulkan/metal artifact (voxc/runtime/wgpu_device.py loads it from there).

It compiles against the installed wheels' headers: wgpu-native's ``webgpu.h``/``wgpu.h`` (they ship in
the wgpu wheel next to ``libwgpu_native``), TVM's and tvm-ffi's, plus the serializer headers the
apache-tvm wheel lacks (``targets/web_runtime_headers``, shared with the web runtime's build).  It
links libtvm_runtime and libtvm_ffi; wgpu-native's symbols stay undefined and resolve against the
library the runtime loads first from the installed wgpu package, so one plugin fits any copy of it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from targets.web_toolchain import HEADERS_DIR, _headers_hash, _publish, _run, _versions, default_cache_dir
from voxc.errors import VoxcError

PLUGIN_SOURCE = Path(__file__).resolve().parent / "wgpu_plugin" / "voxc_wgpu_device.cc"
PLUGIN_NAME = "voxc_wgpu_device.so"
CXX_HINT = ("install a C++ compiler: apt-get install g++ (Debian/Ubuntu), xcode-select --install (macOS), "
            "or set CXX")
WGPU_HINT = "pip install wgpu==0.32.0 (its wheel ships wgpu-native's library and headers)"
_CXX_FLAGS = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wno-ignored-attributes"]


def find_cxx() -> str:
    """The C++ compiler for the plugin: $CXX, else c++ / g++ / clang++ on PATH."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise VoxcError(f"the vulkan/metal targets compile a small C++ device plugin, and no C++ compiler was found; "
                    f"{CXX_HINT}")


def wgpu_resources() -> Path:
    """The wgpu wheel's resources folder (webgpu.h, wgpu.h, libwgpu_native), found without importing wgpu."""
    spec = importlib.util.find_spec("wgpu")
    if spec is None or not spec.submodule_search_locations:
        raise VoxcError(f"the vulkan/metal targets run WGSL through wgpu-native, which is not installed; {WGPU_HINT}")
    resources = Path(list(spec.submodule_search_locations)[0]) / "resources"
    if not (resources / "webgpu.h").is_file() or not (resources / "wgpu.h").is_file():
        raise VoxcError(f"the installed wgpu package has no webgpu.h/wgpu.h in {resources}; {WGPU_HINT}")
    return resources


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip() if out.returncode == 0 else cxx


def _link_flags() -> list[str]:
    import tvm
    import tvm_ffi

    tvm_lib = Path(tvm.__file__).resolve().parent / "lib"
    ffi_lib = Path(tvm_ffi.__file__).resolve().parent / "lib"
    shared = ["-dynamiclib", "-undefined", "dynamic_lookup"] if sys.platform == "darwin" else ["-shared"]
    return [*shared, f"-L{tvm_lib}", "-ltvm_runtime", f"-L{ffi_lib}", "-ltvm_ffi"]


def _include_flags(resources: Path) -> list[str]:
    import tvm
    import tvm_ffi

    tvm_dir, ffi_dir = Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent
    # voxc's headers first: the wheel ships src/runtime/metadata.h but not src/support/bytes_io.h
    return [f"-I{resources}", f"-I{HEADERS_DIR / 'include'}", f"-I{HEADERS_DIR}", f"-I{tvm_dir}",
            f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}"]


def plugin_key(cxx: str, resources: Path) -> str:
    v = _versions()
    ident = json.dumps({**v, "cxx": _compiler_version(cxx), "flags": _CXX_FLAGS, "platform": sys.platform,
                        "source": hashlib.sha256(PLUGIN_SOURCE.read_bytes()).hexdigest(),
                        "headers": _headers_hash(),
                        "wgpu": hashlib.sha256((resources / "webgpu.h").read_bytes()
                                               + (resources / "wgpu.h").read_bytes()).hexdigest()}, sort_keys=True)
    return f"tvm{v['tvm']}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def ensure_wgpu_plugin(cache_dir: str | Path | None = None) -> Path:
    """Build (once) and return the plugin library; cached under ``<cache>/wgpu-plugin/<key>``, the key
    covering the source, the compiler, the tvm/tvm-ffi versions and every header (about 5 s)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cxx = find_cxx()
    resources = wgpu_resources()
    final = cache / "wgpu-plugin" / plugin_key(cxx, resources)
    if (final / "BUILD_INFO.json").exists():
        return final / PLUGIN_NAME
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _run([cxx, *_CXX_FLAGS, *_include_flags(resources), PLUGIN_SOURCE, "-o", tmp / PLUGIN_NAME, *_link_flags()],
             what="compiling voxc's wgpu device plugin")
        (tmp / "BUILD_INFO.json").write_text(json.dumps(
            {**_versions(), "cxx": _compiler_version(cxx), "flags": _CXX_FLAGS}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return final / PLUGIN_NAME
