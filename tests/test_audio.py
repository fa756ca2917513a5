import numpy as np
import pytest
import soundfile

from voxc.audio import load_audio
from voxc.errors import VoxcError


def mistral_common_audio(path):
    """What mistral-common (Voxtral's reference request path) makes of a file: mono, 16 kHz."""
    from mistral_common.tokens.tokenizers.audio import Audio

    audio = Audio.from_file(str(path), strict=False)
    audio.resample(16000)
    return audio.audio_array


def test_16k_float_wav_is_read_unchanged(speech_clips):
    samples, rate = soundfile.read(speech_clips["hello_world"], dtype="float32")
    assert rate == 16000
    np.testing.assert_array_equal(load_audio(speech_clips["hello_world"]), samples)


def test_espeak_clips_are_deterministic(speech_clips, tmp_path):
    import subprocess

    again = tmp_path / "again.wav"
    subprocess.run(f"espeak-ng -w {tmp_path}/raw.wav 'hello world' && sox -D {tmp_path}/raw.wav -r 16000 -c 1 "
                   f"-e floating-point -b 32 {again}", shell=True, check=True, capture_output=True)
    assert again.read_bytes() == speech_clips["hello_world"].read_bytes()


def test_22050_hz_is_resampled_like_mistral_common(speech_22k_wav):
    assert soundfile.info(speech_22k_wav).samplerate == 22050
    audio = load_audio(speech_22k_wav)
    assert audio.dtype == np.float32
    assert abs(len(audio) - soundfile.info(speech_22k_wav).frames * 16000 / 22050) <= 1
    np.testing.assert_array_equal(audio, mistral_common_audio(speech_22k_wav))


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_44100_hz_stereo_files(tmp_path, fmt):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, 0.5 * left], axis=1)  # average = 0.75 * left
    path = tmp_path / f"stereo.{fmt.lower()}"
    soundfile.write(path, stereo, 44100, format=fmt)
    audio = load_audio(path)
    assert audio.shape == (16000,)
    if fmt != "OGG":  # lossless formats: exactly mistral-common's mono-and-resample
        np.testing.assert_allclose(audio, mistral_common_audio(path), atol=1e-6)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins: the tone survives resampling
    assert abs(np.sqrt(np.mean(audio[1000:-1000] ** 2)) - 0.75 * 0.5 / np.sqrt(2)) < 0.01


def test_arrays_need_a_sample_rate_and_are_resampled():
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t)
    with pytest.raises(VoxcError, match="sample_rate"):
        load_audio(tone)
    assert load_audio(tone, sample_rate=22050).shape == (16000,)
    passthrough = load_audio(tone[:16000], sample_rate=16000)
    assert passthrough.dtype == np.float32
    np.testing.assert_array_equal(passthrough, tone[:16000].astype(np.float32))


def test_array_channels_and_integer_pcm():
    mono = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    expected = 0.75 * mono
    np.testing.assert_allclose(load_audio(np.stack([mono, 0.5 * mono], 1), sample_rate=16000), expected, atol=1e-7)
    np.testing.assert_allclose(load_audio(np.stack([mono, 0.5 * mono], 0), sample_rate=16000), expected, atol=1e-7)
    pcm16 = np.array([0, 16384, -32768], np.int16)
    np.testing.assert_array_equal(load_audio(pcm16, sample_rate=16000), [0.0, 0.5, -1.0])
    pcm8 = np.array([128, 192, 0], np.uint8)
    np.testing.assert_array_equal(load_audio(pcm8, sample_rate=16000), [0.0, 0.5, -1.0])


def test_real_speech_clips(audioeval_clips):
    wav, transcript = audioeval_clips["hello_world"]
    audio = load_audio(wav)
    assert transcript.lower().startswith("hello world")
    assert 1.0 < len(audio) / 16000 < 1.3 and np.abs(audio).max() > 0.1


@pytest.mark.parametrize("make_input, message", [
    (lambda p: p / "nope.wav", "not found"),
    (lambda p: (p / "text.wav").write_text("not audio") and p / "text.wav", "cannot read audio file"),
    (lambda p: soundfile.write(p / "empty.wav", np.zeros(0), 16000) or p / "empty.wav", "no audio samples"),
    (lambda p: np.zeros(0, np.float32), "no audio samples"),
    (lambda p: np.array([0.0, np.nan], np.float32), "NaN or infinite"),
    (lambda p: np.array([0.0, np.inf]), "NaN or infinite"),
    (lambda p: np.array(["a", "b"]), "float or integer"),
    (lambda p: np.array([1 + 2j]), "float or integer"),
    (lambda p: np.zeros((2, 100, 100), np.float32), "shape"),
    (lambda p: np.zeros((100, 100), np.float32), "shape"),
])
def test_bad_audio(tmp_path, make_input, message):
    source = make_input(tmp_path)
    with pytest.raises(VoxcError, match=message):
        load_audio(source, sample_rate=None if not isinstance(source, np.ndarray) else 16000)


def test_sample_rate_for_a_file_must_agree(speech_22k_wav):
    with pytest.raises(VoxcError, match="22050 Hz, not the 16000 Hz"):
        load_audio(speech_22k_wav, sample_rate=16000)
    assert len(load_audio(speech_22k_wav, sample_rate=22050)) > 0


def test_non_positive_sample_rate():
    with pytest.raises(VoxcError, match="positive integer"):
        load_audio(np.zeros(10, np.float32), sample_rate=0)
