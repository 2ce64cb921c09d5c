"""Evaluate a trained run: test metrics (metrics.json) and the explanation report.

    python evaluate.py runs/cam                       # metrics.json + report/index.html
    python evaluate.py runs/protopnet --report --images cat.jpg dog.png
    python evaluate.py my_checkpoint --dataset digits # a checkpoint saved with protozoo.save
"""
from __future__ import annotations

import argparse
import os
import sys

from protozoo.errors import UserError, run_cli
from protozoo.evaluation import evaluate_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run directory written by train.py (or protozoo.save)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report/ with the explanation pages (default on)")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="also explain these image files in the report")
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", help="dataset, for checkpoints without a train_config.json")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int)
    args = p.parse_args(argv)
    # Checked before the (long) evaluation, so a typo in a path fails at once.
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise UserError(f"image '{missing[0]}' not found (or not a file): check the --images paths")
    if args.images and not args.report:
        raise UserError("--images are explained in the report: drop --no-report")
    overrides = {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size}
    metrics = evaluate_run(args.run, device=args.device, report=args.report, images=args.images,
                           overrides=overrides)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {args.run}/metrics.json" + (f" and {args.run}/report/index.html"
                                               if args.report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
