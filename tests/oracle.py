"""The numerical oracle: transformers' VoxtralRealtimeForConditionalGeneration (fp32, CPU), built
from a voxc checkpoint in the *official* layout, so every voxc test compares against the same
weights voxc itself loads.

The official -> HF conversion is the inverse of voxc's HF loader: names via ``voxc.loader.hf``,
q/k rows (and the encoder q bias) permuted from interleaved pairs to split-half.

This module imports torch and transformers; only tests may import it (voxc itself never does).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import (BatchFeature, MistralCommonBackend, VoxtralRealtimeConfig, VoxtralRealtimeFeatureExtractor,
                          VoxtralRealtimeForConditionalGeneration, VoxtralRealtimeProcessor)

from voxc.loader import hf
from voxc.loader.names import rope_rows
from voxc.loader.safetensors_loader import load_checkpoint
from voxc.config import ModelConfig

DEFAULT_DELAY_TOKENS = 6


def hf_state_dict(weights: dict[str, np.ndarray], cfg: ModelConfig, *, permute_rope: bool = True
                  ) -> dict[str, torch.Tensor]:
    """voxc tensors (official RoPE order) -> an HF ``state_dict`` (in-memory names, split-half rows).

    ``permute_rope=False`` is the negative control: HF names but official row order.
    """
    state = {}
    for name, array in weights.items():
        heads = rope_rows(name, cfg)
        if permute_rope and heads is not None:
            array = hf.interleaved_to_split_half(array, heads)
        state[hf.voxc_to_hf(name, in_memory=True)] = torch.from_numpy(np.array(array, dtype=np.float32))
    return state


def build_hf_model(ckpt_dir: str | Path, *, permute_rope: bool = True) -> VoxtralRealtimeForConditionalGeneration:
    """fp32 eval-mode transformers model holding the weights of a voxc (official-layout) checkpoint."""
    ckpt = load_checkpoint(ckpt_dir, progress=False)
    weights = dict(ckpt.tensors("float32", progress=False))
    config = VoxtralRealtimeConfig(**hf.hf_config_dict(ckpt.config))
    torch.manual_seed(0)  # the constructor's random init is overwritten below; keep it reproducible anyway
    model = VoxtralRealtimeForConditionalGeneration(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(weights, ckpt.config, permute_rope=permute_rope),
                                                strict=False)
    # The LM head is tied to the token embedding, which was just loaded.
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.generation_config.pad_token_id = 11
    return model


def build_processor(tekken_dir: str | Path) -> VoxtralRealtimeProcessor:
    """HF's processor (mel front end + prompt) using the ``tekken.json`` in ``tekken_dir``."""
    tokenizer = MistralCommonBackend.from_pretrained(str(tekken_dir))
    return VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(), tokenizer=tokenizer)


def raw_mel(audio: np.ndarray, *, center: bool = True) -> np.ndarray:
    """HF's log-mel of exactly these 16 kHz samples (no Voxtral padding): ``[n_mels, frames]``."""
    features = VoxtralRealtimeFeatureExtractor()(np.asarray(audio, np.float32), sampling_rate=16000,
                                                  center=center, return_tensors="pt")
    return features.input_features[0].numpy()


class Oracle:
    """The HF model and processor for one voxc checkpoint, with per-stage helpers.

    Audio arguments are float32 mono 16 kHz arrays (as ``voxc.audio.load_audio`` returns), before
    any Voxtral padding; the processor adds the 32 left-pad and right-pad tokens of silence.
    Outputs are numpy arrays without the batch axis.
    """

    def __init__(self, ckpt_dir: str | Path, *, permute_rope: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self.model = build_hf_model(self.ckpt_dir, permute_rope=permute_rope)
        self._processors: dict[int, VoxtralRealtimeProcessor] = {}
        self._tekken_dirs: list[tempfile.TemporaryDirectory] = []

    def processor(self, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> VoxtralRealtimeProcessor:
        """The processor for a transcription delay; its tokenizer's audio section sets the delay
        (and with it the prompt length and the right padding), so each delay gets its own copy."""
        if delay_tokens not in self._processors:
            tekken = json.loads((self.ckpt_dir / "tekken.json").read_text())
            frame_ms = 1000.0 / tekken["audio"]["frame_rate"]
            tekken["audio"]["transcription_delay_ms"] = delay_tokens * frame_ms
            tmp = tempfile.TemporaryDirectory(prefix=f"voxc_tekken_delay{delay_tokens}_")
            self._tekken_dirs.append(tmp)
            (Path(tmp.name) / "tekken.json").write_text(json.dumps(tekken))
            processor = build_processor(tmp.name)
            assert processor.num_delay_tokens == delay_tokens
            self._processors[delay_tokens] = processor
        return self._processors[delay_tokens]

    def _inputs(self, audio: np.ndarray, delay_tokens: int) -> BatchFeature:
        """The offline processor's inputs, computed from the float samples as given.

        ``VoxtralRealtimeProcessor(audio)`` itself round-trips the audio through a 16-bit WAV
        (mistral-common's ``Audio.to_base64``), which quantises it; that is a property of the
        request format, not of the model, so the oracle pads and featurises the samples directly.
        ``processor_inputs`` keeps the untouched processor path for checking this equivalence.
        """
        processor = self.processor(delay_tokens)
        instruct = processor.tokenizer.tokenizer.instruct_tokenizer
        padded = instruct.audio_encoder.pad(np.asarray(audio, np.float32), 16000)
        features = processor.feature_extractor(padded, sampling_rate=16000, center=True, return_tensors="pt")
        prompt = instruct.start() + instruct.audio_encoder.encode_streaming_tokens()
        return BatchFeature({"input_ids": torch.tensor([prompt]), "input_features": features.input_features,
                             "num_delay_tokens": processor.num_delay_tokens})

    def processor_inputs(self, audio: np.ndarray, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> BatchFeature:
        """What ``VoxtralRealtimeProcessor(audio)`` returns (audio quantised to 16 bits on the way)."""
        return self.processor(delay_tokens)(np.asarray(audio, np.float32), return_tensors="pt")

    # ---- front end and encoder ------------------------------------------------------------------
    def mel(self, audio: np.ndarray, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> np.ndarray:
        """Offline processor features of the padded audio: ``[n_mels, frames]``, frames = 8 x tokens."""
        return self._inputs(audio, delay_tokens).input_features[0].numpy()

    @torch.no_grad()
    def stages(self, audio: np.ndarray, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> dict[str, np.ndarray]:
        """mel ``[n_mels, T]``, conv_out ``[T/2, enc_dim]`` (stem convs + GELU), encoder_out
        ``[T/2, enc_dim]`` (final norm included), adapter_out ``[T/8, dec_dim]``, input_ids (prompt)."""
        inputs = self._inputs(audio, delay_tokens)
        mel = inputs.input_features
        conv_out = self.model.model.audio_tower.embedder(mel)
        features = self.model.model.get_audio_features(input_features=mel, use_cache=False)
        return {
            "mel": mel[0].numpy(),
            "conv_out": conv_out[0].numpy(),
            "encoder_out": features.last_hidden_state[0].numpy(),
            "adapter_out": features.pooler_output[0].numpy(),
            "input_ids": inputs.input_ids[0].numpy(),
        }

    # ---- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, audio: np.ndarray, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> tuple[np.ndarray, np.ndarray]:
        """Offline greedy transcription: (new token ids ``[n]``, logits of each step ``[n, vocab]``)."""
        inputs = self._inputs(audio, delay_tokens)
        with _quiet_generate():
            out = self.model.generate(**inputs, do_sample=False, output_scores=True, return_dict_in_generate=True)
        return _new_tokens_and_scores(out, inputs.input_ids.shape[1])

    @torch.no_grad()
    def stream_generate(self, audio: np.ndarray, delay_tokens: int = DEFAULT_DELAY_TOKENS
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy transcription through HF's streaming path (as its integration test does it): a
        first chunk that yields the prompt, then one token's worth of mel per chunk, computed with
        ``center=False`` from samples overlapping the previous chunk by half a window."""
        processor = self.processor(delay_tokens)
        padded = np.pad(np.asarray(audio, np.float32),
                        (0, processor.num_right_pad_tokens * processor.raw_audio_length_per_tok))
        first = processor(padded[:processor.num_samples_first_audio_chunk], is_streaming=True,
                          is_first_audio_chunk=True, return_tensors="pt")
        hop, win = processor.feature_extractor.hop_length, processor.feature_extractor.win_length

        def mel_chunks():
            yield first.input_features
            mel_frame = processor.num_mel_frames_first_audio_chunk
            while (start := mel_frame * hop - win // 2) + processor.num_samples_per_audio_chunk < len(padded):
                chunk = padded[start:start + processor.num_samples_per_audio_chunk]
                yield processor(chunk, is_streaming=True, is_first_audio_chunk=False,
                                return_tensors="pt").input_features
                mel_frame += processor.audio_length_per_tok

        with _quiet_generate():
            out = self.model.generate(input_ids=first.input_ids, input_features=mel_chunks(),
                                      num_delay_tokens=first.num_delay_tokens, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True)
        return _new_tokens_and_scores(out, first.input_ids.shape[1])

    @torch.no_grad()
    def forward_logits(self, audio: np.ndarray, input_ids, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> np.ndarray:
        """One causal forward pass over the whole audio: ``[n_audio_tokens, vocab]``, row p from
        ``input_ids[:p+1]`` and audio tokens ``[:p+1]``.  ``input_ids`` (prompt included) may be
        shorter than the audio; it is filled up with [STREAMING_PAD], which only later rows see."""
        inputs = self._inputs(audio, delay_tokens)
        n_audio_tokens = inputs.input_features.shape[-1] // self.model.config.audio_length_per_tok
        sequence = [int(t) for t in input_ids]
        if len(sequence) > n_audio_tokens:
            raise ValueError(f"{len(sequence)} input ids do not fit: the audio has {n_audio_tokens} tokens")
        # Text and audio embeddings are added position by position, so the sequence must span the audio.
        filler = self.processor(delay_tokens).tokenizer.tokenizer.instruct_tokenizer.tokenizer.get_special_token(
            "[STREAMING_PAD]")
        sequence += [filler] * (n_audio_tokens - len(sequence))
        out = self.model(input_ids=torch.tensor([sequence]), input_features=inputs.input_features,
                         num_delay_tokens=delay_tokens, use_cache=False)
        return out.logits[0].numpy()

    def logits(self, audio: np.ndarray, token_ids, delay_tokens: int = DEFAULT_DELAY_TOKENS) -> np.ndarray:
        """Teacher-forced logits: row i is the distribution that predicts ``token_ids[i]`` after the
        prompt and ``token_ids[:i]`` (so for generated tokens it equals ``generate``'s step i)."""
        prompt = self._inputs(audio, delay_tokens).input_ids[0].tolist()
        all_rows = self.forward_logits(audio, prompt + [int(t) for t in token_ids], delay_tokens)
        return all_rows[len(prompt) - 1:len(prompt) - 1 + len(token_ids)]

@contextlib.contextmanager
def _quiet_generate():
    """VoxtralRealtime sets max_length from the audio itself, which generate() warns about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using the model-agnostic default `max_length`")
        yield


def _new_tokens_and_scores(out, prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = out.sequences[0, prompt_length:].numpy()
    scores = torch.stack([s[0] for s in out.scores]).numpy() if out.scores else np.zeros((0, 0), np.float32)
    return tokens, scores
