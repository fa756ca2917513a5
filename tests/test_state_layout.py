"""The per-stream device state (voxc.artifact.state_layout): the KV caches are one pool of pages per
layer, so at the full model's size no state tensor comes near the buffer limits of WebGPU and Vulkan (all
computed from the contract, nothing allocated); the manifest's state section describes the pages; and
old artifacts are refused with one line."""
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
    # one decoder layer: 2 x 8192 x 8 x 128 x 2 B = 32 MiB a stream at most (128 pages of 64 rows)
    assert layout["dec_cache"].tensor_bytes("float16") == 32 << 20
    assert layout["dec_cache"].page_bytes("float16") == 256 << 10


def test_full_size_pages():
    """64-row pages: the decoder's 8192-row window in 128 pages, the encoder's 750 rows in 12 (the last
    one of 46 rows); a 60 s stream's decoder positions (750 tokens + the 39-token prompt) in 13 pages."""
    cfg = ModelConfig()
    layout = artifact.state_layout(cfg)
    enc, dec = layout["enc_cache"], layout["dec_cache"]
    assert (enc.page_rows, enc.pages_per_stream, enc.window) == (64, 12, 750)
    assert (dec.page_rows, dec.pages_per_stream, dec.window) == (64, 128, 8192)
    assert layout["enc_pages"].shape == (None, 12) and layout["enc_pages"].dtype == "int32"
    assert layout["dec_pages"].shape == (None, 128) and enc.page_table == "enc_pages" and dec.page_table == "dec_pages"
    assert -(-(750 + 39) // dec.page_rows) == 13
    # the first 4 s: 200 encoder rows in 4 pages, 50 decoder rows in 1
    assert (enc.initial_pages_per_stream, dec.initial_pages_per_stream) == (4, 1)
    # 256 streams of 60 s in float16: the encoder's whole windows and 13 decoder pages each
    per_stream = 12 * enc.page_bytes("float16") * enc.layers + 13 * dec.page_bytes("float16") * dec.layers
    assert 256 * per_stream < 76e9, per_stream


@pytest.mark.parametrize("window,rows,pages", [(1, 1, 1), (3, 3, 1), (64, 64, 1), (65, 64, 2), (100, 64, 2),
                                               (8192, 64, 128)])
def test_page_rows_for_any_window(window, rows, pages):
    assert artifact.kv_page_rows(window) == rows and artifact.kv_pages_per_stream(window) == pages


def test_caches_are_per_layer_and_the_manifest_section_adds_up():
    cfg = ModelConfig()
    layout = artifact.state_layout(cfg)
    assert layout["enc_cache"].layers == cfg.encoder.n_layers and layout["dec_cache"].layers == cfg.decoder.n_layers
    section = artifact.state_section(cfg, "float32")
    assert list(section) == list(layout)
    for name, entry in section.items():
        assert entry["bytes_per_stream"] == (entry["layers"] or 1) * entry["tensor_bytes_per_stream"], name
        if entry["axis"] == "pages":
            assert entry["tensor_bytes_per_stream"] == entry["pages_per_stream"] * entry["tensor_bytes_per_page"]
            assert entry["bytes_per_page"] == entry["layers"] * entry["tensor_bytes_per_page"]
            assert entry["shape"][0] is None and entry["shape"][2] == entry["page_rows"]
            table = section[entry["page_table"]]
            assert table["dtype"] == "int32" and table["shape"] == [None, entry["pages_per_stream"]]
        else:
            assert entry["axis"] == "slots" and "page_rows" not in entry
    assert {k for k, v in section.items() if v["axis"] == "pages"} == {"enc_cache", "dec_cache"}
    assert artifact.state_bytes_per_stream(cfg, "float32") == {k: v["bytes_per_stream"] for k, v in section.items()}


def test_the_graph_takes_each_layer_cache_as_a_tuple_element():
    from voxc.model.graph import VoxtralGraph

    cfg = ModelConfig.tiny()
    specs = VoxtralGraph(cfg).export_spec()
    assert len(specs["encode"]["enc_cache"]) == cfg.encoder.n_layers
    assert len(specs["decode"]["dec_cache"]) == cfg.decoder.n_layers
    # each layer's pool has its own page count (a growth that stops part-way leaves a valid state)
    for i, layer in enumerate(specs["decode"]["dec_cache"]):
        assert list(layer.shape) == \
            [f"dec_cache_pages_{i}" if d is None else d for d in artifact.state_layout(cfg)["dec_cache"].shape]
    assert list(specs["decode"]["dec_pages"].shape) == ["n_slots", artifact.kv_pages_per_stream(cfg.decoder.sliding_window)]
    assert specs["decode"]["dec_pages"].dtype == "int32" and "enc_pages" in specs["encode"]


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
