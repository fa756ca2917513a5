"""The per-stream device state (voxc.artifact.state_layout): the KV caches are one tensor per layer,
so at the full model's size no state tensor comes near the buffer limits of WebGPU and Vulkan (all
computed from the contract, nothing allocated); and old artifacts are refused with one line."""
from __future__ import annotations

import json

import pytest

from voxc import artifact
from voxc.config import ModelConfig
from voxc.errors import VoxcError

# NVIDIA's Vulkan driver: maxStorageBufferBindingSize (the kernels bind each state tensor whole)
VULKAN_BINDING_LIMIT = 2_147_483_644


def test_full_size_state_has_no_tensor_over_2_gib_for_8_streams_in_float16():
    layout = artifact.state_layout(ModelConfig())
    largest = max(entry.tensor_bytes("float16", streams=8) for entry in layout.values())
    assert largest <= VULKAN_BINDING_LIMIT, largest
    # one decoder layer: 2 x 8192 x 8 x 128 x 2 B = 32 MiB a stream
    assert layout["dec_cache"].tensor_bytes("float16") == 32 << 20


def test_caches_are_per_layer_and_the_manifest_section_adds_up():
    cfg = ModelConfig()
    layout = artifact.state_layout(cfg)
    assert layout["enc_cache"].layers == cfg.encoder.n_layers and layout["dec_cache"].layers == cfg.decoder.n_layers
    section = artifact.state_section(cfg, "float32")
    assert list(section) == list(layout)
    for name, entry in section.items():
        assert entry["bytes_per_stream"] == (entry["layers"] or 1) * entry["tensor_bytes_per_stream"], name
    assert artifact.state_bytes_per_stream(cfg, "float32") == {k: v["bytes_per_stream"] for k, v in section.items()}


def test_the_graph_takes_each_layer_cache_as_a_tuple_element():
    from voxc.model.graph import VoxtralGraph

    cfg = ModelConfig.tiny()
    specs = VoxtralGraph(cfg).export_spec()
    assert len(specs["encode"]["enc_cache"]) == cfg.encoder.n_layers
    assert len(specs["decode"]["dec_cache"]) == cfg.decoder.n_layers
    assert list(specs["decode"]["dec_cache"][0].shape) == \
        ["n_slots" if d is None else d for d in artifact.state_layout(cfg)["dec_cache"].shape]


def test_an_artifact_of_the_previous_format_asks_for_a_rebuild(tmp_path):
    manifest = artifact.seal({"format": artifact.FORMAT_VERSION - 1})
    (tmp_path / artifact.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VoxcError) as err:
        artifact.read_manifest(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "rebuild" in message and f"format {artifact.FORMAT_VERSION - 1}" in message


def test_a_cuda_graph_capture_keys_on_every_layer_cache_tensor():
    """A captured step replays at the addresses of its capture: a per-layer cache (a list) counts
    with each of its tensors, so a reallocated layer forces a new capture."""
    from voxc.runtime.cuda_graph import _addresses

    class Tensor:
        def __init__(self, address):
            self.address = address

        def data_ptr(self):
            return self.address

    token, ring = Tensor(1), Tensor(2)
    layers = [Tensor(10), Tensor(11), Tensor(12)]
    assert _addresses([token, layers, ring]) == [1, 10, 11, 12, 2]
    moved = [layers[0], Tensor(99), layers[2]]
    assert _addresses([token, moved, ring]) != _addresses([token, layers, ring])
