"""`voxc build` from the transformers.js ONNX export (voxc.loader.onnx).

The exports here are written with the onnx package from the tiny checkpoint's weights, in the
layout of onnx-community/Voxtral-Mini-4B-Realtime-2602-ONNX: config.json and tekken.json at the
root, onnx/{audio_encoder,embed_tokens,decoder_model_merged}<suffix>.onnx with external data
(.onnx_data, and an .onnx_data_1 chunk), q/k rows in transformers' split-half RoPE order, the
480 ms delay folded into a constant after each post-attention norm, and two naming styles: the
torch exporter's (fp32/fp16: MatMul on transposed initializers named onnx::MatMul_N, decomposed
RMSNorm, bias Adds) and ONNX Runtime's builder's (q4/q4f16: com.microsoft MatMulNBits with zero
points, GatherBlockQuantized, SimplifiedLayerNormalization, GroupQueryAttention).

fp32 is checked against transformers on the same weights; q4f16 against a float build of the
weights its 4-bit blocks dequantize to; q4 (f32 scales) and fp16 at the loader.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import convert_model_to_external_data, set_external_data  # noqa: E402

import voxc  # noqa: E402
from voxc.build import build  # noqa: E402
from voxc.config import ModelConfig  # noqa: E402
from voxc.errors import VoxcError  # noqa: E402
from voxc.loader import hf  # noqa: E402
from voxc.loader.names import rope_rows  # noqa: E402
from voxc.loader.onnx import read_onnx_export, role  # noqa: E402
from voxc.loader.safetensors_loader import load_checkpoint  # noqa: E402
from voxc.loader.source import WeightSource  # noqa: E402
from voxc.loader.tiny import TinyScales, make_tiny, write_checkpoint  # noqa: E402
from voxc.quant.formats import QuantTensor  # noqa: E402

from clips import sine_with_noise  # noqa: E402
from references import run_stream  # noqa: E402

SUFFIX = {"fp32": "", "fp16": "_fp16", "q4": "_q4", "q4f16": "_q4f16"}
DELAY_TOKENS = 6


# ---- the exporter ---------------------------------------------------------------------------------
def quantize_4bit(w: np.ndarray, f16: bool, block: int = 32):
    """MatMulNBits' asymmetric round-to-nearest (as onnxruntime's quantizer: the range includes 0):
    codes [N, kb*block], scales [N, kb], zero points [N, kb]; rows padded to whole blocks."""
    n, k = w.shape
    kb = -(-k // block)
    x = np.zeros((n, kb * block), np.float32)
    x[:, :k] = w
    x = x.reshape(n, kb, block)
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    scales = ((hi - lo) / 15).astype(np.float16 if f16 else np.float32)
    s = scales.astype(np.float32)
    s_safe = np.where(s == 0, 1, s)
    zeros = np.clip(np.round(-lo / s_safe), 0, 15).astype(np.uint8)
    codes = np.clip(np.round(x / s_safe[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    return codes.reshape(n, kb * block), scales, zeros


def dequantize_4bit(codes, scales, zeros, k: int, block: int = 32) -> np.ndarray:
    n = codes.shape[0]
    q = codes.reshape(n, -1, block).astype(np.float32) - zeros[..., None]
    return (q * scales.astype(np.float32)[..., None]).reshape(n, -1)[:, :k]


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values [..., m] -> bytes [..., ceil(m/2)], element 2i in the low nibble."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def time_scales(weights: dict, cfg: ModelConfig, delay_tokens: int = DELAY_TOKENS) -> dict[int, np.ndarray]:
    """Per decoder layer, 1 + ada_rms_norm(t_cond): what the export folds into a constant (transformers'
    VoxtralRealtimeTimeEmbedding and TextAdaRmsNorm in float32, exact-erf GELU)."""
    half = cfg.decoder.dim // 2
    inv_freq = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
    emb = np.float32(delay_tokens) * inv_freq
    t_cond = np.concatenate([np.cos(emb), np.sin(emb)]).astype(np.float32)
    erf = np.vectorize(math.erf)
    out = {}
    for i in range(cfg.decoder.n_layers):
        h = weights[f"dec.layers.{i}.ada_norm.w_in.weight"] @ t_cond
        h = (0.5 * h * (1 + erf(h / math.sqrt(2)))).astype(np.float32)
        out[i] = (1 + weights[f"dec.layers.{i}.ada_norm.w_out.weight"] @ h).astype(np.float32)
    return out


class Graph:
    """One graph file being written: nodes, initializers, I/O, and the float32 values its weights
    represent (``represented``: voxc name -> official-order array) for the reference checkpoints."""

    def __init__(self, kind: str, variant: str, cfg: ModelConfig):
        self.kind, self.variant, self.cfg = kind, variant, cfg
        self.q4, self.f16 = variant in ("q4", "q4f16"), variant in ("fp16", "q4f16")
        self.float_type = TensorProto.FLOAT16 if self.f16 else TensorProto.FLOAT
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.ids = itertools.count(100)
        self.represented: dict[str, np.ndarray] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def floats(self, name: str, array: np.ndarray, voxc_name: str | None = None) -> str:
        """A float tensor in the variant's float type; records what it represents."""
        stored = np.asarray(array, np.float16 if self.f16 else np.float32)
        if voxc_name:
            self.represented[voxc_name] = stored.astype(np.float32)
        return self.init(name, stored)

    def node(self, op: str, inputs, outputs, name: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))
        return outputs[0]

    def out(self, path: str) -> str:
        return f"{path}_output_{next(self.ids)}"

    def input(self, name: str, shape, elem=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, shape, elem=TensorProto.FLOAT) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    # -- layers --
    def linear(self, x: str, path: str, init_base: str, voxc_name: str, w: np.ndarray, bias=None, *,
               permute_heads: int | None = None, anonymous: bool = False, flat_scales: bool = False) -> str:
        """x @ w.T (+ bias): MatMulNBits (q4*) or MatMul on the transposed weight (fp*).  ``w`` is in
        official order; q/k rows are stored permuted to split-half as transformers has them."""
        stored = hf.interleaved_to_split_half(w, permute_heads) if permute_heads else w
        n, k = w.shape
        y = self.out(path + "/MatMul")
        if self.q4:
            codes, scales, zeros = quantize_4bit(stored, self.f16)
            self.represented[voxc_name] = dequantize_4bit(*quantize_4bit(w, self.f16), k)
            kb = scales.shape[1]
            b = self.init(init_base + ".MatMul.weight_Q4", pack_nibbles(codes.reshape(n, kb, 32)))
            s = self.init(init_base + ".MatMul.weight_scales", scales.reshape(-1) if flat_scales else scales)
            z = self.init(init_base + ".MatMul.weight_zero_points", pack_nibbles(zeros))
            self.node("MatMulNBits", [x, b, s, z], [y], "MatMulNBits_" + str(next(self.ids)) if anonymous
                      else path + "/MatMul_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                      accuracy_level=4)
        else:
            self.represented[voxc_name] = np.asarray(w, np.float16 if self.f16 else np.float32).astype(np.float32)
            wt = self.init(f"onnx::MatMul_{next(self.ids)}",
                           np.asarray(stored.T, np.float16 if self.f16 else np.float32))
            self.node("MatMul", [x, wt], [y], path + "/MatMul")
        if bias is not None:
            stored_b = hf.interleaved_to_split_half(bias, permute_heads) if permute_heads else bias
            bname = voxc_name[:-len("weight")] + "bias"
            self.floats(init_base + ".bias", stored_b)
            self.represented[bname] = np.asarray(bias, np.float16 if self.f16 else np.float32).astype(np.float32)
            y = self.node("Add", [y, init_base + ".bias"], [self.out(path + "/Add")], path + "/Add")
        return y

    def rms_norm(self, x: str, path: str, init_name: str, voxc_name: str, w: np.ndarray, *, skip: str | None = None,
                 ) -> str:
        """The builder's (Skip)SimplifiedLayerNormalization, or the torch exporter's decomposed norm."""
        weight = self.floats(init_name, w, voxc_name)
        eps = self.cfg.decoder.norm_eps
        if self.q4:
            if skip is not None:
                out = self.out(path)
                self.node("SkipSimplifiedLayerNormalization", [x, skip, weight], [out, "", "", self.out(path + "_sum")],
                          path + "/SkipSimplifiedLayerNorm", domain="com.microsoft", epsilon=eps)
                return out
            return self.node("SimplifiedLayerNormalization", [x, weight], [self.out(path)],
                             path + "/SimplifiedLayerNorm", axis=-1, epsilon=eps)
        if skip is not None:
            parent = path.rsplit("/", 1)[0]
            x = self.node("Add", [x, skip], [self.out(parent + "/Add")], parent + "/Add")
        sq = self.node("Mul", [x, x], [self.out(path + "/Pow")], path + "/Pow")
        mean = self.node("ReduceMean", [sq], [self.out(path + "/ReduceMean")], path + "/ReduceMean", axes=[-1])
        eps_name = self.init(path[1:].replace("/", ".") + ".eps", np.array(eps, np.float32))
        r = self.node("Add", [mean, eps_name], [self.out(path + "/Add")], path + "/Add")
        r = self.node("Sqrt", [r], [self.out(path + "/Sqrt")], path + "/Sqrt")
        r = self.node("Reciprocal", [r], [self.out(path + "/Reciprocal")], path + "/Reciprocal")
        n = self.node("Mul", [x, r], [self.out(path + "/Mul")], path + "/Mul")
        return self.node("Mul", [weight, n], [self.out(path + "/Mul_1")], path + "/Mul_1")

    def save(self, directory: Path, stem: str, *, chunk: set[str] = frozenset(), opset: int = 17) -> None:
        graph = helper.make_graph(self.nodes, stem, self.inputs, self.outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", opset),
                                                        helper.make_operatorsetid("com.microsoft", 1)])
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=stem + ".onnx_data",
                                       size_threshold=64)
        for t in model.graph.initializer:
            if t.name in chunk:                 # a second data file, as transformers.js splits large graphs
                set_external_data(t, location=stem + ".onnx_data_1")
        onnx.save_model(model, str(directory / f"{stem}.onnx"))


def export_onnx(out: Path, weights: dict, cfg: ModelConfig, variant: str, tekken: Path, *,
                drop: str | None = None, interleaved_rope: bool = False, keep_ada: bool = False) -> dict:
    """Write a transformers.js-style export of ``weights`` (voxc names, official order) into ``out``;
    returns what its weights represent (voxc names, official order, float32).  ``drop``: leave out the
    node of that projection (a broken export); ``interleaved_rope``: store q/k rows in official order
    and mark the graphs' RoPE interleaved; ``keep_ada``: keep the ada-norm linears instead of folding."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx").mkdir(exist_ok=True)
    config = hf.hf_config_dict(cfg)
    config["transformers.js_config"] = {"use_external_data_format": {"decoder_model_merged": 1}}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(tekken, out / "tekken.json")
    builder = variant.startswith("q4")
    e, d = cfg.encoder, cfg.decoder
    represented = {}
    suffix = SUFFIX[variant]

    # -- audio_encoder: conv stem, layers, norm, adapter --
    g = Graph("audio_encoder", variant, cfg)
    x = g.input("input_features", [1, e.num_mel_bins, "T"])
    for j in (0, 1):
        conv = f"/audio_tower/embedder/conv{j + 1}"
        w = g.floats(f"audio_tower.embedder.conv{j + 1}.weight", weights[f"enc.conv{j}.weight"], f"enc.conv{j}.weight")
        b = g.floats(f"audio_tower.embedder.conv{j + 1}.bias", weights[f"enc.conv{j}.bias"], f"enc.conv{j}.bias")
        x = g.node("Conv", [x, w, b], [g.out(conv + "/Conv")], conv + "/Conv", strides=[j + 1])
        x = g.node("Gelu", [x], [g.out(conv + "/Gelu")], conv + "/Gelu", domain="com.microsoft")
    x = g.node("Transpose", [x], [g.out("/audio_tower/Transpose")], "/audio_tower/Transpose", perm=[0, 2, 1])
    for i in range(e.n_layers):
        p, ip, v = f"/audio_tower/layers.{i}", f"audio_tower.layers.{i}", f"enc.layers.{i}."
        h = g.rms_norm(x, p + "/self_attn_layer_norm", ip + ".self_attn_layer_norm.weight", v + "attention_norm.weight",
                       weights[v + "attention_norm.weight"])
        qkv = []
        for proj in "qkv":
            name = v + f"attention.w{proj}.weight"
            qkv.append(g.linear(h, f"{p}/self_attn/{proj}_proj", f"{ip}.self_attn.{proj}_proj", name, weights[name],
                                weights.get(v + f"attention.w{proj}.bias"), flat_scales=proj == "v",
                                permute_heads=None if interleaved_rope else rope_rows(name, cfg)))
        attn = _attention(g, qkv, p, e.n_heads, e.n_heads, e.sliding_window, builder, interleaved_rope)
        o = g.linear(attn, f"{p}/self_attn/o_proj", f"{ip}.self_attn.o_proj", v + "attention.wo.weight",
                     weights[v + "attention.wo.weight"], weights[v + "attention.wo.bias"])
        h = g.rms_norm(o, p + "/final_layer_norm", ip + ".final_layer_norm.weight", v + "ffn_norm.weight",
                       weights[v + "ffn_norm.weight"], skip=x)
        x = _swiglu(g, h, p, ip, v, weights, h)
    x = g.rms_norm(x, "/audio_tower/norm", "audio_tower.norm.weight", "enc.norm.weight", weights["enc.norm.weight"])
    x = g.node("Reshape", [x, g.init("/audio_tower/Reshape_shape", np.array([1, -1, 4 * e.dim], np.int64))],
               [g.out("/Reshape")], "/Reshape")
    x = g.linear(x, "/multi_modal_projector/linear_1", "multi_modal_projector.linear_1", "adapter.w_in.weight",
                 weights["adapter.w_in.weight"])
    x = g.node("Gelu", [x], [g.out("/multi_modal_projector/act")], "/multi_modal_projector/act/Gelu",
               domain="com.microsoft")
    x = g.linear(x, "/multi_modal_projector/linear_2", "multi_modal_projector.linear_2", "adapter.w_out.weight",
                 weights["adapter.w_out.weight"])
    g.nodes.append(helper.make_node("Identity", [x], ["audio_embeds"], name="/Identity"))
    g.output("audio_embeds", [1, "N", d.dim])
    g.save(out / "onnx", "audio_encoder" + suffix)
    represented.update(g.represented)

    # -- embed_tokens: the table, 4-bit through GatherBlockQuantized --
    g = Graph("embed_tokens", variant, cfg)
    ids = g.input("input_ids", [1, "L"], TensorProto.INT64)
    table = weights["tok_embeddings.weight"]
    if g.q4:
        codes, scales, zeros = quantize_4bit(table, g.f16)
        represented["tok_embeddings.weight"] = dequantize_4bit(codes, scales, zeros, d.dim)
        if g.f16:    # uint8 packed two to a byte (MatMulNBits' convention)
            data = g.init("model.embed_tokens.weight_Q4", pack_nibbles(codes[:, :d.dim]))
            zp = g.init("model.embed_tokens.weight_zero_points", pack_nibbles(zeros))
            s = g.init("model.embed_tokens.weight_scales", scales)
            g.node("GatherBlockQuantized", [data, ids, s, zp], ["inputs_embeds"],
                   "/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", gather_axis=0,
                   quantize_axis=1, block_size=32, bits=4)
        else:        # Gather of a blocked DequantizeLinear of uint4 tensors (codes raw and external, zero
            _uint4_inits(g, codes[:, :d.dim], zeros)        # points inline in int32_data)
            s = g.init("model.embed_tokens.weight_scales", scales)
            table_out = g.node("DequantizeLinear", ["model.embed_tokens.weight_Q4", s,
                                                    "model.embed_tokens.weight_zero_points"],
                               [g.out("/model/embed_tokens/DequantizeLinear")], "/model/embed_tokens/DequantizeLinear",
                               axis=1, block_size=32)
            g.node("Gather", [table_out, ids], ["inputs_embeds"], "/model/embed_tokens/Gather")
    else:
        w = g.floats("model.language_model.embed_tokens.weight", table, "tok_embeddings.weight")
        g.node("Gather", [w, ids], ["inputs_embeds"], "/model/language_model/embed_tokens/Gather")
    represented.update(g.represented)
    g.output("inputs_embeds", [1, "L", d.dim])
    g.save(out / "onnx", "embed_tokens" + suffix, opset=21)

    # -- decoder_model_merged: layers (delay folded), final norm, lm_head --
    g = Graph("decoder_model_merged", variant, cfg)
    x = g.input("inputs_embeds", [1, "L", d.dim])
    scales = time_scales(weights, cfg)
    model_path = "/model" if builder else "/model/language_model"
    init_prefix = "model" if builder else "model.language_model"
    for i in range(d.n_layers):
        p, ip, v = f"{model_path}/layers.{i}", f"{init_prefix}.layers.{i}", f"dec.layers.{i}."
        attn_mod = "attn" if builder else "self_attn"
        h = g.rms_norm(x, p + "/input_layernorm", ip + ".input_layernorm.weight", v + "attention_norm.weight",
                       weights[v + "attention_norm.weight"])
        qkv = []
        for proj in "qkv":
            name = v + f"attention.w{proj}.weight"
            if drop == name:
                qkv.append(h)
                continue
            qkv.append(g.linear(h, f"{p}/{attn_mod}/{proj}_proj", f"{ip}.{attn_mod}.{proj}_proj", name, weights[name],
                                permute_heads=None if interleaved_rope else rope_rows(name, cfg)))
        attn = _attention(g, qkv, p, d.n_heads, d.n_kv_heads, d.sliding_window, builder, interleaved_rope)
        o = g.linear(attn, f"{p}/{attn_mod}/o_proj", f"{ip}.{attn_mod}.o_proj", v + "attention.wo.weight",
                     weights[v + "attention.wo.weight"])
        h = g.rms_norm(o, p + "/post_attention_layernorm", ip + ".post_attention_layernorm.weight",
                       v + "ffn_norm.weight", weights[v + "ffn_norm.weight"], skip=x)
        if keep_ada:      # the delay MLP on a constant t_cond (an export without constant folding)
            t = g.init(f"{p}/t_cond", np.ones((1, d.dim), np.float32))
            a = g.linear(t, f"{p}/ada_rms_norm/linear1", f"{ip}.ada_rms_norm.linear1", v + "ada_norm.w_in.weight",
                         weights[v + "ada_norm.w_in.weight"])
            a = g.linear(a, f"{p}/ada_rms_norm/linear2", f"{ip}.ada_rms_norm.linear2", v + "ada_norm.w_out.weight",
                         weights[v + "ada_norm.w_out.weight"])
            h = g.node("Mul", [h, a], [g.out(p + "/Mul")], p + "/Mul")
        elif builder:     # the folded constant 1 + ada(t_cond) as an initializer
            stored = np.asarray(scales[i], np.float16 if g.f16 else np.float32)
            effective = stored.astype(np.float32)
            h = g.node("Mul", [h, g.init(p + "/Add_output_0", stored)], [g.out(p + "/Mul")], p + "/Mul")
        else:             # torch's folding: Add(1, Constant ada(t_cond)) in front of the Mul
            stored = np.asarray(scales[i] - 1, np.float16 if g.f16 else np.float32)
            effective = np.float32(1) + stored.astype(np.float32)
            const = g.out(p + "/Constant")
            g.node("Constant", [], [const], p + "/Constant",
                   value=numpy_helper.from_array(stored.reshape(1, 1, -1), const))
            one = g.floats(p + ".one", np.array(1.0))
            c = g.node("Add", [one, const], [g.out(p + "/Add_1")], p + "/Add_1")
            h = g.node("Mul", [h, c], [g.out(p + "/Mul")], p + "/Mul")
        if not keep_ada:       # what voxc computes: the constant folded into the norm, the MLP zero
            ffn = v + "ffn_norm.weight"
            g.represented[ffn] = g.represented[ffn] * effective
            for w in ("w_in", "w_out"):
                name = v + f"ada_norm.{w}.weight"
                g.represented[name] = np.zeros_like(weights[name])
        x = _swiglu(g, h, p, ip, v, weights, h, anonymous_up=(i == 1 and builder), drop=drop)
    if builder:
        x = g.rms_norm(x, f"/model/layers.{d.n_layers}/final_norm_layernorm",
                       f"model.layers.{d.n_layers}.final_norm_layernorm.weight", "dec.norm.weight",
                       weights["dec.norm.weight"])
    else:
        x = g.rms_norm(x, "/model/language_model/norm", "model.language_model.norm.weight", "dec.norm.weight",
                       weights["dec.norm.weight"])
    head = dict(g.represented)
    g.linear(x, "/lm_head", "lm_head", "lm_head.weight", table)
    g.nodes[-1].output[0] = "logits"
    g.represented = head
    g.output("logits", [1, "L", d.vocab_size])
    chunk = set(g.nodes[-1].input[1:]) if variant in ("q4", "fp16") else set()   # lm_head in .onnx_data_1
    g.save(out / "onnx", "decoder_model_merged" + suffix, chunk=chunk)
    represented.update(g.represented)
    return represented


def _uint4_inits(g: Graph, codes: np.ndarray, zeros: np.ndarray, name: str = "model.embed_tokens.weight") -> None:
    """ONNX uint4 initializers ``<name>_Q4`` (raw packed bytes) and ``<name>_zero_points`` (int32_data)."""
    g.inits.append(helper.make_tensor(name + "_Q4", TensorProto.UINT4, codes.shape,
                                      pack_nibbles(codes.reshape(-1)).tobytes(), raw=True))
    g.inits.append(helper.make_tensor(name + "_zero_points", TensorProto.UINT4, zeros.shape, zeros.reshape(-1)))


def _attention(g: Graph, qkv, p, heads, kv_heads, window, builder, interleaved) -> str:
    if builder:
        outs = [g.out(p + "/attn/GQA"), f"present.{p}.key", f"present.{p}.value"]
        return g.node("GroupQueryAttention", qkv, outs, p + "/attn/GroupQueryAttention", domain="com.microsoft",
                      num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=int(interleaved),
                      local_window_size=window)
    s = g.node("Add", qkv[:2], [g.out(p + "/self_attn/Add")], p + "/self_attn/Add")
    return g.node("Mul", [s, qkv[2]], [g.out(p + "/self_attn/Mul")], p + "/self_attn/Mul")


def _swiglu(g: Graph, h, p, ip, v, weights, residual, *, anonymous_up=False, drop=None) -> str:
    gate = g.linear(h, p + "/mlp/gate_proj", ip + ".mlp.gate_proj", v + "feed_forward.w1.weight",
                    weights[v + "feed_forward.w1.weight"])
    up = h if drop == v + "feed_forward.w3.weight" else g.linear(
        h, p + "/mlp/up_proj", ip + ".mlp.up_proj", v + "feed_forward.w3.weight", weights[v + "feed_forward.w3.weight"],
        anonymous=anonymous_up)
    act = g.node("Sigmoid", [gate], [g.out(p + "/mlp/act_fn/Sigmoid")], p + "/mlp/act_fn/Sigmoid")
    act = g.node("Mul", [gate, act], [g.out(p + "/mlp/act_fn/Mul")], p + "/mlp/act_fn/Mul")
    act = g.node("Mul", [act, up], [g.out(p + "/mlp/Mul")], p + "/mlp/Mul")
    down = g.linear(act, p + "/mlp/down_proj", ip + ".mlp.down_proj", v + "feed_forward.w2.weight",
                    weights[v + "feed_forward.w2.weight"], weights.get(v + "feed_forward.w2.bias"))
    return g.node("Add", [residual, down], [g.out(p + "/Add")], p + "/Add")


# ---- fixtures ---------------------------------------------------------------------------------------
# The tiny model with full-size decoder layers: in the tests' usual one (VARIED) they are scaled by
# 0.1, so small that the logits hardly depend on them (nor on the delay conditioning in their norms).
DECODER_SENSITIVE = TinyScales(projector=10.0, decoder=1.0, special_rows=0.01, embedding_std=1.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny_onnx"), seed=3, scales=DECODER_SENSITIVE)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    ckpt = load_checkpoint(tiny_dir, progress=False)
    return dict(ckpt.tensors("float32", progress=False)), ckpt.config, tiny_dir / "tekken.json"


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    """transformers' model on the same weights (tests/oracle.py)."""
    from oracle import Oracle
    return Oracle(tiny_dir)


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """variant -> (export directory, the float32 weights it represents in voxc names)."""
    weights, cfg, tekken = tiny
    root = tmp_path_factory.mktemp("onnx_exports")
    return {v: (root / v, export_onnx(root / v, weights, cfg, v, tekken)) for v in SUFFIX}


def run(artifact_dir: Path, audio: np.ndarray, delay_ms=None):
    return run_stream(voxc.load(artifact_dir), audio, delay_ms=delay_ms)[1:]


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- builds -----------------------------------------------------------------------------------------
def test_fp32_export_builds_the_transformers_model_at_its_fixed_delay(exports, oracle, tmp_path, capsys):
    """The fp32 export (torch-exporter names, decomposed norms, delay folded as Add(1, Constant))
    builds into the model transformers computes at 480 ms, and the artifact refuses other delays."""
    export_dir, _ = exports["fp32"]
    build(export_dir, "llvm", tmp_path / "art", progress=True)
    err = capsys.readouterr().err
    assert "ONNX export (fp32)" in err and "delay fixed at 480 ms" in err and "lm_head identical" in err
    manifest = json.loads((tmp_path / "art" / "voxc-artifact.json").read_text())
    assert manifest["fixed_delay_ms"] == 480 and manifest["streaming"]["default_delay_ms"] == 480
    assert manifest["quantization"] is None

    audio = sine_with_noise(seconds=2.0)
    tokens, logits = run(tmp_path / "art", audio)          # the default delay is the fixed one
    ref_tokens, ref_logits = oracle.generate(audio, delay_tokens=DELAY_TOKENS)
    assert tokens.tolist() == ref_tokens.tolist()
    assert rel_err(logits, ref_logits) < 1e-4

    model = voxc.load(tmp_path / "art")
    with pytest.raises(VoxcError, match="only with a 480 ms delay, not 960 ms"):
        model.stream(delay_ms=960)
    with pytest.raises(VoxcError, match="only with a 480 ms delay"):
        model.transcribe(audio, delay_ms=80)
    model.stream(delay_ms=480)


def test_q4f16_export_builds_its_4bit_weights_exactly(exports, tiny, oracle, tmp_path, capsys):
    """MatMulNBits / GatherBlockQuantized weights with zero points become Q8_0 blocks holding exactly
    the values the export's blocks dequantize to: the build computes the same model as a float32 build
    of those values (rows of 48, not whole 32-blocks, are dequantized to float instead)."""
    export_dir, represented = exports["q4f16"]
    _, cfg, tekken = tiny
    build(export_dir, "llvm", tmp_path / "q4f16", progress=True)
    err = capsys.readouterr().err
    assert "kept as Q8_0 (exact: f16 scales)" in err and "dequantized to float32" in err
    assert "lm_head identical to the token table" in err
    manifest = json.loads((tmp_path / "q4f16" / "voxc-artifact.json").read_text())
    assert manifest["quantization"] == "q8_0" and manifest["fixed_delay_ms"] == 480
    # the encoder's rows of 32/64 and the adapter's 128 are Q8_0; the decoder's 48 are float
    params = {p["name"] for p in manifest["params"]}
    assert "enc.layers.0.attention.wqkv.qweight" in params and "adapter.w_in.qweight" in params
    assert "dec.layers.0.attention.wqkv.weight" in params and "dec.layers.0.feed_forward.w2.qweight" in params

    write_checkpoint(tmp_path / "reference", represented, cfg)
    build(tmp_path / "reference", "llvm", tmp_path / "ref", progress=False)
    audio = sine_with_noise(seconds=2.0)
    tokens, logits = run(tmp_path / "q4f16", audio)
    ref_tokens, ref_logits = run(tmp_path / "ref", audio, delay_ms=480)
    assert tokens.tolist() == ref_tokens.tolist()
    assert rel_err(logits, ref_logits) < 1e-5     # float rounding only (Q8_0 kernels sum in another order)

    # against the unquantized model: the export's own 4-bit rounding, measured (0.14 here)
    _, oracle_logits = oracle.generate(audio, delay_tokens=DELAY_TOKENS)
    n = min(len(logits), len(oracle_logits))
    drift = rel_err(logits[:n], oracle_logits[:n])
    print(f"q4f16 export vs transformers on the float weights: logits relative error {drift:.3f}")
    assert drift < 0.5


def test_q4_export_rounds_f32_scales_to_f16_and_reports_the_error(exports, tiny):
    """f32 scales (q4): Q8_0 blocks with the scales rounded to f16, the only change, measured."""
    export_dir, represented = exports["q4"]
    _, cfg, _ = tiny
    export = read_onnx_export(export_dir)
    assert export.variants == {g: "q4" for g in ("audio_encoder", "embed_tokens", "decoder_model_merged")}
    assert 0 < export.scale_error <= 2.0 ** -11
    assert f"max relative weight error {export.scale_error:.2e}" in export.summary
    worst = 0.0
    for name in ("enc.layers.1.attention.wq.weight", "enc.layers.0.attention.wk.weight", "adapter.w_in.weight",
                 "dec.layers.1.feed_forward.w2.weight"):
        value = export.get(name)
        assert isinstance(value, QuantTensor) and value.qtype.value == "q8_0"
        got, want = value.dequantize(), represented[name]
        assert np.all(np.abs(got - want) <= 2.0 ** -11 * np.abs(want) + 1e-12), name
        worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))))
    assert worst <= export.scale_error
    # the uint4 token table (rows of 48 -> dequantized float32, exact)
    np.testing.assert_array_equal(export.get("tok_embeddings.weight"), represented["tok_embeddings.weight"])
    np.testing.assert_array_equal(export.get("dec.layers.0.attention.wk.weight"),
                                  represented["dec.layers.0.attention.wk.weight"])


def test_fp16_export_reads_float16_weights_in_official_order(exports):
    export_dir, represented = exports["fp16"]
    source = WeightSource(export_dir, progress=False)
    assert source.quantization is None and source.fixed_delay_ms == 480
    for name, want in represented.items():
        got = source.get(name)
        assert isinstance(got, np.ndarray), name
        folded = name.startswith("dec.layers.") and ("ada_norm" in name or "ffn_norm" in name)
        assert got.dtype == (np.float32 if folded else np.float16), name
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=name)
    assert (export_dir / "onnx" / "decoder_model_merged_fp16.onnx_data_1").stat().st_size > 0


def test_roles_from_node_and_initializer_names():
    assert role("/model/layers.3/attn/q_proj/MatMul_Q4", "decoder_model_merged", 26) == "dec.layers.3.attention.wq"
    assert role("/model/language_model/layers.0/mlp/down_proj/MatMul", "decoder_model_merged", 26) \
        == "dec.layers.0.feed_forward.w2"
    assert role("model.layers.26.final_norm_layernorm.weight", "decoder_model_merged", 26) == "dec.norm"
    assert role("/model/language_model/norm/Mul_1", "decoder_model_merged", 26) == "dec.norm"
    assert role("/audio_tower/layers.5/final_layer_norm/Mul_1", "audio_encoder", 32) == "enc.layers.5.ffn_norm"
    assert role("audio_tower.layers.5.self_attn_layer_norm.weight", "audio_encoder", 32) \
        == "enc.layers.5.attention_norm"
    assert role("/audio_tower/embedder/conv2/Conv", "audio_encoder", 32) == "enc.conv1"
    assert role("/multi_modal_projector/linear_1/MatMul_Q4", "audio_encoder", 32) == "adapter.w_in"
    assert role("/model/layers.2/ada_rms_norm/linear2/MatMul", "decoder_model_merged", 26) \
        == "dec.layers.2.ada_norm.w_out"
    assert role("/lm_head/MatMul_Q4", "decoder_model_merged", 26) == "lm_head"
    assert role("MatMulNBits_17", "decoder_model_merged", 26) is None
    assert role("onnx::MatMul_1234", "decoder_model_merged", 26) is None


def test_interleaved_rope_and_kept_delay_mlp(tiny, tmp_path):
    """A graph whose rotary op is interleaved keeps its q/k rows; an export that still carries the
    ada-norm linears maps them and makes no fixed-delay model."""
    weights, cfg, tekken = tiny
    represented = export_onnx(tmp_path / "x", weights, cfg, "q4f16", tekken, interleaved_rope=True, keep_ada=True)
    export = read_onnx_export(tmp_path / "x")
    assert export.fixed_delay_ms is None and "every delay works" in export.summary
    for name in ("enc.layers.0.attention.wq.weight", "enc.layers.0.attention.wq.bias",
                 "dec.layers.1.attention.wk.weight", "dec.layers.0.ada_norm.w_in.weight",
                 "dec.layers.0.ffn_norm.weight"):
        value = export.get(name)
        value = value.dequantize() if isinstance(value, QuantTensor) else value
        np.testing.assert_array_equal(np.asarray(value, np.float32), represented[name], err_msg=name)


# ---- broken and ambiguous exports --------------------------------------------------------------------
def test_export_errors_name_what_is_missing(exports, tiny, tmp_path):
    weights, cfg, tekken = tiny
    good, _ = exports["q4f16"]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    broken = copy("no_embed")
    (broken / "onnx" / "embed_tokens_q4f16.onnx").unlink()
    with pytest.raises(VoxcError, match="no graph file for embed_tokens"):
        WeightSource(broken, progress=False)

    broken = copy("no_data")
    (broken / "onnx" / "decoder_model_merged_q4f16.onnx_data").unlink()
    with pytest.raises(VoxcError, match=r"decoder_model_merged_q4f16.onnx_data is missing"):
        WeightSource(broken, progress=False)

    broken = copy("truncated")
    data = broken / "onnx" / "audio_encoder_q4f16.onnx_data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(VoxcError, match=r"audio_encoder_q4f16.onnx: initializer .* needs bytes .*truncated download"):
        WeightSource(broken, progress=False)

    export_onnx(tmp_path / "no_v", weights, cfg, "q4f16", tekken, drop="dec.layers.1.attention.wv.weight")
    with pytest.raises(VoxcError, match=r"lacks 1 weight\(s\).*dec\.layers\.1\.attention\.wv\.weight "
                                        r"\(decoder_model_merged: layers\.1\.self_attn\.v_proj\.weight\)"):
        WeightSource(tmp_path / "no_v", progress=False)

    export_onnx(tmp_path / "no_up", weights, cfg, "fp32", tekken, drop="dec.layers.0.feed_forward.w3.weight")
    with pytest.raises(VoxcError, match=r"dec\.layers\.0\.feed_forward\.w3\.weight"):
        WeightSource(tmp_path / "no_up", progress=False)

    wrong = copy("wrong_config")
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(VoxcError, match=r"gate_proj/MatMul_Q4 \(dec\.layers\.0\.feed_forward\.w1\.weight\) has "
                                        r"shape \[96, 48\], but config.json needs \[64, 48\]"):
        WeightSource(wrong, progress=False)

    q8 = copy("q8_only")
    for f in (q8 / "onnx").glob("*_q4f16.onnx"):
        f.rename(f.with_name(f.name.replace("_q4f16", "_quantized")))
    with pytest.raises(VoxcError, match="exists only as q8; voxc reads the fp32, fp16, q4, q4f16 variants"):
        WeightSource(q8, progress=False)


def test_several_variants_need_a_choice(exports, tmp_path):
    both = Path(shutil.copytree(exports["q4f16"][0], tmp_path / "both"))
    for f in (exports["fp32"][0] / "onnx").iterdir():
        shutil.copy(f, both / "onnx")
    with pytest.raises(VoxcError, match=r"several variants \(fp32, q4f16\).*voxc build .*decoder_model_merged"):
        WeightSource(both, progress=False)
    source = WeightSource(both / "onnx" / "embed_tokens.onnx", progress=False)    # a file picks its variant
    assert source.quantization is None
    assert WeightSource(both / "onnx" / "decoder_model_merged_q4f16.onnx", progress=False).quantization == "q8_0"


# ---- the 4-bit layouts against onnxruntime's own kernels ------------------------------------------------
@pytest.mark.parametrize("variant", ["q4", "q4f16"])
def test_4bit_decoding_matches_onnxruntime(tmp_path, variant):
    """voxc reads 4-bit weights as onnxruntime computes with them: MatMulNBits on an identity input
    returns its weight (rows of 96 and of 48, padded to 2 blocks); GatherBlockQuantized (uint8-packed
    for q4f16, uint4 for q4) and a Gather of a blocked DequantizeLinear (uint4) of every index
    return the table."""
    ort = pytest.importorskip("onnxruntime")
    from voxc.loader.onnx import _DataFiles, _dequantize_linear, _gather_block_quantized, _Graph, _matmul_nbits

    cfg = ModelConfig.tiny()
    rng = np.random.default_rng(7)
    f16 = variant == "q4f16"
    act = np.float16 if f16 else np.float32
    for k in (96, 48):
        g = Graph("decoder_model_merged", variant, cfg)
        x = g.input("x", [k, k], TensorProto.FLOAT16 if f16 else TensorProto.FLOAT)
        w = (rng.standard_normal((40, k)) * 0.1).astype(np.float32)
        g.linear(x, "/model/layers.0/mlp/up_proj", "up", "dec.layers.0.feed_forward.w3.weight", w)
        g.nodes[-1].output[0] = "y"
        for a in g.nodes[-1].attribute:
            if a.name == "accuracy_level":
                a.i = 0                 # float math, not int8-quantized activations
        g.output("y", [k, 40], TensorProto.FLOAT16 if f16 else TensorProto.FLOAT)
        g.save(tmp_path, f"matmul_{k}_{variant}")
        y = ort.InferenceSession(str(tmp_path / f"matmul_{k}_{variant}.onnx"), providers=["CPUExecutionProvider"]) \
            .run(None, {"x": np.eye(k, dtype=act)})[0].T.astype(np.float32)
        graph = _Graph("decoder_model_merged", tmp_path / f"matmul_{k}_{variant}.onnx", _DataFiles(tmp_path))
        blocks, _ = _matmul_nbits(graph, graph.nodes[0])
        _check_against(blocks, y, f16)
        np.testing.assert_array_equal(blocks.dequantize(), g.represented["dec.layers.0.feed_forward.w3.weight"])

    codes, scales, zeros = quantize_4bit(rng.standard_normal((20, 64)).astype(np.float32), f16)
    for form in ("GatherBlockQuantized", "DequantizeLinear"):
        g = Graph("embed_tokens", variant, cfg)
        ids = g.input("input_ids", [20], TensorProto.INT64)
        if form == "DequantizeLinear":
            _uint4_inits(g, codes, zeros, "t")
            table = g.node("DequantizeLinear", ["t_Q4", g.init("t_scales", scales), "t_zero_points"], ["table"],
                           "/dq", axis=1, block_size=32)
            g.node("Gather", [table, ids], ["out"], "/gather")
        else:
            if f16:    # uint8, two codes a byte
                data, zp = g.init("t_Q4", pack_nibbles(codes)), g.init("t_zero_points", pack_nibbles(zeros))
            else:      # uint4
                _uint4_inits(g, codes, zeros, "t")
                data, zp = "t_Q4", "t_zero_points"
            g.node("GatherBlockQuantized", [data, ids, g.init("t_scales", scales), zp], ["out"], "/gbq",
                   domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=32, bits=4)
        g.output("out", [20, 64], TensorProto.FLOAT16 if f16 else TensorProto.FLOAT)
        g.save(tmp_path, f"{form}_{variant}", opset=21)
        table = ort.InferenceSession(str(tmp_path / f"{form}_{variant}.onnx"), providers=["CPUExecutionProvider"]) \
            .run(None, {"input_ids": np.arange(20, dtype=np.int64)})[0].astype(np.float32)
        graph = _Graph("embed_tokens", tmp_path / f"{form}_{variant}.onnx", _DataFiles(tmp_path))
        node = next(n for n in graph.nodes if n.op_type == form)
        _check_against((_gather_block_quantized if form == "GatherBlockQuantized" else _dequantize_linear)(graph, node),
                       table, f16)


def _check_against(blocks, expected: np.ndarray, f16: bool) -> None:
    """voxc's float decoding equals onnxruntime's (whose float16 output rounds it); its Q8_0 blocks hold
    the same values exactly with f16 scales, within the f16 rounding of f32 scales otherwise."""
    exact = blocks.dequantize()
    bound = 2.0 ** -11 * np.abs(expected)
    assert np.all(np.abs(exact - expected) <= bound) if f16 else np.array_equal(exact, expected)
    if blocks.fits_q8_0():
        q8 = blocks.to_q8_0().dequantize()
        assert np.array_equal(q8, exact) if f16 else np.all(np.abs(q8 - exact) <= 2.0 ** -11 * np.abs(exact))
