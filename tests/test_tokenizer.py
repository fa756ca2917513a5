import json

import pytest

from voxc.errors import VoxcError
from voxc.config import ModelConfig
from voxc.tokenizer import TINY_VOCAB_SIZE, Tokenizer, write_tiny_tekken

TEXT = " Hello world, the quick brown fox. Ça va? 日本"


@pytest.fixture(scope="module")
def tok(tiny_tekken_path):
    return Tokenizer(tiny_tekken_path)


@pytest.fixture(scope="module")
def mistral_common_tekken(tiny_tekken_path):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    return Tekkenizer.from_file(tiny_tekken_path)


def stream_of(tok, text):
    """Token ids as the model emits them: BOS, pads, text with word markers, EOS."""
    ids = tok.encode(text)
    return [tok.bos_id] + [tok.streaming_pad_id] * 3 + ids[:4] + [tok.streaming_word_id] + ids[4:] + [tok.eos_id]


def test_tiny_tekken_has_voxtral_ids_and_audio_settings(tok):
    assert tok.vocab_size == TINY_VOCAB_SIZE == ModelConfig.tiny().decoder.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 11)
    assert (tok.streaming_pad_id, tok.streaming_word_id) == (32, 33)
    assert tok.n_left_pad_tokens == 32
    assert tok.transcription_delay_ms == 480.0
    assert tok.is_special(32) and not tok.is_special(1000)


def test_merges_are_used(tok):
    hello, world, the = (tok.encode(s) for s in ("hello", " world", " the"))
    assert len(hello) == len(world) == len(the) == 1


def test_decode_drops_control_tokens_and_matches_mistral_common(tok, mistral_common_tekken):
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    ids = stream_of(tok, TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids) == mistral_common_tekken.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
    assert "[STREAMING" not in tok.decode(ids) and "<s>" not in tok.decode(ids)


def test_decode_matches_transformers_backend(tok, tiny_tekken_path):
    from transformers import MistralCommonBackend

    backend = MistralCommonBackend.from_pretrained(str(tiny_tekken_path.parent))
    ids = stream_of(tok, TEXT)
    assert tok.decode(ids) == backend.decode(ids, skip_special_tokens=True)


def test_incremental_decoder_emits_whole_characters_only(tok):
    ids = stream_of(tok, TEXT)
    decoder = tok.incremental_decoder()
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == tok.decode(ids) == decoder.text
    assert all("\ufffd" not in d for d in deltas)
    # 日 is three byte tokens: nothing is emitted until its last byte arrives.
    jp = tok.encode("日")
    assert len(jp) == 3
    decoder = tok.incremental_decoder()
    assert [decoder.push(i) for i in jp] == ["", "", "日"]


def test_character_split_by_a_control_token_stays_whole(tok):
    a, b, c = tok.encode("日")
    decoder = tok.incremental_decoder()
    deltas = [decoder.push(i) for i in (a, tok.streaming_pad_id, b, tok.streaming_word_id, c)]
    assert deltas == ["", "", "", "", "日"]
    assert tok.decode([a, tok.streaming_pad_id, b, c]) == "日"


def test_invalid_utf8_becomes_replacement_character(tok):
    lead_byte = 1000 + 0xE6  # first byte of a 3-byte character, never completed
    decoder = tok.incremental_decoder()
    assert decoder.push(lead_byte) == ""
    assert decoder.push(tok.encode("a")[0]) == "\ufffda"
    assert decoder.push(lead_byte) == ""
    assert decoder.flush() == "\ufffd"
    assert tok.decode([lead_byte, tok.encode("a")[0]]) == "\ufffda"


def test_out_of_vocabulary_id_is_an_error(tok):
    with pytest.raises(VoxcError, match="outside the vocabulary"):
        tok.decode([TINY_VOCAB_SIZE])


def test_loads_from_directory_and_without_audio_section(tmp_path):
    data = json.loads(write_tiny_tekken(tmp_path / "a").read_text())
    assert Tokenizer(tmp_path / "a").vocab_size == TINY_VOCAB_SIZE
    del data["audio"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    no_audio = Tokenizer(tmp_path / "b.json")
    assert no_audio.n_left_pad_tokens == 32 and no_audio.transcription_delay_ms is None


def test_transcription_delay_is_configurable(tmp_path):
    assert Tokenizer(write_tiny_tekken(tmp_path, transcription_delay_ms=240)).transcription_delay_ms == 240.0


@pytest.mark.parametrize("problem, message", [
    ("missing", "not found"),
    ("not_json", "not a valid Tekken tokenizer"),
    ("bad_version", "not a valid Tekken tokenizer"),
    ("no_streaming_pad", r"no \[STREAMING_PAD\] special token"),
])
def test_bad_tokenizer_files(tmp_path, problem, message):
    path = tmp_path / "tekken.json"
    data = json.loads(write_tiny_tekken(tmp_path / "good").read_text())
    if problem == "not_json":
        path.write_text("{ not json")
    elif problem == "bad_version":
        data["config"]["version"] = "v99"
        path.write_text(json.dumps(data))
    elif problem == "no_streaming_pad":
        data["special_tokens"][32]["token_str"] = "<SPECIAL_32>"
        path.write_text(json.dumps(data))
    with pytest.raises(VoxcError, match=message):
        Tokenizer(path)


def test_transformers_processor_accepts_the_tiny_tokenizer(tiny_tekken_path):
    from transformers import MistralCommonBackend, VoxtralRealtimeFeatureExtractor, VoxtralRealtimeProcessor

    processor = VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(),
                                         tokenizer=MistralCommonBackend.from_pretrained(str(tiny_tekken_path.parent)))
    assert processor.num_delay_tokens == 6
    first = processor([0.0] * processor.num_samples_first_audio_chunk, is_streaming=True, is_first_audio_chunk=True)
    assert list(first["input_ids"][0]) == [1] + [32] * (32 + 6)
