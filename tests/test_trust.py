"""Artifacts and commands a user can trust: builds are atomic and validate their inputs first, damaged
artifacts are named instead of crashing or transcribing garbage, nothing a user has is overwritten
without --force, and every bad input is one clear line."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import voxc
from voxc.build import build
from voxc.errors import VoxcError

from clips import sine_with_noise

CLIP = sine_with_noise(seconds=1.5)


def voxc_cli(*args, check=False):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"voxc {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def one_line_error(result, *fragments):
    assert result.returncode == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("voxc: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_ckpt_dir):
    """A built artifact and the transcript of CLIP through it."""
    out = tmp_path_factory.mktemp("trust") / "art"
    build(tiny_ckpt_dir, "llvm", out, progress=False)
    return out, voxc.load(out).transcribe(CLIP)


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def debris(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".voxc-build-" in p.name or ".voxc-old-" in p.name]


# ---- atomic builds ----------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def failing_target(stage: str):
    """The llvm target, interrupted at ``stage`` (after compiling, while writing the artifact)."""
    from targets.llvm import TARGET

    @dataclasses.dataclass(frozen=True)
    class Failing(type(TARGET)):
        def package(self, out_dir, **kwargs):
            if stage == "package":
                (Path(out_dir) / "half-written").write_bytes(b"x")
                raise KeyboardInterrupt   # as Ctrl-C would
            return super().package(out_dir, **kwargs)

        def export(self, executable, out_dir):
            path = super().export(executable, out_dir)
            if stage == "export":
                raise _Interrupted("disk full")
            return path

    return Failing()


@pytest.mark.parametrize("stage", ["export", "package"])
def test_a_failed_rebuild_keeps_the_old_artifact(tmp_path, tiny_ckpt_dir, good, stage):
    art = tmp_path / "art"
    shutil.copytree(good[0], art)
    before = snapshot(art)
    with pytest.raises((_Interrupted, KeyboardInterrupt)):
        build(tiny_ckpt_dir, failing_target(stage), art, progress=False, force=True, quantization="q8_0")
    assert snapshot(art) == before
    assert debris(tmp_path) == []
    assert voxc.load(art).transcribe(CLIP) == good[1]


def test_a_failed_first_build_leaves_nothing(tmp_path, tiny_ckpt_dir):
    with pytest.raises(_Interrupted):
        build(tiny_ckpt_dir, failing_target("export"), tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    build(tiny_ckpt_dir, "llvm", tmp_path / "new", progress=False)   # and the next build is not refused
    assert voxc.load(tmp_path / "new").transcribe(CLIP)


def test_inputs_are_validated_before_compiling(tmp_path, tiny_ckpt_dir, monkeypatch):
    """A broken tokenizer or option fails in seconds, not after the compile."""
    from targets.llvm import LlvmTarget

    def no_compile(self, mod, report=None):
        raise AssertionError("compiled before validating the inputs")

    monkeypatch.setattr(LlvmTarget, "compile", no_compile)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_dir, ckpt)
    (ckpt / "tekken.json").write_text('{"config": {"pattern": 1}}')
    with pytest.raises(VoxcError, match="not a valid Tekken tokenizer"):
        build(ckpt, "llvm", tmp_path / "a", progress=False)
    with pytest.raises(VoxcError, match="left padding"):
        build(tiny_ckpt_dir, "llvm", tmp_path / "b", progress=False, left_pad_tokens=-5)
    with pytest.raises(VoxcError, match="--cpu"):
        build(tiny_ckpt_dir, "llvm", tmp_path / "c", progress=False, cpu="no-such-cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_outputs_are_never_overwritten_without_force(tmp_path, tiny_ckpt_dir, good):
    art = tmp_path / "art"
    shutil.copytree(good[0], art)
    one_line_error(voxc_cli("build", tiny_ckpt_dir, "-o", art), "--force")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    one_line_error(voxc_cli("build", tiny_ckpt_dir, "-o", mine), "not empty", "--force")
    assert (mine / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    one_line_error(voxc_cli("build", tiny_ckpt_dir, "-o", a_file), "is a file")
    one_line_error(voxc_cli("make-tiny", a_file), "is a file")
    assert a_file.read_text() == "keep me"
    # make-tiny into a real checkpoint directory is refused: it would replace its weights
    one_line_error(voxc_cli("make-tiny", tiny_ckpt_dir), "not empty", "--force")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"precious")
    one_line_error(voxc_cli("quantize", tiny_ckpt_dir, gguf), "--force")
    assert gguf.read_bytes() == b"precious"


def test_artifact_files_are_world_readable(good):
    for path in good[0].iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_builds_print_no_tvm_warnings(tmp_path, tiny_ckpt_dir):
    result = voxc_cli("build", tiny_ckpt_dir, "-o", tmp_path / "a", check=True)
    assert "Warning" not in result.stderr and "segfault" not in result.stderr, result.stderr


# ---- damaged artifacts --------------------------------------------------------------------------
def damaged(tmp_path, good, name, how) -> Path:
    art = tmp_path / "damaged"
    shutil.copytree(good[0], art)
    path = art / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:   # 4 KB of 0xFF in the middle: same size, other bytes
        middle = len(data) // 2
        data[middle:middle + 4096] = b"\xff" * min(4096, len(data) - middle)
    path.write_bytes(bytes(data))
    return art


@pytest.mark.parametrize("name, how", [("model.so", "truncate"), ("model.so", "overwrite"),
                                       ("params_shard_0.bin", "truncate"), ("params_shard_0.bin", "overwrite"),
                                       ("tekken.json", "overwrite"), ("tensor-cache.json", "truncate")])
def test_a_damaged_file_is_named(tmp_path, good, name, how):
    art = damaged(tmp_path, good, name, how)
    # in a child process: a damaged library must never get as far as dlopen (SIGBUS, SIGSEGV)
    result = voxc_cli("transcribe", "--model", art, _wav(tmp_path))
    one_line_error(result, name, "rebuild")


def test_a_fresh_build_loads_without_hashing_and_a_copy_is_hashed(tmp_path, tiny_ckpt_dir, monkeypatch):
    """The build records that its files match their hashes; a copy elsewhere is hashed once."""
    from voxc import artifact

    built = build(tiny_ckpt_dir, "llvm", tmp_path / "fresh", progress=False)
    hashed = []
    real = artifact.file_record
    monkeypatch.setattr(artifact, "file_record", lambda path: hashed.append(Path(path).name) or real(path))
    voxc.load(built)
    assert hashed == []
    shutil.copytree(built, tmp_path / "copy")
    voxc.load(tmp_path / "copy")
    assert "params_shard_0.bin" in hashed and "model.so" in hashed
    hashed.clear()
    voxc.load(tmp_path / "copy")
    assert hashed == []


def test_damage_after_the_first_load_is_found(tmp_path, good):
    art = tmp_path / "art"
    shutil.copytree(good[0], art)
    assert voxc.load(art).transcribe(CLIP) == good[1]   # first load: hashed, stamp written
    shard = art / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[100:4196] = b"\xff" * 4096
    shard.write_bytes(bytes(data))
    with pytest.raises(VoxcError, match="params_shard_0.bin is damaged"):
        voxc.load(art)
    assert voxc.load(art, verify="size")   # the user can still opt out


def test_a_changed_manifest_setting_is_found(tmp_path, good):
    """A manifest edited (or damaged into another valid value) no longer matches its own checksum."""
    art = tmp_path / "art"
    shutil.copytree(good[0], art)
    manifest = json.loads((art / "voxc-artifact.json").read_text())
    manifest["streaming"]["left_pad_tokens"] += 1
    (art / "voxc-artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(VoxcError, match="voxc-artifact.json is damaged"):
        voxc.load(art)


def test_an_artifact_built_before_the_kv_growth_headroom_was_recorded_still_loads(tmp_path, good):
    """The manifest's paged caches gained ``growth_headroom`` (2026-12-07); an artifact without it is
    not corrupt (its web runtime grows pools by doubling), and one with another value is."""
    from voxc import artifact

    art = tmp_path / "before"
    shutil.copytree(good[0], art)
    path = art / "voxc-artifact.json"
    manifest = json.loads(path.read_text())
    paged = [s for s in manifest["state"].values() if s.get("axis") == "pages"]
    assert paged and all(s["growth_headroom"] == artifact.KV_GROWTH_HEADROOM for s in paged)
    for spec in paged:
        del spec["growth_headroom"]
    path.write_text(json.dumps(artifact.seal(manifest)))
    assert voxc.load(art, verify="size").transcribe(CLIP) == good[1]
    paged[0]["growth_headroom"] = artifact.KV_GROWTH_HEADROOM + 1
    path.write_text(json.dumps(artifact.seal(manifest)))
    with pytest.raises(VoxcError, match="state section disagrees"):
        voxc.load(art, verify="size")


def test_verify_command(tmp_path, good):
    assert voxc_cli("verify", good[0], check=True).stdout.strip().endswith("match their checksums")
    art = damaged(tmp_path, good, "params_shard_0.bin", "overwrite")
    one_line_error(voxc_cli("verify", art), "params_shard_0.bin")


def test_an_artifact_of_the_previous_format_asks_for_a_rebuild(tmp_path, good):
    art = tmp_path / "old"
    shutil.copytree(good[0], art)
    manifest = json.loads((art / "voxc-artifact.json").read_text())
    manifest["format"] = 1
    (art / "voxc-artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(VoxcError, match="rebuild"):
        voxc.load(art)


# ---- bad inputs ----------------------------------------------------------------------------------
def _wav(tmp_path, seconds=1.5) -> Path:
    path = tmp_path / "clip.wav"
    if not path.exists():
        soundfile.write(path, sine_with_noise(seconds=seconds), 16000, subtype="FLOAT")
    return path


def test_cli_bad_inputs(tmp_path, tiny_ckpt_dir, good):
    art, wav = good[0], _wav(tmp_path)
    one_line_error(voxc_cli("build", tiny_ckpt_dir, "-o", tmp_path / "x", "--left-pad-tokens", "-5"), "left padding")
    one_line_error(voxc_cli("transcribe", wav, "--model", art, "--chunk-ms", "100"), "--chunk-ms", "--stream")
    one_line_error(voxc_cli("transcribe", wav, "--model", art, "--stream", "--chunk-ms", "0"), "--chunk-ms")


def test_api_bad_inputs(good):
    model = voxc.load(good[0])
    with pytest.raises(VoxcError, match="delay_ms must be a number"):
        model.stream(delay_ms="480")
    with pytest.raises(VoxcError, match="not a file name"):
        model.transcribe("speech.wav")
    with pytest.raises(VoxcError, match="empty"):
        model.transcribe(np.zeros(0, np.float32))
    with pytest.raises(VoxcError, match="left padding"):
        model.stream(left_pad_tokens=-5)
    with pytest.raises(VoxcError, match="max_streams"):
        voxc.load(good[0], max_streams=0)
    with pytest.raises(VoxcError, match="verify"):
        voxc.load(good[0], verify="sometimes")
    session = model.stream()
    assert session.feed(np.zeros(0, np.float32)) == ""   # an empty chunk of a live stream is fine
    session.finish()


def test_quantize_reports_what_it_could_not_store_as_asked(tmp_path, tiny_ckpt_dir):
    """The tiny model's rows (32, 48, 64, 96 values) fit no Q4_K super-block (256): every projection
    falls back, and the table says so; --strict-quantization makes it an error."""
    result = voxc_cli("quantize", tiny_ckpt_dir, tmp_path / "t.gguf", "-t", "q4_k", check=True)
    assert "weights (q4_k requested):" in result.stderr
    assert "not a multiple of Q4_K's 256-value blocks" in result.stderr
    one_line_error(voxc_cli("quantize", tiny_ckpt_dir, tmp_path / "s.gguf", "-t", "q4_k", "--strict-quantization"),
                   "cannot be stored as Q4_K")
    assert not (tmp_path / "s.gguf").exists()
    built = voxc_cli("build", tiny_ckpt_dir, "-o", tmp_path / "b", "-q", "q4_k", check=True)
    assert "not a multiple of Q4_K's 256-value blocks" in built.stderr
    one_line_error(voxc_cli("build", tiny_ckpt_dir, "-o", tmp_path / "c", "-q", "q4_k", "--strict-quantization"),
                   "cannot be stored as Q4_K")


def test_offline_transcription_shows_progress(tmp_path, good):
    """A file longer than 30 s gets a progress bar (audio seconds, RTF) on stderr; stdout is the text,
    the same as without the bar."""
    long_wav = tmp_path / "long.wav"
    soundfile.write(long_wav, sine_with_noise(seconds=41.0), 16000, subtype="FLOAT")
    shown = voxc_cli("transcribe", long_wav, "--model", good[0], check=True)
    assert "audio:" in shown.stderr and "RTF" in shown.stderr and "/41 s" in shown.stderr, shown.stderr
    quiet = voxc_cli("transcribe", long_wav, "--model", good[0], "--quiet", check=True)
    assert quiet.stderr == "" and quiet.stdout == shown.stdout
    assert shown.stdout.strip() == voxc.load(good[0]).transcribe(soundfile.read(long_wav, dtype="float32")[0]).strip()
    os.remove(long_wav)
