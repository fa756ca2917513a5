"""The ``voxc`` command line.  Every user error is printed as one line, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from voxc.errors import VoxcError

DEFAULT_CACHE = Path(os.environ.get("VOXC_CACHE", Path.home() / ".cache" / "voxc"))

EPILOG = """\
typical use:
  voxc make-tiny ./tiny                      # a small random checkpoint (official Mistral layout)
  voxc build ./tiny --target llvm -o ./tiny-cpu
  voxc transcribe speech.wav --model ./tiny-cpu
  voxc transcribe speech.wav --model ./tiny-cpu --stream --delay-ms 480
  voxc demo                                  # all of the above in one go

real weights: download mistralai/Voxtral-Mini-4B-Realtime-2602 (consolidated.safetensors,
params.json, tekken.json) and point `voxc build` at that directory.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except VoxcError as exc:
        print(f"voxc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("voxc: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxc", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile Voxtral Mini 4B Realtime with TVM for CPU, CUDA or WebGPU, and transcribe speech "
                    "offline or as a live stream.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write a small random checkpoint for trying voxc without real weights",
                       description="Write a small random Voxtral Realtime checkpoint (same structure, tiny sizes) "
                                   "with a tiny Tekken tokenizer. Its transcripts are gibberish, but every stage "
                                   "of voxc runs on it exactly as on the real model.")
    p.add_argument("out_dir", type=Path, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--encoder-window", type=int, default=750, help="encoder sliding window in frames (default 750)")
    p.add_argument("--decoder-window", type=int, default=8192, help="decoder sliding window in tokens (default 8192)")
    p.add_argument("--layout", choices=["mistral", "hf"], default="mistral",
                   help="official Mistral layout (consolidated.safetensors + params.json) or transformers' layout")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored weight dtype")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty directory")
    p.set_defaults(handler=cmd_make_tiny)

    p = sub.add_parser("build", help="compile a checkpoint into an artifact for one target",
                       description="Compile a checkpoint directory (official Mistral layout, transformers layout), "
                                   "a GGUF file or a transformers.js ONNX export (its directory, or one of its .onnx "
                                   "files to pick a variant) into an artifact directory that `voxc transcribe` and "
                                   "voxc.load() run without the compiler.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory, .gguf file or ONNX export directory")
    p.add_argument("--target", default="llvm", help="llvm (CPU, default), cuda, webgpu, vulkan or metal")
    p.add_argument("-o", "--output", type=Path, help="artifact directory (default: <checkpoint>-<target>)")
    p.add_argument("--left-pad-tokens", type=int, default=None,
                   help="silence tokens before the audio (default: the tokenizer's, 32; Q4_0 needs 76)")
    p.add_argument("--quantization", "-q", choices=["q4_0", "q4_k", "q8_0"], default=None,
                   help="store projections and the embedding table quantized (GGUF block formats); "
                        "a .gguf input keeps its own type by default")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None,
                   help="activation/KV-cache dtype (default: the target's; float16 halves GPU memory)")
    p.add_argument("--cpu", default=None, metavar="NAME",
                   help="llvm target: the CPU to generate code for: native (default: this machine's, "
                        "e.g. AVX-512), generic (runs on any CPU of this architecture, slower), or an "
                        "LLVM CPU name such as x86-64-v3 or znver4. Loading on a CPU that lacks the "
                        "instructions is refused with a clear message")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tekken.json to use (needed for GGUF files that carry no tokenizer, e.g. the Rust port's)")
    p.add_argument("--int8-activations", action="store_true",
                   help="llvm target, quantized weights: round decode activations to int8 and use the CPU's "
                        "integer dot products (VNNI, AVX2, AArch64 dotprod): 1.5-2x faster GEMVs, logits less exact")
    p.add_argument("--kv-int8", default=None, metavar="TOWERS",
                   help="store the KV caches of these towers (encoder, decoder, or all) as 8-bit values with a "
                        "scale per row and head: half the memory and attention reads of float16 (cuda)")
    p.add_argument("--strict-quantization", action="store_true",
                   help="fail when a weight cannot be stored in the requested type, instead of storing it in "
                        "another one (the build prints which weights those are, and why)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output directory (the old one stays until the new artifact is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("transcribe", help="transcribe an audio file (or the microphone)",
                       description="Transcribe a WAV/FLAC/OGG file with a compiled artifact. Audio at other "
                                   "sample rates or in stereo is resampled to 16 kHz mono.")
    p.add_argument("audio", nargs="?", type=Path, help="audio file (omit with --mic)")
    p.add_argument("--model", "-m", type=Path, required=True, help="artifact directory made by `voxc build`")
    p.add_argument("--stream", action="store_true", help="feed the audio in chunks and print text as it comes")
    p.add_argument("--chunk-ms", type=int, default=None, help="chunk size for --stream or --mic (default 80 ms)")
    p.add_argument("--delay-ms", type=int, default=None,
                   help="transcription delay: 80..1200 in steps of 80, or 2400 (default: the model's, 480)")
    p.add_argument("--mic", action="store_true", help="stream from the default microphone until Ctrl-C")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=cmd_transcribe)

    p = sub.add_parser("verify", help="check an artifact's files against the checksums in its manifest",
                       description="Hash every file of an artifact and compare it with the size and SHA-256 its "
                                   "manifest recorded at build time (voxc.load checks sizes on every load and "
                                   "hashes on the first one).")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("demo", help="make the tiny model, build it for the CPU and transcribe a clip",
                       description="The whole pipeline on a machine without real weights: make-tiny, "
                                   "build --target llvm, transcribe a generated clip offline and streaming.")
    p.add_argument("--workdir", type=Path, default=DEFAULT_CACHE / "demo", help=f"(default {DEFAULT_CACHE}/demo)")
    p.set_defaults(handler=cmd_demo)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands whose implementation lives with their subsystem (quantization, the server)."""
    from voxc.quant import cli as quant_cli
    from voxc.server import cli as server_cli

    return [quant_cli.register, server_cli.register]


# ---- commands -----------------------------------------------------------------------------------
def cmd_make_tiny(args) -> int:
    from voxc.loader.tiny import make_tiny

    make_tiny(args.out_dir, seed=args.seed, encoder_window=args.encoder_window, decoder_window=args.decoder_window,
              layout=args.layout, dtype=args.dtype, force=args.force)
    print(f"wrote a tiny random checkpoint to {args.out_dir}")
    return 0


def cmd_build(args) -> int:
    from voxc.build import build

    out = args.output or args.checkpoint.with_name(f"{args.checkpoint.name}-{args.target}")
    if not args.checkpoint.exists():
        raise VoxcError(f"{args.checkpoint} does not exist")
    build(args.checkpoint, args.target, out, progress=not args.quiet, left_pad_tokens=args.left_pad_tokens,
          quantization=args.quantization, dtype=args.dtype, tokenizer=args.tokenizer, cpu=args.cpu,
          force=args.force, strict_quantization=args.strict_quantization, int8_activations=args.int8_activations,
          kv_int8=args.kv_int8)
    print(f"built {out}")
    return 0


def cmd_transcribe(args) -> int:
    import voxc

    if args.mic == (args.audio is not None):
        raise VoxcError("give either an audio file or --mic")
    if args.chunk_ms is not None and not (args.stream or args.mic):
        raise VoxcError("--chunk-ms sets the chunk size of --stream or --mic; add --stream (or drop --chunk-ms)")
    args.chunk_ms = 80 if args.chunk_ms is None else args.chunk_ms
    if args.chunk_ms <= 0:
        raise VoxcError("--chunk-ms must be positive")
    from voxc.audio import load_audio

    audio = None if args.mic else load_audio(args.audio)   # a bad file fails before the model loads
    model = voxc.load(args.model, progress=sys.stderr.isatty() and not args.quiet)
    if args.mic:
        return _transcribe_mic(model, args)
    if not args.stream:
        print(_transcribe_offline(model, audio, args.delay_ms, progress=not args.quiet).strip())
        return 0
    session = model.stream(args.delay_ms)
    chunk = model.config.audio.sampling_rate * args.chunk_ms // 1000
    for begin in range(0, len(audio), chunk):
        _print_delta(session.feed(audio[begin:begin + chunk]))
    _print_delta(session.finish())
    print()
    return 0


# Offline audio is fed in pieces of this many seconds so a progress bar can move; the session gives
# the same text for any chunking (tests/test_streaming.py).
PROGRESS_PIECE_S = 10
PROGRESS_MIN_S = 30


def _transcribe_offline(model, audio, delay_ms, *, progress: bool) -> str:
    """The whole file through one session; a progress bar (audio seconds, real-time factor) on
    stderr for files longer than PROGRESS_MIN_S seconds."""
    from tqdm import tqdm

    rate = model.config.audio.sampling_rate
    seconds = len(audio) / rate
    session = model.stream(delay_ms)
    piece = PROGRESS_PIECE_S * rate
    text = []
    started = time.perf_counter()
    with tqdm(total=round(seconds, 1), unit="s", desc="audio", file=sys.stderr,
              disable=not progress or seconds < PROGRESS_MIN_S,
              bar_format="{desc}: {n:.0f}/{total:.0f} s {bar} [{elapsed}<{remaining}{postfix}]") as bar:
        for begin in range(0, len(audio), piece):
            text.append(session.feed(audio[begin:begin + piece]))
            bar.update(round(min(piece, len(audio) - begin) / rate, 1))
            bar.set_postfix_str(f"RTF {(time.perf_counter() - started) / (bar.n or 1):.3f}")
        text.append(session.finish())
    return "".join(text)


def _transcribe_mic(model, args) -> int:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise VoxcError(f"--mic needs the sounddevice package and PortAudio (pip install sounddevice): {exc}") from exc
    try:
        sounddevice.query_devices(kind="input")
    except Exception as exc:  # PortAudio raises its own error type
        raise VoxcError(f"no microphone found: {exc}") from exc
    rate = model.config.audio.sampling_rate
    session = model.stream(args.delay_ms)
    print("listening (Ctrl-C to stop)...", file=sys.stderr)
    try:
        with sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32",
                                     blocksize=rate * args.chunk_ms // 1000) as stream:
            while True:
                block, _ = stream.read(rate * args.chunk_ms // 1000)
                _print_delta(session.feed(block[:, 0]))
    except KeyboardInterrupt:
        _print_delta(session.finish())
        print()
    return 0


def _print_delta(text: str):
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def cmd_demo(args) -> int:
    import numpy as np

    import voxc
    from voxc.artifact import read_manifest
    from voxc.build import build
    from voxc.loader.tiny import make_tiny

    work = args.workdir
    checkpoint, artifact = work / "tiny", work / "tiny-llvm"
    if not (checkpoint / "params.json").exists():
        print(f"1/3 making a tiny random checkpoint in {checkpoint}", file=sys.stderr)
        make_tiny(checkpoint, force=True)
    try:
        read_manifest(artifact)
    except VoxcError:   # none yet, or made by another voxc version: the demo's own folder is rebuilt
        print(f"2/3 compiling it for the CPU into {artifact}", file=sys.stderr)
        build(checkpoint, "llvm", artifact, force=True)
    print("3/3 transcribing a 3 s clip (random weights: expect gibberish, but real compute)", file=sys.stderr)
    rate = 16000
    t = np.arange(3 * rate) / rate
    clip = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 1.5 * t)).astype(np.float32)
    model = voxc.load(artifact)
    started = time.perf_counter()
    session = model.stream()
    text = session.feed(clip) + session.finish()
    elapsed = time.perf_counter() - started
    print(f"offline:   {text!r}")
    print(f"           token ids {session.tokens[:12]}... (random weights pick random byte tokens)")
    session = model.stream()
    streamed = "".join(session.feed(clip[i:i + 1280]) for i in range(0, len(clip), 1280)) + session.finish()
    print(f"streaming: {streamed!r} (fed in 80 ms chunks)")
    print(f"real-time factor {elapsed / 3:.3f} on this CPU; streaming equals offline: {streamed == text}")
    return 0


def cmd_verify(args) -> int:
    from voxc.artifact import read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    verify_files(args.artifact, manifest, hashes=True)
    print(f"{args.artifact}: {len(manifest['files'])} files match their checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
