"""The web toolchain: TVM's C++ web runtime built with Emscripten, the tvmjs bundle, and the link of
a compiled model into ``model.wasm``.

The apache-tvm wheel ships the *sources* of both but no built artifacts, so this module builds them
once per (tvm, tvm-ffi, emcc) version into a cache:

* ``ensure_web_runtime``: TVM's C++ web runtime (``web/emcc/{wasm_runtime,tvmjs_support,
  webgpu_runtime}.cc``), compiled with Debian's emscripten from a TVM_HOME-like tree assembled from
  the wheel.  The wheel lacks nine small headers those sources include; voxc's own minimal versions
  live in ``targets/web_runtime_headers/`` (see its README).
* ``build_tvmjs``: the tvmjs bundle (``lib/index.js``), rolled up from the wheel's ``web/src`` with
  a pinned minimal npm toolchain (the wheel's package-lock.json is out of sync, so ``npm ci``
  fails).  ``source="npm"`` instead unpacks the pinned npm package ``@mlc-ai/web-runtime``.
* ``export_wasm``: links a compiled executable with the runtime.

Link speed: ``tvm.support.emcc.create_tvmjs_wasm`` links the runtime as LLVM *bitcode* at -O3, so
every export re-runs LLVM code generation on 16 MB of runtime bitcode plus binaryen -O3 (70-140 s
on 2 cores).  voxc instead compiles the runtime once to wasm *object files* and links those; the
default link (``optimize=False``) skips binaryen and takes about one second (6.6 MB wasm with
function names, useful in browser stack traces); ``optimize=True`` runs binaryen -O2 (3.9 MB,
30-40 s) for published bundles.  Both use create_tvmjs_wasm's flags otherwise.  TVM's own
exporter can't take the objects: it looks runtime files up by their ``.bc`` names.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from voxc.errors import VoxcError

HEADERS_DIR = Path(__file__).resolve().parent / "web_runtime_headers"
EMCC_HINT = "install Emscripten: apt-get install emscripten"
NPM_HINT = "install Node.js and npm (node 18+), e.g. apt-get install nodejs npm"
RUNTIME_SOURCES = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")  # slowest first
# The exact tool versions the wheel's web/package-lock.json resolves to, minus lint/test/doc tools.
TVMJS_BUILD_DEPS = {
    "rollup": "4.62.2",
    "@rollup/plugin-commonjs": "29.0.3",
    "@rollup/plugin-node-resolve": "16.0.3",
    "@rollup/plugin-typescript": "12.3.0",
    "rollup-plugin-ignore": "1.0.10",
    "typescript": "5.9.3",
    "tslib": "2.8.1",
    "@webgpu/types": "0.1.71",
    "@types/node": "25.9.5",
}
TVMJS_NPM_PACKAGE = "@mlc-ai/web-runtime@0.27.0-dev0"  # the tvmjs build published for TVM 0.27
# create_tvmjs_wasm's link flags (tvm/support/emcc.py), which the model wasm keeps.
_LINK_FLAGS = ["-std=c++17", "--no-entry", "-s", "WASM_BIGINT=1", "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0",
               "-s", "STANDALONE_WASM=1", "-s", "ALLOW_MEMORY_GROWTH=1", "-s", "TOTAL_MEMORY=160MB"]
# web/Makefile's flags for tvmjs_runtime.js, whose JS glue (the wasm imports) tvmjs bundles.
_GLUE_LINK_FLAGS = ["--no-entry", "-s", "WASM_BIGINT=1", "-s", "ALLOW_MEMORY_GROWTH=1", "-s", "STANDALONE_WASM=1",
                    "-s", "ERROR_ON_UNDEFINED_SYMBOLS=0", "-s", "ASYNCIFY=1"]
_CXX_FLAGS = ["-O3", "-std=c++17", "-Wno-ignored-attributes"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("VOXC_CACHE_DIR", Path.home() / ".cache" / "voxc"))


def find_emcc() -> str:
    emcc = shutil.which("emcc")
    if emcc is None:
        raise VoxcError(f"the WebGPU target needs emcc (Emscripten) to link wasm; {EMCC_HINT}")
    return emcc


def emcc_env() -> dict[str, str]:
    """Environment for Debian's emcc: its JS tools need Debian's node modules (acorn), which a
    nodesource/nvm node does not search.  EM_CACHE must stay unset: Debian ships a frozen cache."""
    env = dict(os.environ)
    if Path("/usr/share/nodejs").is_dir():
        env["NODE_PATH"] = os.pathsep.join(p for p in ("/usr/share/nodejs", env.get("NODE_PATH")) if p)
    return env


@functools.lru_cache(maxsize=None)  # ~1 s per call (Debian's emcc is a Python wrapper)
def emcc_version() -> str:
    out = subprocess.run([find_emcc(), "--version"], capture_output=True, text=True, env=emcc_env())
    if out.returncode != 0:
        raise VoxcError(f"emcc --version failed:\n{out.stdout}{out.stderr}")
    return out.stdout.splitlines()[0].strip()


def _run(cmd, *, cwd=None, env=None, what: str) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise VoxcError(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


class _Progress:
    """A tqdm bar over build steps that also ticks the elapsed time while one long step runs."""

    def __init__(self, desc: str, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                        bar_format="{desc}: {n}/{total} steps [{elapsed}] {postfix}")
        self._stop = threading.Event()
        # Ticking the elapsed time only makes sense on a terminal; in a log each refresh is a line.
        self._thread = threading.Thread(target=self._tick, daemon=True) if sys.stderr.isatty() else None
        if self._thread:
            self._thread.start()

    def _tick(self):
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def step(self, note: str):
        self.bar.set_postfix_str(note, refresh=True)

    def done(self, n: int = 1):
        self.bar.update(n)

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.bar.close()


def _headers_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(HEADERS_DIR.rglob("*.h")):
        h.update(p.relative_to(HEADERS_DIR).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _wheel_dirs() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    tvm_dir, ffi_dir = Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent
    for p in (tvm_dir / "web" / "emcc", tvm_dir / "src", tvm_dir / "include", ffi_dir / "include", ffi_dir / "src"):
        if not p.is_dir():
            raise VoxcError(f"the installed apache-tvm / apache-tvm-ffi wheels lack {p}; reinstall them")
    return tvm_dir, ffi_dir


def _versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished build into place; a concurrent builder that won keeps its copy."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "BUILD_INFO.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ---- C++ web runtime -------------------------------------------------------------------------------
def runtime_key() -> str:
    v = _versions()
    ident = json.dumps({**v, "emcc": emcc_version(), "cxx": _CXX_FLAGS, "headers": _headers_hash()}, sort_keys=True)
    return f"tvm{v['tvm']}-ffi{v['tvm_ffi']}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def ensure_web_runtime(cache_dir: str | Path | None = None, *, bitcode: bool = False, progress: bool = True) -> Path:
    """Build (once) and return a TVM_HOME-like tree whose ``web/dist/wasm`` holds TVM's web runtime
    as wasm objects (``*.o``, what ``export_wasm`` links) and, with ``bitcode=True``, as the
    ``*.bc`` files ``tvm.support.emcc.create_tvmjs_wasm`` expects under ``$TVM_HOME``.

    Cached under ``<cache_dir or ~/.cache/voxc>/web-runtime/<key>``, the key covering the tvm and
    tvm-ffi versions, emcc's version, the compile flags and voxc's headers.  About 85 s for the
    objects on 2 cores (wasm_runtime.cc is one big translation unit), as much again for bitcode.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    emcc = find_emcc()
    root = cache / "web-runtime" / runtime_key()
    wanted = [f"{n}.o" for n in RUNTIME_SOURCES] + ([f"{n}.bc" for n in RUNTIME_SOURCES] if bitcode else [])
    dist = root / "web" / "dist" / "wasm"
    if (root / "BUILD_INFO.json").exists() and all((dist / w).exists() for w in wanted):
        return root

    if root.exists():  # built earlier without the bitcode: add it in place
        tmp, final = root, root
    else:
        tmp, final = root.with_name(f"{root.name}.tmp-{os.getpid()}"), root
        shutil.rmtree(tmp, ignore_errors=True)
        _assemble_tree(tmp)
    bar = _Progress("voxc web runtime (emcc)", len(wanted), progress)
    timings: dict[str, float] = {}
    try:
        (tmp / "web" / "dist" / "wasm").mkdir(parents=True, exist_ok=True)
        jobs = [w for w in wanted if not (tmp / "web" / "dist" / "wasm" / w).exists()]
        bar.step("compiling " + ", ".join(jobs) + " (wasm_runtime takes 1.5-2 min)")

        def build(out_name: str) -> None:
            t0 = time.perf_counter()
            stem, kind = out_name.rsplit(".", 1)
            out = tmp / "web" / "dist" / "wasm" / out_name
            part = out.with_name(out.name + ".part")
            cmd = [emcc, *_CXX_FLAGS, *_include_flags(tmp), *(["-emit-llvm"] if kind == "bc" else []),
                   "-c", tmp / "web" / "emcc" / f"{stem}.cc", "-o", part]
            _run(cmd, cwd=tmp / "web", env=emcc_env(), what=f"compiling TVM's web runtime ({stem}.cc)")
            part.rename(out)
            timings[out_name] = round(time.perf_counter() - t0, 1)
            bar.step(f"built {out_name} in {timings[out_name]:.0f} s")
            bar.done()

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for fut in [pool.submit(build, j) for j in jobs]:
                fut.result()
        info_path = tmp / "BUILD_INFO.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {
            **_versions(), "emcc": emcc_version(), "cxx_flags": _CXX_FLAGS, "seconds": {}}
        info["seconds"].update(timings)
        info_path.write_text(json.dumps(info, indent=1))
    except BaseException:
        if tmp != final:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if tmp != final:
        _publish(tmp, final)
    return final


def _include_flags(root: Path) -> list[str]:
    # web/Makefile's INCLUDE_FLAGS
    return [f"-I{root}", f"-I{root / 'include'}", f"-I{root / '3rdparty/tvm-ffi/include'}",
            f"-I{root / '3rdparty/tvm-ffi/3rdparty/dlpack/include'}", f"-I{root / '3rdparty/compiler-rt'}"]


def _assemble_tree(root: Path) -> None:
    """TVM_HOME layout from the wheel (tvm/{src,include,web}, tvm_ffi as 3rdparty/tvm-ffi) plus
    voxc's headers; the wheel's node_modules-free web/ sources are all the build reads."""
    tvm_dir, ffi_dir = _wheel_dirs()
    ignore = shutil.ignore_patterns("__pycache__", "node_modules", "*.pyc")
    for name in ("src", "include", "web"):
        shutil.copytree(tvm_dir / name, root / name, ignore=ignore)
    for name in ("include", "src", "3rdparty"):
        if (ffi_dir / name).is_dir():
            shutil.copytree(ffi_dir / name, root / "3rdparty" / "tvm-ffi" / name, ignore=ignore)
    for src in HEADERS_DIR.rglob("*.h"):
        dst = root / src.relative_to(HEADERS_DIR)
        if dst.exists():  # a newer wheel ships it: prefer TVM's own
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def runtime_objects(root: Path) -> list[Path]:
    return [root / "web" / "dist" / "wasm" / f"{n}.o" for n in RUNTIME_SOURCES]


# ---- linking ---------------------------------------------------------------------------------------
def link_wasm(output: str | Path, objects, *, runtime_root: Path, optimize: bool = False, options=None) -> None:
    """emcc-link model objects with the prebuilt runtime objects (create_tvmjs_wasm's flags).
    -O1 skips binaryen entirely (the objects are already -O3); -O2 runs binaryen over the module."""
    objects = [objects] if isinstance(objects, (str, Path)) else list(objects)
    cmd = [find_emcc(), "-O2" if optimize else "-O1", *_LINK_FLAGS, "-o", output,
           *runtime_objects(runtime_root), *objects, *(options or [])]
    _run(cmd, env=emcc_env(), what="linking the wasm module")


def export_wasm(executable, out_path: str | Path, *, cache_dir: str | Path | None = None,
                optimize: bool = False, progress: bool = True) -> Path:
    """Export a WebGPU executable to a self-contained ``.wasm`` for tvmjs.

    TVM emits the host code as a wasm *object* (``object_format = "o"``): emscripten 3.1.6's
    LLVM 14 cannot read the LLVM 22 bitcode TVM would emit by default.
    """
    out_path = Path(out_path)
    root = ensure_web_runtime(cache_dir, progress=progress)

    def fcompile(output, objects, options=None):
        link_wasm(output, objects, runtime_root=root, optimize=optimize, options=options)

    fcompile.object_format = "o"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out_path), fcompile=fcompile)
    return out_path


# ---- tvmjs (the JS runtime) ------------------------------------------------------------------------
def build_tvmjs(cache_dir: str | Path | None = None, *, source: str = "wheel", progress: bool = True) -> Path:
    """Build (once) and return the path of tvmjs's ``index.js`` (UMD; sets ``globalThis.tvmjs``).

    ``source="wheel"`` (default) rolls up the installed wheel's ``web/src`` so the JS matches the
    C++ runtime exactly; its emscripten glue (``tvmjs_runtime_wasi.js``: the libc/WASI imports of
    the wasm) comes from linking the runtime objects with web/Makefile's flags.  Needs npm and
    network access once (9 pinned build packages, ~35 MB node_modules, then cached).
    ``source="npm"`` unpacks the pinned ``@mlc-ai/web-runtime`` package instead (one download).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source == "npm":
        return _tvmjs_from_npm(cache, progress)
    if source != "wheel":
        raise VoxcError(f"unknown tvmjs source {source!r}; use 'wheel' or 'npm'")
    npm = shutil.which("npm")
    if npm is None:
        raise VoxcError(f"building tvmjs needs npm; {NPM_HINT}")
    runtime_root = ensure_web_runtime(cache, progress=progress)
    key = runtime_root.name + "-" + hashlib.sha256(json.dumps(TVMJS_BUILD_DEPS, sort_keys=True).encode()).hexdigest()[:8]
    final = cache / "tvmjs" / key
    index = final / "lib" / "index.js"
    if index.exists():
        return index

    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bar = _Progress("voxc tvmjs (emcc glue, npm, rollup)", 3, progress)
    timings = {}
    try:
        web = runtime_root / "web"
        shutil.copytree(web / "src", tmp / "src")
        shutil.copy2(web / "tsconfig.json", tmp / "tsconfig.json")
        glue = tmp / "glue"
        glue.mkdir()

        t0 = time.perf_counter()
        bar.step("linking the runtime's JS glue with emcc (about 40 s)")
        _run([find_emcc(), "-O1", "-std=c++17", "-o", glue / "tvmjs_runtime.js", *runtime_objects(runtime_root),
              *_GLUE_LINK_FLAGS, "--pre-js", web / "emcc" / "preload.js"], env=emcc_env(),
             what="linking tvmjs_runtime.js")
        _run([sys.executable, web / "emcc" / "decorate_as_wasi.py", glue / "tvmjs_runtime.js",
              tmp / "src" / "tvmjs_runtime_wasi.js", "es"], what="decorate_as_wasi.py")
        shutil.rmtree(glue)
        timings["glue"] = round(time.perf_counter() - t0, 1)
        bar.done()

        t0 = time.perf_counter()
        bar.step("npm install (pinned rollup + typescript)")
        (tmp / "package.json").write_text(json.dumps(
            {"name": "voxc-tvmjs-build", "private": True, "type": "module",
             "devDependencies": TVMJS_BUILD_DEPS}, indent=1))
        _run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=tmp, what="npm install")
        timings["npm_install"] = round(time.perf_counter() - t0, 1)
        bar.done()

        t0 = time.perf_counter()
        bar.step("rollup")
        (tmp / "rollup.config.mjs").write_text(_ROLLUP_CONFIG)
        _run([tmp / "node_modules" / ".bin" / "rollup", "-c"], cwd=tmp, what="rollup (tvmjs)")
        timings["rollup"] = round(time.perf_counter() - t0, 1)
        bar.done()

        shutil.rmtree(tmp / "node_modules")  # 35 MB, only needed for the build
        (tmp / "BUILD_INFO.json").write_text(json.dumps(
            {**_versions(), "source": "wheel", "build_deps": TVMJS_BUILD_DEPS, "seconds": timings}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    return index


# voxc's rollup config: one UMD file, as the wheel's web/rollup.config.mjs produces (node-only
# modules are stubbed out for the browser; ws/perf_hooks are only required under Node).
_ROLLUP_CONFIG = """\
import commonjs from "@rollup/plugin-commonjs";
import ignore from "rollup-plugin-ignore";
import resolve from "@rollup/plugin-node-resolve";
import typescript from "@rollup/plugin-typescript";

export default {
  input: "src/index.ts",
  output: { file: "lib/index.js", format: "umd", name: "tvmjs", exports: "named",
            globals: { ws: "ws", perf_hooks: "perf_hooks" } },
  plugins: [ignore(["fs", "path", "crypto"]), resolve({ browser: true }), commonjs(),
            typescript({ tsconfig: "./tsconfig.json", declaration: false, sourceMap: false })],
  external: ["ws", "perf_hooks"],
};
"""


def _tvmjs_from_npm(cache: Path, progress: bool) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise VoxcError(f"fetching tvmjs needs npm; {NPM_HINT}")
    final = cache / "tvmjs" / ("npm-" + TVMJS_NPM_PACKAGE.replace("@", "").replace("/", "-"))
    index = final / "lib" / "index.js"
    if index.exists():
        return index
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = _run([npm, "pack", TVMJS_NPM_PACKAGE, "--pack-destination", tmp, "--json"], cwd=tmp, what="npm pack")
        tgz = tmp / json.loads(out)[0]["filename"]
        with tarfile.open(tgz) as tf:
            member = tf.getmember("package/lib/index.js")
            (tmp / "lib").mkdir()
            (tmp / "lib" / "index.js").write_bytes(tf.extractfile(member).read())
        tgz.unlink()
        (tmp / "BUILD_INFO.json").write_text(json.dumps({"source": "npm", "package": TVMJS_NPM_PACKAGE}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return index


# ---- the browser bundle ----------------------------------------------------------------------------
