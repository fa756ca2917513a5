"""Model configuration, read from the official ``params.json`` or an HF ``config.json``.

Nothing in voxc is sized for the 4B model alone: every shape comes from here, so a tiny
config of the same structure runs through exactly the same code in the tests.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from voxc.errors import VoxcError


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    dim: int = 1280
    n_layers: int = 32
    n_heads: int = 32
    head_dim: int = 64
    hidden_dim: int = 5120
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int = 750
    num_mel_bins: int = 128


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    dim: int = 3072
    n_layers: int = 26
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 9216
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int = 8192
    vocab_size: int = 131072
    ada_norm_dim: int = 32


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    sampling_rate: int = 16000
    hop_length: int = 160
    window_size: int = 400
    global_log_mel_max: float = 1.5
    frame_rate: float = 12.5          # text tokens per second
    downsample_factor: int = 4        # encoder frames concatenated per adapter token
    conv_stride: int = 2              # the second stem conv halves the mel frame rate

    @property
    def samples_per_token(self) -> int:
        return int(round(self.sampling_rate / self.frame_rate))

    @property
    def mel_frames_per_token(self) -> int:
        return self.samples_per_token // self.hop_length

    @property
    def encoder_frames_per_token(self) -> int:
        return self.mel_frames_per_token // self.conv_stride


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = EncoderConfig()
    decoder: DecoderConfig = DecoderConfig()
    audio: AudioConfig = AudioConfig()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        e, d, a = self.encoder, self.decoder, self.audio
        problems = []
        if e.head_dim % 2 or d.head_dim % 2:
            problems.append("head_dim must be even for RoPE")
        if d.n_heads % d.n_kv_heads:
            problems.append(f"decoder n_heads {d.n_heads} is not a multiple of n_kv_heads {d.n_kv_heads}")
        if a.samples_per_token % a.hop_length:
            problems.append("samples per token must be a whole number of mel hops")
        if a.mel_frames_per_token % a.conv_stride:
            problems.append("mel frames per token must be a multiple of the conv stride")
        if a.encoder_frames_per_token != a.downsample_factor:
            problems.append(
                f"encoder frames per token ({a.encoder_frames_per_token}) must equal downsample_factor "
                f"({a.downsample_factor}): one adapter output per text token")
        if e.sliding_window < 1 or d.sliding_window < 1:
            problems.append("sliding windows must be positive")
        for name, v in dataclasses.asdict(self).items():
            for k, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool) and x <= 0:
                    problems.append(f"{name}.{k} must be positive, got {x}")
        if problems:
            raise VoxcError("invalid model config: " + "; ".join(problems))
        return self

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        try:
            return cls(EncoderConfig(**data["encoder"]), DecoderConfig(**data["decoder"]),
                       AudioConfig(**data["audio"])).validate()
        except (KeyError, TypeError) as exc:
            raise VoxcError(f"malformed voxc config: {exc}") from exc

    @classmethod
    def from_params_json(cls, path_or_dict: str | Path | dict) -> "ModelConfig":
        """The official Mistral ``params.json``."""
        p = _read_json(path_or_dict)
        try:
            wm = p["multimodal"]["whisper_model_args"]
            ea = wm["encoder_args"]
            aa = ea.get("audio_encoding_args", {})
            enc = EncoderConfig(
                dim=ea["dim"], n_layers=ea["n_layers"], n_heads=ea["n_heads"],
                head_dim=ea.get("head_dim", ea["dim"] // ea["n_heads"]), hidden_dim=ea["hidden_dim"],
                rope_theta=float(ea.get("rope_theta", 1e6)), norm_eps=float(ea.get("norm_eps", 1e-5)),
                sliding_window=int(ea.get("sliding_window") or 750),
                num_mel_bins=int(aa.get("num_mel_bins", 128)))
            dec = DecoderConfig(
                dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                head_dim=p.get("head_dim", p["dim"] // p["n_heads"]), hidden_dim=p["hidden_dim"],
                rope_theta=float(p.get("rope_theta", 1e6)), norm_eps=float(p.get("norm_eps", 1e-5)),
                sliding_window=int(p.get("sliding_window") or 8192), vocab_size=p["vocab_size"],
                ada_norm_dim=int(p.get("ada_rms_norm_t_cond_dim", 32)))
            audio = AudioConfig(
                sampling_rate=int(aa.get("sampling_rate", 16000)), hop_length=int(aa.get("hop_length", 160)),
                window_size=int(aa.get("window_size", 400)),
                global_log_mel_max=float(aa.get("global_log_mel_max", 1.5)),
                frame_rate=float(aa.get("frame_rate", 12.5)),
                downsample_factor=int(wm.get("downsample_args", {}).get("downsample_factor", 4)))
        except KeyError as exc:
            raise VoxcError(f"params.json is missing the field {exc}") from exc
        if not p.get("tied_embeddings", True):
            raise VoxcError("params.json: voxc supports only tied embeddings (as Voxtral Realtime has)")
        return cls(enc, dec, audio).validate()

    def to_params_json(self) -> dict[str, Any]:
        e, d, a = self.encoder, self.decoder, self.audio
        return {
            "dim": d.dim, "n_layers": d.n_layers, "head_dim": d.head_dim, "hidden_dim": d.hidden_dim,
            "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "use_biases": False, "causal": True,
            "rope_theta": d.rope_theta, "norm_eps": d.norm_eps, "vocab_size": d.vocab_size,
            "tied_embeddings": True, "sliding_window": d.sliding_window, "model_max_length": 131072,
            "multimodal": {"whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": a.sampling_rate, "frame_rate": a.frame_rate,
                        "num_mel_bins": e.num_mel_bins, "hop_length": a.hop_length,
                        "window_size": a.window_size, "chunk_length_s": None,
                        "global_log_mel_max": a.global_log_mel_max, "transcription_format": "streaming"},
                    "dim": e.dim, "n_layers": e.n_layers, "head_dim": e.head_dim, "hidden_dim": e.hidden_dim,
                    "n_heads": e.n_heads, "vocab_size": d.vocab_size, "n_kv_heads": e.n_heads,
                    "use_biases": True, "use_cache": False, "rope_theta": e.rope_theta, "causal": True,
                    "norm_eps": e.norm_eps, "pos_embed": "rope", "max_source_positions": None,
                    "ffn_type": "swiglu", "norm_type": "rms_norm", "sliding_window": e.sliding_window},
                "downsample_args": {"downsample_factor": a.downsample_factor}}},
            "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": d.ada_norm_dim,
        }

    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict) -> "ModelConfig":
        """transformers' ``config.json`` of VoxtralRealtimeForConditionalGeneration."""
        c = _read_json(path_or_dict)
        try:
            ac, tc = c["audio_config"], c["text_config"]

            def theta(x):
                return float((x.get("rope_parameters") or {}).get("rope_theta", x.get("rope_theta", 1e6)))

            enc = EncoderConfig(
                dim=ac["hidden_size"], n_layers=ac["num_hidden_layers"], n_heads=ac["num_attention_heads"],
                head_dim=ac.get("head_dim") or ac["hidden_size"] // ac["num_attention_heads"],
                hidden_dim=ac["intermediate_size"], rope_theta=theta(ac),
                norm_eps=float(ac.get("rms_norm_eps", 1e-5)), sliding_window=int(ac.get("sliding_window") or 750),
                num_mel_bins=int(ac.get("num_mel_bins", 128)))
            dec = DecoderConfig(
                dim=tc["hidden_size"], n_layers=tc["num_hidden_layers"], n_heads=tc["num_attention_heads"],
                n_kv_heads=tc.get("num_key_value_heads", tc["num_attention_heads"]),
                head_dim=tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"],
                hidden_dim=tc["intermediate_size"], rope_theta=theta(tc),
                norm_eps=float(tc.get("rms_norm_eps", 1e-5)), sliding_window=int(tc.get("sliding_window") or 8192),
                vocab_size=tc["vocab_size"], ada_norm_dim=32)
            audio = AudioConfig(downsample_factor=int(c.get("downsample_factor", 4)))
        except KeyError as exc:
            raise VoxcError(f"config.json is missing the field {exc}") from exc
        return cls(enc, dec, audio).validate()

    @classmethod
    def tiny(cls, *, encoder_window: int = 750, decoder_window: int = 8192, vocab_size: int = 1268) -> "ModelConfig":
        """The small random model used by ``voxc make-tiny`` and the tests."""
        return cls(
            EncoderConfig(dim=32, n_layers=2, n_heads=4, head_dim=8, hidden_dim=64, sliding_window=encoder_window),
            DecoderConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=96,
                          sliding_window=decoder_window, vocab_size=vocab_size),
            AudioConfig()).validate()


def _read_json(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise VoxcError(f"{path} not found") from exc
    except json.JSONDecodeError as exc:
        raise VoxcError(f"{path} is not valid JSON: {exc}") from exc
