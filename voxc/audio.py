"""Audio input: any file soundfile reads (WAV, FLAC, OGG, ...) or an array, as float32 mono 16 kHz.

Resampling uses soxr at "HQ" quality, as mistral-common does for Voxtral, so voxc sees the same
samples the reference pipeline would.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from voxc.errors import VoxcError

SAMPLE_RATE = 16000
_MAX_CHANNELS = 16
# Sample rates of real audio (telephony's 8 kHz, the 768 kHz of some ultrasound recorders, with
# margin); others come from a damaged header and would resample to nothing or to gigabytes.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 1_000_000


def load_audio(source, sample_rate: int | None = None) -> np.ndarray:
    """Read ``source`` (a path, or an array of samples) as float32 mono samples at 16 kHz.

    A file states its own rate; ``sample_rate``, if given, must agree with it.  An array carries
    no rate, so ``sample_rate`` is required (16000 for audio that is already 16 kHz): guessing
    would silently transcribe resampled-wrong audio.  Arrays are ``[samples]``,
    ``[samples, channels]`` or ``[channels, samples]``; channels are averaged.  Integer arrays
    are PCM and are scaled to [-1, 1).
    """
    if isinstance(source, (str, Path)):
        samples, rate = _read_file(Path(source))
        what = str(source)
        if sample_rate is not None and sample_rate != rate:
            raise VoxcError(f"{what} is {rate} Hz, not the {sample_rate} Hz passed as sample_rate")
    else:
        samples = _as_float_array(source)
        what = "audio array"
        if sample_rate is None:
            raise VoxcError("an audio array needs its sample rate: pass sample_rate=... "
                            f"({SAMPLE_RATE} if the samples are already {SAMPLE_RATE // 1000} kHz)")
        rate = sample_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise VoxcError(f"{what}: sample rate must be a positive integer, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise VoxcError(f"{what}: a sample rate of {rate} Hz is not audio voxc can use "
                        f"({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz); is the file damaged?")

    samples = _to_mono(samples, what)
    if samples.size == 0:
        raise VoxcError(f"{what} contains no audio samples")
    if not np.all(np.isfinite(samples)):
        raise VoxcError(f"{what} contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        samples = _resample(samples, int(rate))
        if samples.size == 0:
            raise VoxcError(f"{what} is too short to resample to {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    if path.is_dir():
        raise VoxcError(f"{path} is a directory, not an audio file")
    if not path.is_file():
        raise VoxcError(f"audio file {path} not found")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise VoxcError(f"cannot read audio file {path}: {_one_line(exc)} (voxc reads WAV, FLAC, OGG and other "
                        "formats of libsndfile; convert other formats first, e.g. with ffmpeg)") from exc
    except MemoryError:
        raise VoxcError(f"cannot read audio file {path}: its header asks for more memory than there is "
                        "(a damaged file?)") from None
    # soundfile always gives [frames, channels], whatever the number of channels
    return samples.mean(axis=1) if samples.shape[1] != 1 else samples[:, 0], rate


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _as_float_array(source) -> np.ndarray:
    try:
        array = np.asarray(source)
    except (TypeError, ValueError) as exc:
        raise VoxcError(f"audio must be a file path or an array of samples, got {type(source).__name__}") from exc
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    if np.issubdtype(array.dtype, np.signedinteger):
        # PCM convention: full scale of the integer type maps to [-1, 1).
        return array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    if np.issubdtype(array.dtype, np.unsignedinteger):
        # Unsigned PCM (8-bit WAV) is offset binary: the midpoint is silence.
        half = (float(np.iinfo(array.dtype).max) + 1.0) / 2.0
        return (array.astype(np.float32) - half) / half
    raise VoxcError(f"audio samples must be float or integer numbers, got dtype {array.dtype}")


def _to_mono(samples: np.ndarray, what: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2:
        # soundfile returns [samples, channels]; torch-style code uses [channels, samples].
        # Real audio has a handful of channels, so the short axis is the channel axis.
        if samples.shape[1] <= _MAX_CHANNELS:
            return samples.mean(axis=1)
        if samples.shape[0] <= _MAX_CHANNELS:
            return samples.mean(axis=0)
    raise VoxcError(f"{what} must have shape [samples] or [samples, channels], got {samples.shape}")


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
