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

from clips import espeak

UTTERANCES = ["hello world", "world hello", "hello hello world", "the world"]
TRAIN_STEPS = 300


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
    make_tiny(root / "init", seed=11, scales=PLAIN)
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
    return voxc.load(root / "llvm"), clips


@pytest.mark.parametrize("text", UTTERANCES)
def test_trained_model_transcribes_offline_and_streaming(trained, text):
    model, clips = trained
    audio = clips[text]
    assert model.transcribe(audio).strip() == text
    session = model.stream()
    streamed = "".join(session.feed(audio[i:i + 999]) for i in range(0, len(audio), 999)) + session.finish()
    assert streamed.strip() == text
