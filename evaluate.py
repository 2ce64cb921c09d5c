"""Evaluate a trained run: the entry point the README shows, the same as ``protozoo-evaluate``
(``python evaluate.py --help`` lists the arguments; the code is in :mod:`protozoo.cli`).

    python evaluate.py runs/cam                       # metrics.json + report/index.html
    python evaluate.py runs/protopnet --report --images cat.jpg dog.png
"""
import sys

from protozoo.cli import evaluate_main as main
from protozoo.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
