"""Voxtral's Tekken tokenizer (``tekken.json``), through mistral-common.

Only decoding matters at run time: the model emits one token per 80 ms of audio, most of them
``[STREAMING_PAD]`` / ``[STREAMING_WORD]`` control tokens, which never reach the transcript.
Text is decoded from token *bytes*: a character outside ASCII may be spread over several byte
tokens, so :class:`IncrementalDecoder` holds an incomplete UTF-8 sequence back until it is whole.
"""
from __future__ import annotations

import base64
import codecs
import json
from pathlib import Path

from voxc.errors import VoxcError

STREAMING_PAD = "[STREAMING_PAD]"
STREAMING_WORD = "[STREAMING_WORD]"
DEFAULT_N_LEFT_PAD_TOKENS = 32

NUM_SPECIAL_TOKENS = 1000
# Special token ids of Voxtral Realtime's tekken.json.  Ranks 0..19 are mistral-common's frozen
# list (<unk>, <s>, </s>, [INST], ..., <pad>=11, ...); the audio/streaming ids come from readers
# of the real file.  [ARGS]/[CALL_ID] are required by mistral-common for a v13 tokenizer; their
# real ranks are unknown, so they sit on otherwise unused ids.
_NAMED_SPECIAL_RANKS = {
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 26: "[OUTPUT_AUDIO]",
    32: STREAMING_PAD, 33: STREAMING_WORD, 34: "[REPEAT_AUDIO_TEXT]",
    35: "[ARGS]", 36: "[CALL_ID]",
}
# The pre-tokenisation regex of Mistral's Tekken vocabularies (mistral_common/data/tekken_240911.json).
_TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# BPE merges of the tiny tokenizer, in rank order.  Each is the concatenation of two earlier
# tokens, so tiktoken can build it; together they cover the test phrases "hello world", "the world".
TINY_MERGES = (b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"th", b"the", b" the")
TINY_VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256 + len(TINY_MERGES)  # 1268, as ModelConfig.tiny()


# Far above any real vocabulary; a damaged count above it would make mistral-common build huge tables.
MAX_VOCAB = 1 << 22


def _check_tekken_json(path: Path) -> None:
    """The structure mistral-common expects, checked first so that damage is one clear line."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VoxcError(f"{path} is not a valid Tekken tokenizer file: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("vocab"), list):
        raise VoxcError(f"{path} is not a valid Tekken tokenizer file: it needs a 'config' object and a 'vocab' list")
    config = data["config"]
    for key in ("default_vocab_size", "default_num_special_tokens"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VOCAB):
            raise VoxcError(f"{path} is not a valid Tekken tokenizer file: config.{key} = {value!r}")
    audio = data.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise VoxcError(f"{path} is not a valid Tekken tokenizer file: 'audio' is not an object")


class Tokenizer:
    """A Voxtral ``tekken.json``: special ids, audio/streaming settings, and decoding."""

    def __init__(self, path: str | Path):
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # slow import; only when needed

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tekken.json"
        if not self.path.is_file():
            raise VoxcError(f"tokenizer file {self.path} not found (Voxtral ships it as tekken.json next to the weights)")
        _check_tekken_json(self.path)
        try:
            self._tekken = Tekkenizer.from_file(self.path)
            # every id and setting voxc reads, read once here: a damaged file fails now, in one line
            self.bos_id, self.eos_id, self.pad_id = (int(self._tekken.bos_id), int(self._tekken.eos_id),
                                                     int(self._tekken.pad_id))
            self.vocab_size, self.num_special_tokens = int(self._tekken.n_words), int(self._tekken.num_special_tokens)
            audio = self._tekken.audio
            pad = None if audio is None else audio.streaming_n_left_pad_tokens
            self.n_left_pad_tokens = DEFAULT_N_LEFT_PAD_TOKENS if pad is None else int(pad)
            delay = None if audio is None else audio.transcription_delay_ms
            self.transcription_delay_ms = None if delay is None else float(delay)
        except VoxcError:
            raise
        except Exception as exc:   # mistral-common raises many types for a malformed file
            message = " ".join(str(exc).split())
            raise VoxcError(f"{self.path} is not a valid Tekken tokenizer file: {message}") from exc
        self.streaming_pad_id = self._special_id(STREAMING_PAD)
        self.streaming_word_id = self._special_id(STREAMING_WORD)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "tekken.json") -> "Tokenizer":
        """A tokenizer from the bytes of a ``tekken.json`` (``name`` is used in error messages)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tekken.json"
            path.write_bytes(data)
            try:
                return cls(path)
            except VoxcError as exc:
                raise VoxcError(str(exc).replace(str(path), str(name))) from None

    def _special_id(self, token_str: str) -> int:
        try:
            return int(self._tekken.get_special_token(token_str))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VoxcError(f"{self.path} has no {token_str} special token: is it a Voxtral Realtime tokenizer?") from None

    # ---- ids and settings: bos_id, eos_id, pad_id, vocab_size, num_special_tokens, n_left_pad_tokens,
    # transcription_delay_ms (the delay the file suggests, or None) are plain attributes set above
    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special_tokens

    # ---- text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (for tests and teacher forcing)."""
        return self._tekken.encode(text, bos=False, eos=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to the transcript: empty for special/control tokens."""
        if not 0 <= token_id < self.vocab_size:
            raise VoxcError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.is_special(token_id):
            return b""
        return self._tekken.id_to_byte_piece(token_id)

    def decode(self, ids) -> str:
        """Transcript text of ``ids``; control tokens are dropped, invalid UTF-8 becomes U+FFFD.

        Bytes are joined across dropped control tokens before UTF-8 decoding, so a character whose
        byte tokens straddle a ``[STREAMING_PAD]`` still comes out whole (mistral-common would
        decode each side separately).  Otherwise this equals mistral-common's ``IGNORE`` decode.
        """
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that are always whole characters.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a multi-byte character is still incomplete)."""
        delta = self._utf8.decode(self._tokenizer.token_bytes(int(token_id)))
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of stream: an incomplete trailing character becomes U+FFFD."""
        delta = self._utf8.decode(b"", final=True)
        self.text += delta
        return delta


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)


# ---- a tiny Voxtral-like tekken.json for tests and ``voxc make-tiny`` --------------------------
def tiny_tekken_dict(*, transcription_delay_ms: float = 480.0, n_left_pad_tokens: int = DEFAULT_N_LEFT_PAD_TOKENS,
                     version: str = "v13") -> dict:
    """256 byte tokens + :data:`TINY_MERGES`, 1000 specials at Voxtral's ids, a streaming audio section."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    named = dict(_NAMED_SPECIAL_RANKS)
    named.update({t["rank"]: str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS})  # ranks 0..19
    specials = [{"rank": rank, "token_str": named.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
                for rank in range(NUM_SPECIAL_TOKENS)]

    pieces = [bytes([b]) for b in range(256)] + list(TINY_MERGES)
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(piece).decode("ascii"),
              "token_str": piece.decode("utf-8", errors="ignore") if rank >= 256 else None}
             for rank, piece in enumerate(pieces)]
    return {
        "config": {"pattern": _TEKKEN_PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": TINY_VOCAB_SIZE,
                   "default_num_special_tokens": NUM_SPECIAL_TOKENS, "version": version},
        "vocab": vocab,
        "special_tokens": specials,
        "audio": {
            "sampling_rate": 16000, "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
            "transcription_delay_ms": float(transcription_delay_ms), "transcription_format": "streaming",
            "streaming_look_ahead_ms": 2.5, "streaming_look_back_ms": 52.5,
            "streaming_n_left_pad_tokens": n_left_pad_tokens,
        },
    }


def write_tiny_tekken(path: str | Path, **kwargs) -> Path:
    """Write :func:`tiny_tekken_dict` to ``path`` (a ``.json`` file, or a directory to get ``tekken.json``)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "tekken.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_tekken_dict(**kwargs)))
    return path
