"""`voxc quantize`: an official (or transformers-layout) checkpoint -> voxc's quantized GGUF."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

DEFAULT_QTYPE = "q4_k"   # least error at 4.5 bits/weight (tests/test_quant.py measures it against Q4_0)


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write a quantized GGUF (Q4_K, Q4_0 or Q8_0) from a checkpoint",
        description="Quantize a checkpoint's projections and embedding table into voxc's GGUF file "
                    "(norms and biases stay float32, convs float16). The file carries the model config, the "
                    "tokenizer and the left-padding setting (76 silence tokens for Q4_0, which needs them; "
                    "32 otherwise). Build it with `voxc build FILE.gguf --target ...`.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (official Mistral or transformers layout)")
    p.add_argument("output", type=Path, help="the .gguf file to write")
    p.add_argument("--type", "-t", dest="qtype", choices=["q4_k", "q4_0", "q8_0"], default=DEFAULT_QTYPE,
                   help=f"quantization type (default {DEFAULT_QTYPE})")
    p.add_argument("--left-pad-tokens", type=int, default=None, help="override the recorded left padding")
    p.add_argument("--strict-quantization", action="store_true",
                   help="fail when a weight's rows do not fit the requested type's blocks instead of storing it as "
                        "Q8_0 or F16 (the table printed says which weights those are)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=run)


class LazyTensors(Mapping):
    """The checkpoint as a mapping read one tensor at a time (the GGUF writer walks it twice)."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __getitem__(self, name):
        return self.checkpoint.get(name)

    def __iter__(self):
        return iter(self.checkpoint.names())

    def __len__(self):
        return len(self.checkpoint)


def run(args) -> int:
    from voxc.artifact import check_left_pad_tokens
    from voxc.errors import VoxcError
    from voxc.loader.safetensors_loader import load_checkpoint
    from voxc.quant import print_storage_table
    from voxc.quant.gguf_writer import storage_plan, write_voxc_gguf
    from voxc.tokenizer import Tokenizer

    if args.output.suffix != ".gguf":
        raise VoxcError(f"{args.output}: the output file must end in .gguf")
    if args.output.is_dir():
        raise VoxcError(f"{args.output} is a directory; give the .gguf file to write")
    if args.output.exists() and not args.force:
        raise VoxcError(f"{args.output} exists; pass --force to replace it")
    if args.left_pad_tokens is not None:
        check_left_pad_tokens(args.left_pad_tokens)
    ckpt = load_checkpoint(args.checkpoint, progress=sys.stderr.isatty())
    if ckpt.tokenizer_path is None:
        raise VoxcError(f"{args.checkpoint}: no tekken.json next to the weights")
    Tokenizer(ckpt.tokenizer_path)   # a broken tokenizer fails now, not after the whole file is written
    plan = storage_plan(ckpt.config, args.qtype)
    odd = [c for c in plan if c.reason]
    if args.strict_quantization and odd:
        raise VoxcError(f"{odd[0].name} cannot be stored as {odd[0].requested}: {odd[0].reason} "
                        f"({len(odd)} such weights; without --strict-quantization they are stored as Q8_0 or F16)")
    print_storage_table(plan, args.qtype)
    print(f"quantizing {len(ckpt)} tensors to {args.qtype} ...", file=sys.stderr)
    plan = write_voxc_gguf(LazyTensors(ckpt), ckpt.config, Path(ckpt.tokenizer_path).read_bytes(), args.output,
                           args.qtype, left_pad_tokens=args.left_pad_tokens)
    kinds = sorted({kind for kind in plan.values()})
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB; tensor types: {', '.join(kinds)})")
    return 0
