"""Log-mel front end, as a TVM graph, numerically equal to transformers' VoxtralRealtimeFeatureExtractor.

The extractor computes, on 16 kHz float32 PCM::

    X      = torch.stft(x, n_fft=W, hop=H, periodic Hann window of W, center=...)   # W=400, H=160
    power  = |X|^2 with the LAST time frame dropped                                  # 201 bins
    mel    = filters.T @ power                                                       # 128 Slaney filters
    logmel = (max(log10(max(mel, 1e-10)), global_log_mel_max - 8) + 4) / 4          # max is a config constant

How the pieces split between graph and host:

* :class:`LogMel` (the graph) does plain "valid" framing only: ``n`` samples give
  ``(n - W) // H + 1`` frames, frame ``j`` reading ``samples[j*H : j*H + W]``. No padding, no frame dropped.
* The host decides which samples to pass:

  - offline (``center=True``): :func:`offline_padded` reflect-pads W/2 samples on both sides and trims the
    end so that LogMel returns exactly the extractor's ``N // H`` frames;
  - streaming: :class:`StreamingMelFramer` turns PCM chunks of any size into windows of whole multiples of
    ``frames_per_step`` frames, carrying the ``W - H`` sample overlap. The frames it yields, concatenated,
    are exactly the offline frames of the whole stream (see the class for the start and end of the stream).

The STFT is a direct real DFT: gather the frames, then one matmul against a constant Hann-windowed cos/sin
basis, so every target (llvm, CUDA, WebGPU) runs the same graph and GPUs get dlight's matmul schedule.
``compute_dtype="float64"`` is within 6e-8 of an exact float64 log-mel and within ~3e-5 of the extractor
(that is the extractor's own float32 FFT error); ``"float32"`` (WebGPU has no f64) is within ~2e-5 of
exact and ~4e-5 of the extractor. On an H100 the CUDA build gave float64 output bitwise equal to the llvm
build's, float32 within 8e-6 of it (checked once by hand; the tests only compile for CUDA and WebGPU).
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.core import wrap_nested

from voxc.errors import VoxcError
from voxc.config import AudioConfig

# log10 floor of the extractor: torch.clamp(mel, min=1e-10)
_MEL_FLOOR = 1e-10
# The extractor's dynamic range: values below global_log_mel_max - 8 (in log10) are clipped.
_DYNAMIC_RANGE_LOG10 = 8.0


def n_frequency_bins(cfg: AudioConfig) -> int:
    """Bins of the one-sided spectrum; n_fft equals the window size in Voxtral."""
    return cfg.window_size // 2 + 1


def windowed_dft_basis(window: int, dtype: str = "float64") -> np.ndarray:
    """``[window, 2 * (window//2 + 1)]``: ``hann[t] * cos(2 pi k t / W)`` in the first half of the columns,
    ``hann[t] * sin(2 pi k t / W)`` in the second (k = column within the half); computed in float64, then
    cast to ``dtype``.

    Periodic Hann, as torch.hann_window. The phase k*t is reduced modulo W in integers before the angle is
    formed, so cos/sin only see arguments in [0, 2 pi). The sign of the imaginary part does not matter:
    only |X|^2 is used.

    This is a compile-time constant of the graph rather than something computed on the device: WGSL only
    promises cos/sin to an absolute error of 2^-11, and this way every target multiplies by the same
    correctly rounded numbers.
    """
    t = np.arange(window)
    k = np.arange(window // 2 + 1)
    angle = (2.0 * np.pi / window) * ((t[:, None] * k[None, :]) % window)
    hann = 0.5 - 0.5 * np.cos((2.0 * np.pi / window) * t)
    basis = hann[:, None] * np.concatenate([np.cos(angle), np.sin(angle)], axis=1)
    return np.ascontiguousarray(basis.astype(dtype))


def mel_filter_bank(cfg: AudioConfig, n_mels: int) -> np.ndarray:
    """The value of ``LogMel.filters``: Slaney mel filters, float32 ``[n_frequency_bins, n_mels]``.

    Same numbers as the extractor's (it builds the same bank with transformers.audio_utils, in float64, and
    casts it to float32 before the matmul).
    """
    from mistral_common.audio import mel_filter_bank as mistral_mel_filter_bank

    nyquist = cfg.sampling_rate / 2   # the extractor's 8000 Hz
    bank = mistral_mel_filter_bank(n_frequency_bins(cfg), n_mels, 0.0, nyquist, cfg.sampling_rate)
    return np.ascontiguousarray(bank, dtype=np.float32)


class LogMel(nn.Module):
    """``forward(samples[b, n] f32) -> log-mel [b, n_mels, (n - window)//hop + 1] f32``, valid framing, n >= window.

    A batch of streams' windows of equal length goes through in one call.

    ``filters`` is a parameter (value: :func:`mel_filter_bank`); the Hann-windowed DFT basis is a constant
    of the graph (:func:`windowed_dft_basis`, 400 x 402). ``compute_dtype`` is the dtype of everything
    between the input cast and the output cast.
    """

    def __init__(self, cfg: AudioConfig, n_mels: int, compute_dtype: str = "float64"):
        if compute_dtype not in ("float32", "float64"):
            raise VoxcError(f"LogMel compute_dtype must be float32 or float64, got {compute_dtype!r}")
        self.window = cfg.window_size
        self.hop = cfg.hop_length
        self.n_bins = n_frequency_bins(cfg)
        self.n_mels = n_mels
        self.log_floor = cfg.global_log_mel_max - _DYNAMIC_RANGE_LOG10
        self.compute_dtype = compute_dtype
        self.filters = nn.Parameter((self.n_bins, n_mels), "float32")

    def forward(self, samples: nn.Tensor) -> nn.Tensor:
        frames = nn.op.tensor_expr_op(self._frames, "mel_frames", [samples])
        # Give the frame count its own symbolic variable. Left as the expression (n - W)//H + 1, it ends up
        # in the sizes of the local/shared tiles dlight's GPU matmul schedule allocates, and CUDA codegen
        # rejects those ("Can only handle constant size stack allocation").
        n_frames = tirx.Var("n_frames", "int64")
        frames = wrap_nested(
            relax.BlockBuilder.current().match_cast(
                frames._expr, relax.TensorType((samples.shape[0], n_frames, self.window), self.compute_dtype)),
            "mel_frames")
        basis_value = windowed_dft_basis(self.window, self.compute_dtype)
        basis = wrap_nested(relax.const(basis_value, self.compute_dtype), "mel_dft_basis")
        spectrum = nn.op.matmul(frames, basis)                 # [b, frames, re bins ++ im bins]
        power = nn.op.tensor_expr_op(self._power, "mel_power", [spectrum])
        mel = nn.op.tensor_expr_op(self._mel, "mel_project", [power, self.filters])
        return nn.op.tensor_expr_op(self._log_scale, "mel_log_scale", [mel])

    # ---- TE bodies --------------------------------------------------------------------------------------
    def _const(self, value: float):
        return tirx.const(value, self.compute_dtype)

    def _frames(self, samples: te.Tensor) -> te.Tensor:
        n_frames = (samples.shape[1] - self.window) // self.hop + 1
        return te.compute(
            (samples.shape[0], n_frames, self.window),
            lambda b, frame, t: samples[b, frame * self.hop + t].astype(self.compute_dtype), name="frames")

    def _power(self, spectrum: te.Tensor) -> te.Tensor:
        n_bins = self.n_bins

        def power_value(b, frame, k):
            re, im = spectrum[b, frame, k], spectrum[b, frame, k + n_bins]
            return re * re + im * im

        return te.compute((spectrum.shape[0], spectrum.shape[1], n_bins), power_value, name="power")

    def _mel(self, power: te.Tensor, filters: te.Tensor) -> te.Tensor:
        k = te.reduce_axis((0, self.n_bins), name="k")
        return te.compute(
            (power.shape[0], self.n_mels, power.shape[1]),
            lambda b, m, frame: te.sum(filters[k, m].astype(self.compute_dtype) * power[b, frame, k], axis=k),
            name="mel")

    def _log_scale(self, mel: te.Tensor) -> te.Tensor:
        def scaled(b, m, frame):
            log_mel = tirx.log10(tirx.max(mel[b, m, frame], self._const(_MEL_FLOOR)))
            log_mel = tirx.max(log_mel, self._const(self.log_floor))
            return ((log_mel + self._const(4.0)) / self._const(4.0)).astype("float32")

        return te.compute(mel.shape, scaled, name="log_mel")


def forward_spec() -> dict:
    """The export spec of :class:`LogMel` alone: ``model.export_tvm(spec=forward_spec())``."""
    return {"forward": {"samples": nn.spec.Tensor(("b", "n"), "float32")}}
