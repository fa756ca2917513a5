"""A readable end-to-end check: a tiny model trained here (with transformers) to transcribe a few
espeak-ng utterances is compiled by voxc, which must then print the same words, offline and streaming.

Random weights can only show equality of numbers; a trained model shows the whole pipeline
(padding, prompt, delay conditioning, greedy loop, Tekken decoding) produces the right text.
"""
from __future__ import annotations

import numpy as np
import pytest

import voxc
from voxc.build import build
from voxc.loader.tiny import PLAIN, make_tiny
from voxc.config import AudioConfig, DecoderConfig, EncoderConfig, ModelConfig
from voxc.tokenizer import TINY_VOCAB_SIZE

from clips import espeak

UTTERANCES = ["hello world", "world hello", "hello hello world", "the world"]
TRAIN_STEPS = 120
# Widths that are whole Q4_K super-blocks (256), so the quantized builds below run every
# projection through the Q4_K / Q4_0 / Q8_0 kernels rather than falling back to dense ones.
TRAINED_CONFIG = ModelConfig(
    EncoderConfig(dim=256, n_layers=2, n_heads=4, head_dim=64, hidden_dim=512),
    DecoderConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
                  vocab_size=TINY_VOCAB_SIZE),
    AudioConfig())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from oracle import Oracle

    clips = {text: espeak(text) for text in UTTERANCES}
    if any(audio is None for audio in clips.values()):
        pytest.skip("espeak-ng and sox are needed to synthesize the training utterances")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("overfit")
    make_tiny(root / "init", seed=11, scales=PLAIN, config=TRAINED_CONFIG)
    oracle = Oracle(root / "init")
    model = oracle.model.train()
    tokenizer = oracle.processor().tokenizer.tokenizer.instruct_tokenizer.tokenizer
    examples = []
    for text, audio in clips.items():
        inputs = oracle._inputs(audio, 6)
        target = tokenizer.encode(" " + text, bos=False, eos=False) + [tokenizer.eos_id]
        prompt_len = inputs.input_ids.shape[1]
        n_positions = inputs.input_features.shape[-1] // 8
        ids = torch.cat([inputs.input_ids, torch.tensor([target[:-1]])], 1)
        ids = torch.nn.functional.pad(ids, (0, n_positions - ids.shape[1]), value=tokenizer.pad_id)
        labels = torch.full_like(ids, -100)
        labels[0, prompt_len:prompt_len + len(target)] = torch.tensor(target)  # HF shifts labels by one
        examples.append((inputs.input_features, ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):
        for features, ids, labels in examples:
            model(input_ids=ids, input_features=features, labels=labels, num_delay_tokens=6).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(root / "trained")  # transformers' own layout: exercises voxc's HF loader too
    (root / "trained" / "tekken.json").write_bytes((root / "init" / "tekken.json").read_bytes())
    build(root / "trained", "llvm", root / "llvm", progress=False)
    return voxc.load(root / "llvm"), clips, root


@pytest.mark.parametrize("text", UTTERANCES)
def test_trained_model_transcribes_offline_and_streaming(trained, text):
    model, clips, _ = trained
    audio = clips[text]
    assert model.transcribe(audio).strip() == text
    session = model.stream()
    streamed = "".join(session.feed(audio[i:i + 999]) for i in range(0, len(audio), 999)) + session.finish()
    assert streamed.strip() == text


# Largest logit error against the float32 build, relative to the largest logit (measured: see the
# test output). Q4 loses more than Q8; the transcripts must not change either way.
QUANT_LOGIT_TOLERANCE = {"q8_0": 0.02, "q4_k": 0.15, "q4_0": 0.15}


@pytest.mark.parametrize("qtype", sorted(QUANT_LOGIT_TOLERANCE))
def test_quantized_builds_transcribe_the_same(trained, qtype, capsys):
    model, clips, root = trained
    # 32 silence tokens as in training; Q4_0's own default of 76 is checked in test_quant_model.py
    build(root / "trained", "llvm", root / qtype, progress=False, quantization=qtype, left_pad_tokens=32)
    quantized = voxc.load(root / qtype)
    worst = 0.0
    for text, audio in clips.items():
        reference, candidate = model.stream(), quantized.stream()
        reference.record_logits = candidate.record_logits = True
        texts = [session.feed(audio) + session.finish() for session in (reference, candidate)]
        assert texts[1].strip() == texts[0].strip() == text
        ref_logits, logits = np.array(reference.logits), np.array(candidate.logits)
        worst = max(worst, float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()))
    with capsys.disabled():
        print(f"\n{qtype}: largest relative logit error against float32 on the trained model: {worst:.2e}")
    assert worst < QUANT_LOGIT_TOLERANCE[qtype]
