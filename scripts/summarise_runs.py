"""Mean and spread of metrics over run folders (e.g. the same command with several seeds).

    python scripts/summarise_runs.py runs/parts-s0 runs/parts-s1 runs/parts-s2 \
        --keys accuracy prototype_purity evidence_on_part evidence_relevance_mass

prints one markdown row per key: mean, min and max over the runs' ``metrics.json``, and the
chance level (``<key>_chance``, mean over the runs) where the metrics give one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarise(runs: list[Path], keys: list[str]) -> list[str]:
    metrics = []
    for run in runs:
        path = run / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist: evaluate the run first "
                             f"(python evaluate.py {run})")
        metrics.append(json.loads(path.read_text()))
    lines = ["| metric | mean | min | max | chance |", "|---|---|---|---|---|"]
    for key in keys:
        values = [m[key] for m in metrics if key in m]
        if not values:
            continue
        chance = [m[key + "_chance"] for m in metrics if key + "_chance" in m]
        ch = f"{sum(chance) / len(chance):.3f}" if chance else "—"
        lines.append(f"| {key} | {sum(values) / len(values):.3f} | {min(values):.3f} | "
                     f"{max(values):.3f} | {ch} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.json")
    p.add_argument("--keys", nargs="+", default=["accuracy"], help="metrics to summarise")
    args = p.parse_args(argv)
    print(f"{len(args.runs)} runs")
    print("\n".join(summarise(args.runs, args.keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
