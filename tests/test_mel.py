"""voxc.model.mel against transformers' VoxtralRealtimeFeatureExtractor (the reference log-mel)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

from tvm import relax  # noqa: E402

from voxc.errors import VoxcError  # noqa: E402
from voxc.model import mel  # noqa: E402
from voxc.runtime import framing  # noqa: E402
from voxc.config import AudioConfig  # noqa: E402

CFG = AudioConfig()
N_MELS = 128
SR = CFG.sampling_rate
# Max abs difference to the extractor. Its own float32 FFT is off from exact by up to ~3e-5, which is what
# float64 compute measures here (it is within 6e-8 of an exact float64 numpy log-mel). Float32 compute
# measured up to 3.5e-5 against the extractor and 1.8e-5 against exact on these signals.
TOLERANCE = {"float64": 1e-4, "float32": 2e-4}
TOLERANCE_TO_EXACT = {"float64": 2e-7, "float32": 1e-4}
SILENCE_VALUE = (CFG.global_log_mel_max - 8.0 + 4.0) / 4.0   # -0.625: the clipped floor


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def extractor():
    return transformers.VoxtralRealtimeFeatureExtractor()


def reference(extractor, audio: np.ndarray, center: bool) -> np.ndarray:
    features = extractor(audio, sampling_rate=SR, center=center, return_tensors="np")["input_features"]
    return features[0]


class CompiledLogMel:
    """LogMel compiled for llvm, callable on a numpy sample array."""

    def __init__(self, compute_dtype: str):
        self.compute_dtype = compute_dtype
        mod, params = mel.LogMel(CFG, N_MELS, compute_dtype).export_tvm(spec=mel.forward_spec())
        assert [name for name, _ in params] == ["filters"]
        executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self.filters = tvm.runtime.tensor(mel.mel_filter_bank(CFG, N_MELS))

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        return self.vm["forward"](tvm.runtime.tensor(np.asarray(samples)[None]), self.filters).numpy()[0]


@pytest.fixture(scope="session", params=["float64", "float32"])
def log_mel(request) -> CompiledLogMel:
    return CompiledLogMel(request.param)


@pytest.fixture(scope="session")
def log_mel_f64() -> CompiledLogMel:
    return CompiledLogMel("float64")


def _espeak_speech(tmp_dir: Path) -> np.ndarray:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for the synthetic speech signal")
    raw, resampled = tmp_dir / "espeak.wav", tmp_dir / "speech16k.wav"
    text = "The quick brown fox jumps over the lazy dog. Voxtral transcribes speech in real time."
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    # -D: no dither, so the resampled file is deterministic
    subprocess.run(["sox", "-D", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(resampled)],
                   check=True, capture_output=True)
    audio, rate = sf.read(resampled, dtype="float32")
    assert rate == SR
    return audio


def _audioeval_clip(name: str) -> np.ndarray:
    # The package has no __init__ (namespace package) and a pytest plugin that imports httpx, so it is only
    # located here, never imported.
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pytest-audioeval is not installed (pip install --no-deps pytest-audioeval==0.1.3)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "samples" / "audio" / "en" / f"{name}.wav"
        if path.exists():
            audio, rate = sf.read(path, dtype="float32")
            assert rate == SR and audio.ndim == 1
            return audio
    pytest.skip(f"pytest-audioeval has no clip en/{name}.wav")


SIGNALS = ["silence", "sine_1khz", "white_noise", "espeak_speech",
           "audioeval_hello_world", "audioeval_quick_brown_fox", "audioeval_counting"]


@pytest.fixture(scope="session")
def signals(tmp_path_factory):
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            t = np.arange(2 * SR) / SR
            if name == "silence":
                cache[name] = np.zeros(SR + 37, np.float32)
            elif name == "sine_1khz":
                cache[name] = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
            elif name == "white_noise":
                cache[name] = np.random.default_rng(1234).uniform(-0.5, 0.5, 3 * SR + 77).astype(np.float32)
            elif name == "espeak_speech":
                cache[name] = _espeak_speech(tmp_path_factory.mktemp("espeak"))
            else:
                cache[name] = _audioeval_clip(name.removeprefix("audioeval_"))
        return cache[name]

    return get


# ---- LogMel against the extractor ------------------------------------------------------------------------
@pytest.mark.parametrize("signal", SIGNALS)
def test_offline_matches_extractor(log_mel, extractor, signals, signal):
    audio = signals(signal)
    samples, n_frames = framing.offline_padded(audio, CFG)
    expected = reference(extractor, audio, center=True)
    got = log_mel(samples)
    assert n_frames == framing.frame_count(audio.shape[0], CFG) == expected.shape[1]
    assert got.shape == expected.shape == (N_MELS, n_frames)
    assert got.dtype == np.float32
    error = np.abs(got - expected).max()
    assert error <= TOLERANCE[log_mel.compute_dtype], f"{signal}: max abs error {error:.3g}"


def exact_log_mel(audio: np.ndarray) -> np.ndarray:
    """The extractor's algorithm in float64 numpy (np.fft), independent of voxc's framing helpers."""
    half, hop, window = CFG.window_size // 2, CFG.hop_length, CFG.window_size
    padded = np.pad(audio.astype(np.float64), half, mode="reflect")
    n_frames = audio.shape[0] // hop
    frames = padded[np.arange(n_frames)[:, None] * hop + np.arange(window)]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    mel_power = mel.mel_filter_bank(CFG, N_MELS).astype(np.float64).T @ power.T
    log_mel = np.maximum(np.log10(np.maximum(mel_power, 1e-10)), CFG.global_log_mel_max - 8.0)
    return (log_mel + 4.0) / 4.0


@pytest.mark.parametrize("signal", ["sine_1khz", "espeak_speech", "audioeval_counting"])
def test_offline_matches_exact_float64(log_mel, signals, signal):
    audio = signals(signal)
    got = log_mel(framing.offline_padded(audio, CFG)[0])
    error = np.abs(got - exact_log_mel(audio)).max()
    assert error <= TOLERANCE_TO_EXACT[log_mel.compute_dtype], f"{signal}: max abs error {error:.3g}"


@pytest.mark.parametrize("signal", ["sine_1khz", "white_noise", "espeak_speech"])
def test_valid_framing_matches_extractor_without_centering(log_mel, extractor, signals, signal):
    """center=False (streaming chunks after the first in HF): the extractor is LogMel minus its last frame."""
    audio = signals(signal)
    expected = reference(extractor, audio, center=False)
    got = log_mel(audio)
    assert got.shape[1] == framing.valid_frame_count(audio.shape[0], CFG) == expected.shape[1] + 1
    error = np.abs(got[:, :-1] - expected).max()
    assert error <= TOLERANCE[log_mel.compute_dtype], f"{signal}: max abs error {error:.3g}"


def test_silence_is_exactly_the_floor(log_mel):
    samples, n_frames = framing.offline_padded(np.zeros(5 * CFG.hop_length + 3, np.float32), CFG)
    got = log_mel(samples)
    assert got.shape == (N_MELS, n_frames)
    assert np.all(got == np.float32(SILENCE_VALUE)) and SILENCE_VALUE == -0.625


@pytest.mark.parametrize("n_samples", [201, 202, 399, 400, 401, 559, 560, 561, 719, 1681, 12345])
def test_odd_lengths(log_mel, extractor, n_samples):
    audio = np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32) * 0.1
    samples, n_frames = framing.offline_padded(audio, CFG)
    assert samples.shape[0] == framing.samples_for_frames(n_frames, CFG)
    expected = reference(extractor, audio, center=True)
    got = log_mel(samples)
    assert got.shape == expected.shape == (N_MELS, n_samples // CFG.hop_length)
    assert np.abs(got - expected).max() <= TOLERANCE[log_mel.compute_dtype]
    if n_samples >= CFG.window_size + CFG.hop_length:   # center=False drops its one frame: need two
        expected = reference(extractor, audio, center=False)
        got = log_mel(audio)[:, :-1]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE[log_mel.compute_dtype]


def test_rejects_what_the_extractor_cannot_take():
    with pytest.raises(VoxcError, match="too short"):
        framing.offline_padded(np.zeros(CFG.window_size // 2, np.float32), CFG)
    framer = framing.StreamingMelFramer(CFG)
    assert framer.push(np.zeros(CFG.window_size // 2, np.float32)) is None
    with pytest.raises(VoxcError, match="too short"):
        framer.flush()
    with pytest.raises(VoxcError, match="float PCM"):
        framing.offline_padded(np.zeros(16000, np.int16), CFG)


# ---- streaming -------------------------------------------------------------------------------------------
def _random_chunks(audio: np.ndarray, seed: int):
    """Chunks of 1 sample, a few, a few hundred and several seconds, in a seeded random order."""
    rng = np.random.default_rng(seed)
    start = 0
    while start < audio.shape[0]:
        kind = rng.choice(4, p=[0.3, 0.3, 0.3, 0.1])
        size = [1, int(rng.integers(2, 50)), int(rng.integers(50, 3000)), int(rng.integers(SR, 4 * SR))][kind]
        yield audio[start:start + size]
        start += size


def _framer_windows(audio: np.ndarray, frames_per_step: int, seed: int) -> list[np.ndarray]:
    framer = framing.StreamingMelFramer(CFG, frames_per_step)
    windows = []
    for chunk in _random_chunks(audio, seed):
        window = framer.push(chunk)
        if window is not None:
            n_frames = framing.valid_frame_count(window.shape[0], CFG)
            assert window.shape[0] == framing.samples_for_frames(n_frames, CFG)
            assert n_frames % frames_per_step == 0
            windows.append(window)
    assert framer.frames_emitted <= framing.frame_count(audio.shape[0], CFG)
    last = framer.flush()
    if last is not None:
        windows.append(last)
    assert framer.frames_emitted == framing.frame_count(audio.shape[0], CFG)
    return windows


def _frames_of(samples: np.ndarray) -> np.ndarray:
    """All valid-framing windows of ``samples``, [n_frames, window]: what LogMel reads per frame."""
    n_frames = framing.valid_frame_count(samples.shape[0], CFG)
    starts = np.arange(n_frames) * CFG.hop_length
    return samples[starts[:, None] + np.arange(CFG.window_size)]


@pytest.mark.parametrize("frames_per_step", [8, 1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_framer_reads_exactly_the_offline_frames(signals, frames_per_step, seed):
    audio = np.concatenate([signals("espeak_speech"), signals("white_noise")[:12345]])
    offline_frames = _frames_of(framing.offline_padded(audio, CFG)[0])
    windows = _framer_windows(audio, frames_per_step, seed)
    streamed_frames = np.concatenate([_frames_of(w) for w in windows])
    assert np.array_equal(streamed_frames, offline_frames)


def test_streaming_log_mel_equals_extractor(log_mel, extractor, signals):
    audio = signals("espeak_speech")
    streamed = np.concatenate([log_mel(w) for w in _framer_windows(audio, 8, seed=7)], axis=1)
    expected = reference(extractor, audio, center=True)
    assert streamed.shape == expected.shape
    assert np.abs(streamed - expected).max() <= TOLERANCE[log_mel.compute_dtype]
    offline = log_mel(framing.offline_padded(audio, CFG)[0])
    assert np.abs(streamed - offline).max() <= 1e-6   # same samples per frame, per-frame computation


def test_streaming_equals_hf_streaming_protocol(log_mel_f64, extractor, signals):
    """Voxtral's stream: 32 x 1280 zeros of left padding, then the audio, then zeros to a whole token.

    HF's processor computes the first chunk with center=True on left pad + audio[:9000] and every later
    8-frame step with center=False on 1680 samples starting at frame * 160 - 200. The framer must give
    the same frames (the left reflection reflects zeros there).
    """
    samples_per_token, frames_per_token = CFG.samples_per_token, CFG.mel_frames_per_token
    audio = signals("espeak_speech")[:2 * SR]          # ~40 steps keep it quick
    left_pad = np.zeros(32 * samples_per_token, np.float32)
    right_pad = np.zeros(-audio.shape[0] % samples_per_token + 17 * samples_per_token, np.float32)
    stream = np.concatenate([left_pad, audio, right_pad])

    first_frames = 7 * frames_per_token                                     # delay 6 tokens + 1
    first_samples = (first_frames - 1) * CFG.hop_length + CFG.window_size // 2   # 9000
    hf = [reference(extractor, stream[:left_pad.shape[0] + first_samples], center=True)]
    frame = hf[0].shape[1]
    chunk = frames_per_token * CFG.hop_length + CFG.window_size             # 1680
    while (start := frame * CFG.hop_length - CFG.window_size // 2) + chunk <= stream.shape[0]:
        hf.append(reference(extractor, stream[start:start + chunk], center=False))
        frame += frames_per_token
    hf_frames = np.concatenate(hf, axis=1)

    framer = framing.StreamingMelFramer(CFG, frames_per_token)
    ours = [log_mel_f64(w) for w in (framer.push(c) for c in np.array_split(stream, 37)) if w is not None]
    ours = np.concatenate(ours, axis=1)
    assert hf_frames.shape[1] > 400 and ours.shape[1] >= hf_frames.shape[1]
    assert np.abs(ours[:, :hf_frames.shape[1]] - hf_frames).max() <= TOLERANCE["float64"]


# ---- GPU targets: compile only ---------------------------------------------------------------------------
@pytest.mark.parametrize("target, host, compute_dtype", [
    ({"kind": "cuda", "arch": "sm_90"}, {"kind": "llvm"}, "float64"),
    ({"kind": "cuda", "arch": "sm_90"}, {"kind": "llvm"}, "float32"),
    ({"kind": "webgpu"}, {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}, "float32"),
], ids=["cuda-f64", "cuda-f32", "webgpu-f32"])
def test_compiles_for_gpu_targets(target, host, compute_dtype):
    mod, _ = mel.LogMel(CFG, N_MELS, compute_dtype).export_tvm(spec=mel.forward_spec())
    target = tvm.target.Target(target, host=host)
    with target:  # once a CUDA runtime is loaded (tests/test_cuda.py), nvcc runs and needs the arch
        executable = tvm.compile(mod, target=target)
    # device code for the target: the host module imports a module of the target's kind holding kernels
    modules, stack = [], [executable.mod]
    while stack:
        modules.append(stack.pop())
        stack.extend(modules[-1].imports)
    device = [m for m in modules if m.kind == target.kind.name]
    assert device, [m.kind for m in modules]
    if target.kind.name == "webgpu":
        assert len(json.loads(device[0].inspect_source("func_info"))) >= 3   # framing, DFT, filters + log

