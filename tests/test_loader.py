import json
import shutil
import types

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from voxc.errors import VoxcError
from voxc.loader import hf
from voxc.loader.names import expected_shapes, rope_rows, voxc_to_official
from voxc.loader.safetensors_loader import load_checkpoint
from voxc.loader.tiny import PLAIN, VARIED, make_tiny, tiny_weights
from voxc.config import ModelConfig

OFFICIAL = "consolidated.safetensors"
EMBEDDING = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"


def all_tensors(path, **kwargs):
    return dict(load_checkpoint(path, progress=False).tensors(**kwargs))


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(ckpt_dir, edit, file=OFFICIAL):
    """Apply ``edit`` to the dict of stored tensors of a checkpoint file and save it back."""
    tensors = load_file(ckpt_dir / file)
    edit(tensors)
    save_file(tensors, ckpt_dir / file)


def edit_params(ckpt_dir, edit):
    params = json.loads((ckpt_dir / "params.json").read_text())
    edit(params)
    (ckpt_dir / "params.json").write_text(json.dumps(params))


# ---- loading ------------------------------------------------------------------------------------------
def test_official_checkpoint_loads_every_tensor(tiny_ckpt_dir):
    ckpt = load_checkpoint(tiny_ckpt_dir, progress=False)
    assert ckpt.layout == "mistral" and ckpt.config == ModelConfig.tiny()
    assert ckpt.tokenizer_path == tiny_ckpt_dir / "tekken.json"
    shapes = expected_shapes(ckpt.config)
    assert ckpt.names() == list(shapes)
    stream = ckpt.tensors()
    assert isinstance(stream, types.GeneratorType)  # lazy: nothing is read before iteration
    loaded = dict(stream)
    assert {n: a.shape for n, a in loaded.items()} == shapes
    assert all(a.dtype == np.float32 for a in loaded.values())
    reference = tiny_weights(ckpt.config, seed=0, scales=VARIED)
    for name, array in loaded.items():
        np.testing.assert_array_equal(array, reference[name], err_msg=name)
    np.testing.assert_array_equal(ckpt.get("enc.conv0.weight"), reference["enc.conv0.weight"])
    with pytest.raises(VoxcError, match="no tensor 'nope'"):
        ckpt.get("nope")


def test_official_file_uses_mistral_names(tiny_ckpt_dir):
    stored = load_file(tiny_ckpt_dir / OFFICIAL)
    assert set(stored) == {voxc_to_official(n) for n in expected_shapes(ModelConfig.tiny())}
    assert EMBEDDING in stored and "layers.0.attention.wq.weight" in stored


def test_hf_layout_loads_to_the_same_voxc_tensors(tiny_ckpt_dir, tiny_ckpt_hf_dir):
    hf_ckpt = load_checkpoint(tiny_ckpt_hf_dir, progress=False)
    assert hf_ckpt.layout == "hf" and hf_ckpt.config == ModelConfig.tiny()
    official, from_hf = all_tensors(tiny_ckpt_dir), dict(hf_ckpt.tensors())
    assert list(official) == list(from_hf)
    for name in official:
        np.testing.assert_array_equal(from_hf[name], official[name], err_msg=name)


def test_hf_file_stores_split_half_rows(tiny_ckpt_dir, tiny_ckpt_hf_dir):
    """The HF file really is permuted (so the loader's un-permute is exercised), exactly as
    transformers' conversion script permutes: view(heads, hd/2, 2, in).transpose(1, 2)."""
    cfg = ModelConfig.tiny()
    official, stored = load_file(tiny_ckpt_dir / OFFICIAL), load_file(tiny_ckpt_hf_dir / "model.safetensors")
    permuted = [n for n in expected_shapes(cfg) if rope_rows(n, cfg)]
    assert len(permuted) == 2 * cfg.encoder.n_layers + cfg.encoder.n_layers + 2 * cfg.decoder.n_layers  # +enc q bias
    for name in permuted:
        ours, theirs = official[voxc_to_official(name)], stored[hf.voxc_to_hf(name)]
        heads = rope_rows(name, cfg)
        conversion = ours.reshape(heads, -1, 2, *ours.shape[1:]).swapaxes(1, 2).reshape(ours.shape)
        np.testing.assert_array_equal(theirs, conversion, err_msg=name)
        assert not np.array_equal(theirs, ours)


def test_rope_permutations_are_inverse():
    rows = np.arange(4 * 8 * 3).reshape(32, 3)
    half = hf.interleaved_to_split_half(rows, 4)
    assert half[:4, 0].tolist() == [0, 6, 12, 18]  # head 0: even rows first, then odd rows
    np.testing.assert_array_equal(hf.split_half_to_interleaved(half, 4), rows)
    np.testing.assert_array_equal(hf.split_half_to_interleaved(hf.interleaved_to_split_half(rows[:, 0], 4), 4),
                                  rows[:, 0])


def test_hf_names_in_memory_and_on_disk():
    for name in expected_shapes(ModelConfig.tiny()):
        on_disk, in_memory = hf.voxc_to_hf(name), hf.voxc_to_hf(name, in_memory=True)
        assert hf.hf_to_voxc(on_disk) == hf.hf_to_voxc(in_memory) == name
    assert hf.voxc_to_hf("dec.layers.1.attention.wq.weight") == "language_model.model.layers.1.self_attn.q_proj.weight"
    assert hf.voxc_to_hf("dec.layers.1.attention.wq.weight", in_memory=True) == \
        "model.language_model.layers.1.self_attn.q_proj.weight"
    assert hf.hf_to_voxc("model.audio_tower.embedder.conv1.weight") == "enc.conv0.weight"
    assert hf.hf_to_voxc("lm_head.weight") is None


def test_bf16_checkpoint(tiny_ckpt_dir, tiny_ckpt_bf16_dir):
    ckpt = load_checkpoint(tiny_ckpt_bf16_dir, progress=False)
    assert ckpt.stored_dtypes == {np.dtype(ml_dtypes.bfloat16)}
    as_stored = dict(ckpt.tensors())
    upcast = dict(ckpt.tensors("float32"))
    rounded_here = all_tensors(tiny_ckpt_dir, dtype="bfloat16")
    for name, exact in all_tensors(tiny_ckpt_dir).items():
        assert as_stored[name].dtype == ml_dtypes.bfloat16 and upcast[name].dtype == np.float32
        np.testing.assert_array_equal(upcast[name], exact.astype(ml_dtypes.bfloat16).astype(np.float32))
        np.testing.assert_array_equal(rounded_here[name].view(np.uint16), as_stored[name].view(np.uint16))
        assert np.abs(upcast[name] - exact).max() <= np.abs(exact).max() * 2 ** -8


def test_bf16_hf_layout_roundtrip(tmp_path, tiny_ckpt_bf16_dir):
    make_tiny(tmp_path, layout="hf", dtype="bfloat16")
    from_hf = all_tensors(tmp_path)
    for name, array in all_tensors(tiny_ckpt_bf16_dir).items():
        assert from_hf[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(from_hf[name].view(np.uint16), array.view(np.uint16))


def test_unsupported_requested_dtype(tiny_ckpt_dir):
    with pytest.raises(VoxcError, match="unsupported weight dtype 'int8'"):
        next(load_checkpoint(tiny_ckpt_dir, progress=False).tensors("int8"))


def test_sharded_checkpoints(tmp_path, tiny_ckpt_dir, tiny_ckpt_hf_dir):
    official = copy_ckpt(tiny_ckpt_dir, tmp_path / "official")
    tensors = load_file(official / OFFICIAL)
    names = sorted(tensors)
    (official / OFFICIAL).unlink()
    save_file({n: tensors[n] for n in names[:20]}, official / "consolidated-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[20:]}, official / "consolidated-00002-of-00002.safetensors")

    hf_dir = copy_ckpt(tiny_ckpt_hf_dir, tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": sorted(tensors)[:30],
              "model-00002-of-00002.safetensors": sorted(tensors)[30:]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, hf_dir / file)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))

    reference = all_tensors(tiny_ckpt_dir)
    for ckpt_dir in (official, hf_dir):
        ckpt = load_checkpoint(ckpt_dir, progress=False)
        assert len(ckpt.files) == 2
        loaded = dict(ckpt.tensors())
        assert sorted(loaded) == sorted(reference)  # tensors() goes file by file
        for name in reference:
            np.testing.assert_array_equal(loaded[name], reference[name])

    (hf_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(VoxcError, match="lists shards that are not in .*model-00002-of-00002"):
        load_checkpoint(hf_dir)


def test_progress_bar_goes_to_stderr_only_when_enabled(tiny_ckpt_dir, capsys):
    list(load_checkpoint(tiny_ckpt_dir, progress=False).tensors())
    assert capsys.readouterr().err == ""
    list(load_checkpoint(tiny_ckpt_dir, progress=True).tensors())
    captured = capsys.readouterr()
    assert "57/57" in captured.err and captured.out == ""


def test_mixed_layout_directory_prefers_official_unless_told(tmp_path, tiny_ckpt_dir, tiny_ckpt_hf_dir):
    both = copy_ckpt(tiny_ckpt_dir, tmp_path / "both")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_ckpt_hf_dir / f, both / f)
    assert load_checkpoint(both, progress=False).layout == "mistral"
    assert load_checkpoint(both, progress=False, layout="hf").layout == "hf"
    assert load_checkpoint(both / OFFICIAL, progress=False).path == both


# ---- bad inputs ---------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(tmp_path, tiny_ckpt_dir):
    return copy_ckpt(tiny_ckpt_dir, tmp_path / "ckpt")


def expect_error(path, *patterns, **kwargs):
    with pytest.raises(VoxcError) as info:
        load_checkpoint(path, progress=False, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), f"{pattern!r} not in:\n{info.value}"
    return str(info.value)


def test_missing_tensor(ckpt_copy):
    rewrite_weights(ckpt_copy, lambda t: t.pop("layers.1.feed_forward.w2.weight"))
    expect_error(ckpt_copy, "1 tensors missing", "dec.layers.1.feed_forward.w2.weight")


def test_unexpected_tensor(ckpt_copy):
    rewrite_weights(ckpt_copy, lambda t: t.update({"output.weight": np.zeros((3, 3), np.float32)}))
    expect_error(ckpt_copy, "unexpected tensors", "'output.weight' in consolidated.safetensors")


def test_misshapen_tensor(ckpt_copy):
    rewrite_weights(ckpt_copy, lambda t: t.update({"layers.0.attention.wk.weight": np.zeros((12, 48), np.float32)}))
    expect_error(ckpt_copy, "'layers.0.attention.wk.weight' (voxc dec.layers.0.attention.wk.weight) in "
                            "consolidated.safetensors has shape (12, 48), expected (24, 48)",
                 "n_kv_heads*head_dim = 24 but the weights have 12")


def test_unsupported_stored_dtype(ckpt_copy):
    rewrite_weights(ckpt_copy, lambda t: t.update({"norm.weight": np.ones(48, np.int32)}))
    expect_error(ckpt_copy, "unsupported dtype", "'norm.weight' is I32")


@pytest.mark.parametrize("field, value, likely_cause", [
    ("dim", 64, "params.json says dim = 64 but the weights have 48"),
    ("vocab_size", 2000, "params.json says vocab_size = 2000 but the weights have 1268"),
    ("hidden_dim", 128, "params.json says hidden_dim = 128 but the weights have 96"),
    ("n_layers", 3, "the weights have 2 decoder layers but params.json says n_layers = 3"),
    ("n_layers", 1, "the weights have 2 decoder layers but params.json says n_layers = 1"),
])
def test_params_json_disagreeing_with_weights_names_the_field(ckpt_copy, field, value, likely_cause):
    edit_params(ckpt_copy, lambda p: p.update({field: value}))
    message = expect_error(ckpt_copy, "likely cause: " + likely_cause)
    assert message.count("\n") < 30  # long lists are cut short


def test_encoder_field_mismatch(ckpt_copy):
    edit_params(ckpt_copy, lambda p: p["multimodal"]["whisper_model_args"]["encoder_args"].update(hidden_dim=80))
    expect_error(ckpt_copy, "likely cause: params.json says encoder_args.hidden_dim = 80 but the weights have 64")


def test_hf_config_mismatch_uses_hf_field_names(tmp_path, tiny_ckpt_hf_dir):
    hf_dir = copy_ckpt(tiny_ckpt_hf_dir, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 100
    (hf_dir / "config.json").write_text(json.dumps(config))
    expect_error(hf_dir, "config.json says text_config.intermediate_size = 100 but the weights have 96",
                 "'language_model.model.layers.0.mlp.gate_proj.weight'")


@pytest.mark.parametrize("keep_bytes", [100, -10])
def test_truncated_file(ckpt_copy, keep_bytes):
    path = ckpt_copy / OFFICIAL
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    expect_error(ckpt_copy, f"cannot read {path}", "truncated or corrupt")


def test_garbage_file(ckpt_copy):
    (ckpt_copy / OFFICIAL).write_bytes(b"<html>502 Bad Gateway</html>" * 10)
    expect_error(ckpt_copy, "truncated or corrupt", OFFICIAL)


def test_missing_params_json(ckpt_copy):
    (ckpt_copy / "params.json").unlink()
    expect_error(ckpt_copy, "params.json not found", OFFICIAL)


def test_malformed_params_json(ckpt_copy):
    (ckpt_copy / "params.json").write_text('{"dim": 48')
    expect_error(ckpt_copy, "params.json is not valid JSON")


def test_missing_tokenizer(ckpt_copy):
    (ckpt_copy / "tekken.json").unlink()
    expect_error(ckpt_copy, "tekken.json not found")
    assert load_checkpoint(ckpt_copy, progress=False, require_tokenizer=False).tokenizer_path is None


def test_not_a_checkpoint(tmp_path):
    expect_error(tmp_path, "neither params.json", "config.json")
    expect_error(tmp_path / "absent", "not found")
    (tmp_path / "params.json").write_text("{}")
    expect_error(tmp_path, "has params.json but no *.safetensors")


def test_hf_layout_without_weights(tmp_path, tiny_ckpt_hf_dir):
    hf_dir = copy_ckpt(tiny_ckpt_hf_dir, tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    expect_error(hf_dir, "no weights in", "model.safetensors")


# ---- tiny checkpoints ---------------------------------------------------------------------------------
def test_tiny_weights_are_deterministic_and_scaled():
    cfg = ModelConfig.tiny()
    varied, again, plain = tiny_weights(cfg, seed=0), tiny_weights(cfg, seed=0), tiny_weights(cfg, seed=0, scales=PLAIN)
    assert all(np.array_equal(varied[n], again[n]) for n in varied)
    assert not np.array_equal(tiny_weights(cfg, seed=1)["adapter.w_in.weight"], varied["adapter.w_in.weight"])
    np.testing.assert_allclose(varied["adapter.w_in.weight"], 10 * plain["adapter.w_in.weight"], rtol=1e-6)
    np.testing.assert_allclose(varied["dec.layers.0.attention.wq.weight"],
                               0.1 * plain["dec.layers.0.attention.wq.weight"], rtol=1e-6)
    np.testing.assert_array_equal(varied["dec.layers.0.ada_norm.w_in.weight"],
                                  plain["dec.layers.0.ada_norm.w_in.weight"])
    embedding = varied["tok_embeddings.weight"]
    assert 0.9 < embedding[1000:].std() < 1.1 and embedding[:1000].std() < 0.002
    assert abs(varied["dec.norm.weight"].mean() - 1) < 0.05


def test_make_tiny_windows_and_errors(tmp_path):
    ckpt = load_checkpoint(make_tiny(tmp_path / "w", encoder_window=8, decoder_window=16), progress=False)
    assert (ckpt.config.encoder.sliding_window, ckpt.config.decoder.sliding_window) == (8, 16)
    with pytest.raises(VoxcError, match="dtype"):
        make_tiny(tmp_path / "x", dtype="int8")
    with pytest.raises(VoxcError, match="layout"):
        make_tiny(tmp_path / "x", layout="gguf")
    with pytest.raises(VoxcError, match="vocab_size"):
        make_tiny(tmp_path / "x", config=ModelConfig.tiny(vocab_size=2000))


# ---- the transformers oracle built from a voxc checkpoint ----------------------------------------------
def test_rope_layouts_agree_with_transformers_rotary_embedding():
    """Official rows + interleaved-pair RoPE (Mistral's definition: rotate (x[2i], x[2i+1]) by
    pos * theta^(-2i/hd)) == transformers' split-half RoPE on rows permuted by voxc.loader.hf."""
    import torch
    from transformers.models.voxtral_realtime.modeling_voxtral_realtime import rotate_half

    heads, head_dim, dim, positions, theta = 2, 8, 16, np.arange(5), 1e6
    rng = np.random.default_rng(0)
    w_official, x = rng.standard_normal((heads * head_dim, dim)), rng.standard_normal((len(positions), dim))
    angles = positions[:, None] * theta ** (-np.arange(0, head_dim, 2) / head_dim)  # [pos, hd/2]

    q = (x @ w_official.T).reshape(len(positions), heads, head_dim // 2, 2)
    pairs = q[..., 0] + 1j * q[..., 1]
    rotated = pairs * np.exp(1j * angles)[:, None, :]
    official = np.stack([rotated.real, rotated.imag], -1).reshape(len(positions), heads, head_dim)

    q_hf = torch.from_numpy(x @ hf.interleaved_to_split_half(w_official, heads).T).reshape(-1, heads, head_dim)
    cos = torch.from_numpy(np.cos(np.concatenate([angles, angles], -1)))[:, None, :]
    sin = torch.from_numpy(np.sin(np.concatenate([angles, angles], -1)))[:, None, :]
    transformers_rope = (q_hf * cos + rotate_half(q_hf) * sin).numpy()
    np.testing.assert_allclose(transformers_rope, _to_split_half_per_head(official), atol=1e-12)


def _to_split_half_per_head(x):
    """[..., heads, hd] interleaved-pair order -> split-half order within each head."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], -1)


@pytest.fixture(scope="module")
def speech(speech_clips):
    from voxc.audio import load_audio
    return load_audio(speech_clips["hello_world"])


def test_oracle_weights_round_trip_through_save_pretrained(tmp_path, oracle, tiny_ckpt_dir):
    """voxc -> HF (oracle builder, permute) -> save_pretrained -> voxc HF loader (un-permute) is exact."""
    oracle.model.save_pretrained(tmp_path)
    shutil.copy(tiny_ckpt_dir / "tekken.json", tmp_path)
    reloaded = load_checkpoint(tmp_path, progress=False)
    assert reloaded.layout == "hf"
    official = all_tensors(tiny_ckpt_dir)
    for name, array in reloaded.tensors():
        np.testing.assert_array_equal(array, official[name], err_msg=name)


def test_transformers_loads_make_tiny_hf_layout_as_the_oracle(tiny_ckpt_hf_dir, oracle, speech):
    """make_tiny(layout='hf') is a valid transformers checkpoint holding the oracle's model."""
    import torch
    from transformers import VoxtralRealtimeForConditionalGeneration

    model = VoxtralRealtimeForConditionalGeneration.from_pretrained(tiny_ckpt_hf_dir, dtype=torch.float32).eval()
    inputs = oracle._inputs(speech, 6)
    n_tokens = inputs.input_features.shape[-1] // 8
    ids = torch.full((1, n_tokens), 32)
    with torch.no_grad():
        expected = oracle.model(input_ids=ids, input_features=inputs.input_features, num_delay_tokens=6).logits
        got = model(input_ids=ids, input_features=inputs.input_features, num_delay_tokens=6).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_negative_control_without_rope_permutation(tiny_ckpt_dir, oracle, speech):
    from oracle import Oracle

    tokens, _ = oracle.generate(speech)
    good = oracle.logits(speech, tokens)
    bad = Oracle(tiny_ckpt_dir, permute_rope=False).logits(speech, tokens)
    assert np.abs(good - bad).max() > 0.1


def test_oracle_offline_streaming_and_teacher_forcing_agree(oracle, speech):
    tokens, scores = oracle.generate(speech)
    stream_tokens, stream_scores = oracle.stream_generate(speech)
    audio_tokens = 32 + -(-len(speech) // 1280) + 17  # left pad, audio, right pad; one token per 80 ms
    assert len(tokens) == audio_tokens - 39  # every position after the prompt gets one token
    np.testing.assert_array_equal(stream_tokens, tokens)
    np.testing.assert_allclose(stream_scores, scores, atol=1e-4)
    np.testing.assert_allclose(oracle.logits(speech, tokens), scores, atol=1e-4)
    assert len(set(tokens.tolist())) >= 3  # the varied-token tiny model does not just repeat one token


def test_oracle_stages_shapes(oracle_stages, speech):
    stages = oracle_stages(speech)
    n_tokens = stages["mel"].shape[1] // 8
    assert stages["mel"].shape == (128, 8 * n_tokens)
    assert stages["conv_out"].shape == stages["encoder_out"].shape == (4 * n_tokens, 32)
    assert stages["adapter_out"].shape == (n_tokens, 48)
    assert stages["input_ids"].tolist() == [1] + [32] * 38


def test_oracle_float_inputs_equal_the_processor_on_16_bit_audio(oracle, speech):
    """The oracle skips the processor's 16-bit WAV round trip; on audio that is already 16-bit
    the two paths must be identical."""
    pcm = np.round(speech * 32767) / 32768
    ours, theirs = oracle._inputs(pcm, 6), oracle.processor_inputs(pcm)
    assert ours.input_ids.tolist() == theirs.input_ids.tolist()
    np.testing.assert_array_equal(ours.input_features.numpy(), theirs.input_features.numpy())


def test_oracle_other_delay_and_small_windows(oracle, oracle_small_windows, speech):
    tokens, scores = oracle.generate(speech, delay_tokens=3)
    assert oracle.stages(speech, delay_tokens=3)["input_ids"].tolist() == [1] + [32] * 35
    np.testing.assert_allclose(oracle.logits(speech, tokens, delay_tokens=3), scores, atol=1e-4)
    tokens, scores = oracle_small_windows.generate(speech)
    stream_tokens, stream_scores = oracle_small_windows.stream_generate(speech)
    np.testing.assert_array_equal(stream_tokens, tokens)
    np.testing.assert_allclose(stream_scores, scores, atol=1e-4)
    np.testing.assert_allclose(oracle_small_windows.logits(speech, tokens), scores, atol=1e-4)


def test_oracle_sliding_windows_count_keys_including_the_query(tmp_path, oracle, speech):
    """HF's window W lets position p attend to positions p-W+1..p.  Shrinking a window from
    (almost) unlimited to W therefore changes nothing before position W and something at W."""
    from oracle import Oracle

    encoder_window, decoder_window = 8, 16
    short_encoder = Oracle(make_tiny(tmp_path / "enc", encoder_window=encoder_window))
    full, short = oracle.stages(speech)["encoder_out"], short_encoder.stages(speech)["encoder_out"]
    np.testing.assert_allclose(short[:encoder_window], full[:encoder_window], atol=1e-6)
    assert np.abs(short[encoder_window] - full[encoder_window]).max() > 1e-3

    short_decoder = Oracle(make_tiny(tmp_path / "dec", decoder_window=decoder_window))
    prompt = oracle.stages(speech)["input_ids"].tolist()
    full, short = oracle.forward_logits(speech, prompt), short_decoder.forward_logits(speech, prompt)
    # The first keys are BOS and silence, so dropping one moves the logits only a little; compare
    # against the float noise of the rows the window cannot affect.
    noise = np.abs(short[:decoder_window] - full[:decoder_window]).max()
    assert noise < 1e-5
    assert np.abs(short[decoder_window] - full[decoder_window]).max() > 10 * noise + 1e-5
