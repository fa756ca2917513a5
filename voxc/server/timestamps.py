"""Timestamps of streamed text: which audio a token transcribes, and segments of a transcript.

The rule (``token_span``), from the session's layout (voxc.runtime.session):

* The model sees one audio embedding per token of audio, 80 ms (1280 samples at 16 kHz).  A
  stream's audio starts with ``left_pad`` tokens of silence, so *audio token* ``a`` covers the
  client's audio from ``(a - left_pad) * 0.08`` s to ``(a - left_pad + 1) * 0.08`` s.
* Decoder position ``q`` adds audio embedding ``q`` to its input token.  The prompt is
  ``[BOS] + [STREAMING_PAD] * (left_pad + delay)``, ``prompt_len = 1 + left_pad + delay`` positions,
  so the first token the model chooses is the *output* of position ``prompt_len - 1 = left_pad +
  delay`` (and is fed back as the input of position ``prompt_len``).
* Output position ``q`` has seen audio tokens ``0..q``; the model was trained to write the text of
  the audio ``delay`` tokens back.  So the token output at position ``q`` transcribes audio token
  ``q - delay``, the client's audio token ``u = q - delay - left_pad``:

      start = (q - delay - left_pad) * 0.08 s,   end = start + 0.08 s

  The first chosen token (``q = left_pad + delay``) covers the client's first 80 ms.  Said with the
  position ``p = q + 1`` where the token is fed back (``p >= prompt_len``): it covers audio token
  ``p - 1 - delay``, and its span ends at ``(p - delay - left_pad) * 0.08`` s.

``voxc.runtime.session.StreamingSession.take_pieces`` reports ``q`` for every token that completes
some text.  Spans are clamped to the audio the client sent: the tokens decoded over the silence
appended at the end of a stream get the end of the audio as their time.  A token's span is where
the model *emits* the word (a word's text usually arrives a little after its sound starts), which
is as precise as an 80 ms greedy stream gets; it is not a forced alignment.

A :class:`Segmenter` groups timed pieces into segments (OpenAI's ``verbose_json`` ``segments``, SRT
and WebVTT cues): a new segment starts after a pause of :data:`SEGMENT_GAP_S` without text, or after
sentence-ending punctuation followed by a space.
"""
from __future__ import annotations

from dataclasses import dataclass

SECONDS_PER_TOKEN = 0.08      # 12.5 Hz: one token per 1280 samples at 16 kHz
SEGMENT_GAP_S = 0.64          # 8 tokens without text end a segment
_SENTENCE_END = (".", "?", "!", "\u3002", "\uff1f", "\uff01")


def token_span(position: int, *, left_pad_tokens: int, delay_tokens: int,
               seconds_per_token: float = SECONDS_PER_TOKEN, duration: float | None = None) -> tuple[float, float]:
    """``(start, end)`` in seconds of the client's audio that the token output at decoder position
    ``position`` transcribes (see the module docstring); clamped to ``[0, duration]`` when given."""
    first = left_pad_tokens + delay_tokens            # output position of the first chosen token
    if position < first:
        raise ValueError(f"decoder position {position} is inside the prompt (the first token is chosen at {first})")
    start = (position - first) * seconds_per_token
    end = start + seconds_per_token
    if duration is not None:
        start, end = min(start, duration), min(end, duration)
    return round(start, 3), round(end, 3)


@dataclass
class Piece:
    """Text with the audio it transcribes."""
    text: str
    start: float
    end: float

    def as_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end}


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str

    def as_dict(self) -> dict:
        return {"id": self.id, "start": self.start, "end": self.end, "text": self.text}


class Segmenter:
    """Groups timed pieces into segments as they arrive."""

    def __init__(self, gap_s: float = SEGMENT_GAP_S):
        self.gap_s = gap_s
        self.segments: list[Segment] = []

    def push(self, piece: Piece) -> None:
        if not piece.text:
            return
        last = self.segments[-1] if self.segments else None
        if last is None or self._breaks(last, piece):
            self.segments.append(Segment(len(self.segments), piece.start, piece.end, piece.text))
        else:
            last.text += piece.text
            last.end = max(last.end, piece.end)

    def _breaks(self, last: Segment, piece: Piece) -> bool:
        if piece.start - last.end >= self.gap_s - 1e-9:
            return True
        # "...end." + " Next": a sentence ended and the next word begins
        ended = last.text.rstrip().endswith(_SENTENCE_END)
        spaced = last.text[-1:].isspace() or piece.text[:1].isspace()
        return ended and spaced

    def as_dicts(self, strip: bool = False) -> list[dict]:
        out = [s.as_dict() for s in self.segments]
        if strip:
            for d in out:
                d["text"] = d["text"].strip()
        return out


def _clock(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segments: list[Segment]) -> str:
    return "".join(f"{i + 1}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(segments))


def to_vtt(segments: list[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)
