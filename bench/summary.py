"""bench/results/summary.json: one object, a key per headline figure, each
``{"value": ..., "date": ..., "device": ..., "command": ..., "note": ...}`` (the issues name the keys).

    python bench/summary.py KEY VALUE --device "NVIDIA H100 80GB HBM3" --command "..." [--note "..."]
    python bench/summary.py --show

From Python: ``record(key, value, device=..., command=..., note=...)``.  Other keys are kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent / "results" / "summary.json"


def record(key: str, value, *, device: str, command: str, note: str | None = None,
           date: str | None = None, path: Path = SUMMARY) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {"value": value, "date": date or datetime.date.today().isoformat(), "device": device, "command": command}
    if note:
        entry["note"] = note
    data[key] = entry
    path.write_text(json.dumps(data, indent=1) + "\n")
    return entry


def _value(text: str):
    if text == "null":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("key", nargs="?")
    ap.add_argument("value", nargs="?", type=_value)
    ap.add_argument("--device")
    ap.add_argument("--command")
    ap.add_argument("--note")
    ap.add_argument("--show", action="store_true")
    args = ap.parse_args(argv)
    if args.show or not args.key:
        for key, entry in json.loads(SUMMARY.read_text()).items():
            print(f"{key:40s} {entry['value']!s:>10s}  {entry['date']}  {entry['device'][:40]}")
        return
    if args.device is None or args.command is None:
        ap.error("a figure needs --device and --command")
    print(json.dumps(record(args.key, args.value, device=args.device, command=args.command, note=args.note)))


if __name__ == "__main__":
    main()
