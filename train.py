"""Train any protozoo model: the entry point the README shows, the same as ``protozoo-train``
(``python train.py --help`` lists the flags; the code is in :mod:`protozoo.cli`).

    python train.py                                   # ProtoPNet on built-in synthetic-parts
    python train.py --model cam --backbone tiny_cnn --dataset synthetic-parts --out runs/cam
    python train.py --resume runs/cam                 # continue a killed run
    torchrun --nproc_per_node=2 train.py --model cam --out runs/cam-ddp
"""
import sys

from protozoo.cli import train_main as main
from protozoo.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
