"""The command line as a user meets it: help, the make-tiny -> build -> transcribe path, and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import voxc
from voxc.artifact import seal
from voxc.build import build

from clips import sine_with_noise


def voxc_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "voxc.cli", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"voxc {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_ckpt_dir):
    out = tmp_path_factory.mktemp("cli") / "tiny-llvm"
    build(tiny_ckpt_dir, "llvm", out, progress=False)
    return out


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "clip.wav"
    soundfile.write(path, sine_with_noise(seconds=2.0), 16000, subtype="FLOAT")
    return path


def test_help_teaches_every_command():
    out = voxc_cli("--help").stdout
    for command in ("make-tiny", "build", "transcribe", "demo", "quantize", "verify"):
        assert command in out
    for command in ("make-tiny", "build", "transcribe", "quantize", "verify"):
        assert "usage: voxc " + command in voxc_cli(command, "--help").stdout


def test_make_tiny_build_transcribe(tmp_path, wav):
    voxc_cli("make-tiny", tmp_path / "ckpt", "--seed", "3")
    assert (tmp_path / "ckpt" / "params.json").exists() and (tmp_path / "ckpt" / "tekken.json").exists()
    built = voxc_cli("build", tmp_path / "ckpt", "--target", "llvm", "-o", tmp_path / "art")
    assert "compiling" in built.stderr  # progress is shown
    offline = voxc_cli("transcribe", wav, "--model", tmp_path / "art").stdout.strip()
    streamed = voxc_cli("transcribe", wav, "--model", tmp_path / "art", "--stream", "--chunk-ms", "130").stdout.strip()
    expected = voxc.load(tmp_path / "art").transcribe(soundfile.read(wav, dtype="float32")[0]).strip()
    assert offline == streamed == expected


def test_other_sample_rates_are_resampled(tmp_path, artifact, wav):
    audio, _ = soundfile.read(wav, dtype="float32")
    stereo_44k = tmp_path / "stereo44k.wav"
    import soxr
    resampled = soxr.resample(audio, 16000, 44100)
    soundfile.write(stereo_44k, np.stack([resampled, resampled], 1), 44100)
    result = voxc_cli("transcribe", stereo_44k, "--model", artifact)
    assert result.returncode == 0


@pytest.mark.parametrize("case", ["missing_audio", "empty_audio", "not_an_artifact", "bad_delay", "mic_and_file",
                                  "truncated_weights", "wrong_format", "no_microphone"])
def test_errors_are_one_clear_line(tmp_path, artifact, wav, case):
    import shutil
    args = ["transcribe", wav, "--model", artifact]
    if case == "missing_audio":
        args[1] = tmp_path / "nope.wav"
    elif case == "empty_audio":
        empty = tmp_path / "empty.wav"
        soundfile.write(empty, np.zeros(0, np.float32), 16000)
        args[1] = empty
    elif case == "not_an_artifact":
        args[3] = tmp_path
    elif case == "bad_delay":
        args += ["--delay-ms", "100"]
    elif case == "mic_and_file":
        args += ["--mic"]
    elif case == "no_microphone":  # CI machines have neither sounddevice nor a sound card
        args = ["transcribe", "--mic", "--model", artifact]
    else:
        broken = tmp_path / "broken"
        shutil.copytree(artifact, broken)
        args[3] = broken
        if case == "truncated_weights":
            shard = next(broken.glob("params_shard_*.bin"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        else:
            manifest = json.loads((broken / "voxc-artifact.json").read_text())
            manifest["format"] = 999
            (broken / "voxc-artifact.json").write_text(json.dumps(manifest))
    result = voxc_cli(*args, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("voxc: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_runtime_needs_no_compiler(artifact, wav):
    """A server installs TVM's runtime libraries only: loading and transcribing must not import tvm."""
    import importlib.util
    lib_dir = f"{list(importlib.util.find_spec('tvm').submodule_search_locations)[0]}/lib"
    script = f"""
import sys
class NoTVM:
    def find_spec(self, name, path=None, target=None):
        if name == "tvm" or name.startswith("tvm."):
            raise ImportError("the TVM compiler is not installed here")
sys.meta_path.insert(0, NoTVM())
import soundfile, voxc
model = voxc.load({str(artifact)!r})
print(repr(model.transcribe(soundfile.read({str(wav)!r}, dtype="float32")[0])))
"""
    env = {**__import__("os").environ, "VOXC_TVM_LIB_DIR": lib_dir}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    expected = voxc.load(artifact).transcribe(soundfile.read(wav, dtype="float32")[0])
    assert result.stdout.strip() == repr(expected)


def test_cpu_artifact_records_its_instruction_set(artifact):
    from voxc.artifact import ISA_FLAGS
    from voxc.runtime.model import host_cpu_flags

    cpu = json.loads((artifact / "voxc-artifact.json").read_text())["cpu"]
    flags = host_cpu_flags()
    assert cpu["mcpu"] != "generic"              # the default compiles for this machine
    if flags is not None and "avx2" in flags:
        assert {"avx", "avx2", "fma"} <= set(cpu["isa"])
    if flags is not None:
        assert all(ISA_FLAGS[f] in flags for f in cpu["isa"])


def test_an_artifact_for_a_newer_cpu_is_refused_not_crashed(tmp_path, artifact, monkeypatch):
    from voxc.runtime import model as runtime_model

    copy = tmp_path / "art"
    copy.mkdir()
    for f in artifact.iterdir():
        (copy / f.name).symlink_to(f)
    manifest = json.loads((artifact / "voxc-artifact.json").read_text())
    manifest["cpu"] = {"mcpu": "sapphirerapids", "isa": ["avx2", "avx512f", "amx-tile"]}
    (copy / "voxc-artifact.json").unlink()
    (copy / "voxc-artifact.json").write_text(json.dumps(seal(manifest)))   # as a build for that CPU writes it
    monkeypatch.setattr(runtime_model, "host_cpu_flags", lambda: {"sse2", "avx", "avx2"})
    with pytest.raises(voxc.VoxcError, match=r"sapphirerapids.*avx512f, amx-tile.*--cpu generic"):
        voxc.load(copy)


def test_generic_cpu_build_runs_anywhere_and_matches_native(tmp_path, tiny_ckpt_dir, artifact):
    generic = build(tiny_ckpt_dir, "llvm", tmp_path / "generic", progress=False, cpu="generic")
    cpu = json.loads((generic / "voxc-artifact.json").read_text())["cpu"]
    assert cpu["mcpu"] == "generic" and not {"avx", "avx2", "fma", "avx512f"} & set(cpu["isa"])
    pcm = sine_with_noise(seconds=2.0)
    a, b = voxc.load(generic), voxc.load(artifact)
    sa, sb = a.stream(), b.stream()
    for s in (sa, sb):
        s.record_logits = True
        s.feed(pcm)
        s.finish()
    assert sa.tokens == sb.tokens
    la, lb = np.stack(sa.logits), np.stack(sb.logits)
    assert np.abs(la - lb).max() / np.abs(lb).max() < 1e-4    # FMA contraction only


def test_unknown_cpu_is_a_clear_error(tmp_path, tiny_ckpt_dir):
    result = voxc_cli("build", tiny_ckpt_dir, "--target", "llvm", "--cpu", "pentium-9000", "-o", tmp_path / "x",
                      check=False)
    assert result.returncode != 0 and "pentium-9000" in result.stderr and "Traceback" not in result.stderr
    result = voxc_cli("build", tiny_ckpt_dir, "--target", "webgpu", "--cpu", "native", "-o", tmp_path / "y",
                      check=False)
    assert result.returncode != 0 and "--cpu applies to the llvm" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_negative_kv_seconds(artifact):
    result = voxc_cli("serve", artifact, "--kv-seconds", "-1", check=False)
    assert result.returncode != 0
    assert "--kv-seconds must be a number of seconds >= 0" in result.stderr and len(result.stderr.strip().splitlines()) == 1
