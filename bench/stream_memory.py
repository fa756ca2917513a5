"""Peak RSS of one stream over an hour of audio (tiny model by default): python bench/stream_memory.py ARTIFACT"""
import argparse

from voxc.benchmarks.stream_memory import run

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("artifact")
parser.add_argument("--minutes", type=float, default=60.0)
args = parser.parse_args()
run(args.artifact, minutes=args.minutes)
