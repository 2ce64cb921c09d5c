"""The command line: ``protozoo-train`` / ``protozoo-evaluate`` (and ``protozoo train|evaluate``,
``python -m protozoo``, the top-level ``train.py`` / ``evaluate.py``), a thin layer over the
Python API (:mod:`protozoo.api`).

The application layer (DESIGN.md, "Layering"): it may import every module below it. A run's
settings come from the :class:`~protozoo.config.TrainConfig` defaults, then a YAML file
(``--config``), then the flags; the data from a registered dataset
(:func:`protozoo.data.register_dataset`); the model from its family (``from_config``), and a
family with a ``base_run`` extends a trained run (``--base RUN``), whose files are read here
and whose settings the family picks (``inherited_config``). Then :func:`protozoo.api.run_training`
runs what ``protozoo.train`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import checkpoint
from .api import default_run_dir, model_from_state, run_training
from .backbones import backbone_normalization
from .config import RUN_CONFIG, TrainConfig, read_config_json, read_run_config, read_yaml
from .data import build_data, check_data_dir, dataset_entry, list_datasets
from .engine import read_resume_state, setup_distributed
from .errors import UserError, run_cli
from .evaluation import evaluate_run
from .models.base import ZooModel
from .registry import (MODELS, list_models, model_batch_size, model_default, model_task,
                       models_for_task)
from .runfolder import never_started
from .version import __version__

TRAIN_DOC = """Train any protozoo model: config -> data -> model -> engine -> report.

    protozoo-train                                     # ProtoPNet on built-in synthetic-parts
    protozoo-train --model cam --backbone tiny_cnn --dataset synthetic-parts --out runs/cam
    protozoo-train --dataset folder --data-dir DIR     # your images: DIR/train/<class>/*.png
    protozoo-train --config my.yaml --lr 3e-4          # flags override the YAML file
    protozoo-train --resume runs/cam                   # continue a killed run
    torchrun --nproc_per_node=2 -m protozoo train --model cam --out runs/cam-ddp
(python train.py takes the same flags.)"""

EVALUATE_DOC = """Evaluate a trained run: test metrics (metrics.json) and the explanation report.

    protozoo-evaluate runs/cam                         # metrics.json + report/index.html
    protozoo-evaluate runs/protopnet --report --images cat.jpg dog.png
    protozoo-evaluate my_checkpoint --dataset digits   # a checkpoint saved with protozoo.save
    protozoo-evaluate runs/cam --explainers all        # + every explainer judged side by side
    protozoo-evaluate runs/cam --explainers intrinsic,gradcam --explainer-images 64
(python evaluate.py takes the same arguments.)"""


# ----------------------------------------------------------------------------- runs a run extends
def extends_runs(name: str) -> bool:
    """Does model family ``name`` extend a trained run (``train.py --base RUN``)?"""
    return getattr(MODELS.get(name), "base_run", None) is not None


def check_base_dir(base_dir, name: str) -> Path:
    """The ``--base`` folder of family ``name``, checked to hold a trained model."""
    if not base_dir:
        raise UserError(f"model '{name}' extends a trained run: pass --base RUN_DIR, "
                        f"{MODELS.get(name).base_run}")
    path = Path(base_dir)
    if not (path / checkpoint.CONFIG).is_file():
        raise UserError(f"--base '{base_dir}' is not a trained run (no {checkpoint.CONFIG}): "
                        "pass the --out folder of a finished train.py run")
    return path


def base_settings(base_dir, name: str) -> dict:
    """The settings run ``base_dir`` passes on to a run of family ``name`` (flags given on the
    command line override them); a one-line error when ``name`` extends no run."""
    if not extends_runs(name):
        users = [n for n in list_models() if extends_runs(n)]
        raise UserError(f"--base RUN_DIR is for --model {' or '.join(users)} (a head on a "
                        f"trained run), not --model {name}")
    path = check_base_dir(base_dir, name)
    run_config = read_config_json(path / RUN_CONFIG) if (path / RUN_CONFIG).is_file() else {}
    return MODELS.get(name).inherited_config(run_config, checkpoint.read_config(path))


def build_model(cfg: TrainConfig, data):
    """The model run ``cfg`` trains on ``data``: the family's ``from_config``, given the model of
    the ``--base`` run (``cfg.model_args["base"]``) when the family extends one."""
    build = getattr(MODELS.get(cfg.model), "from_config", ZooModel.from_config)
    base = None
    if extends_runs(cfg.model):
        base = checkpoint.load(check_base_dir(cfg.model_args.get("base"), cfg.model))
    return build(cfg, data, base)


# ----------------------------------------------------------------------------- train
def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=TRAIN_DOC,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file of options; command-line flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last epoch")
    p.add_argument("--base", metavar="RUN_DIR", help="for a model that extends a trained run "
                   "(niwt: its seen-class classifier), that run; its data settings are the "
                   "defaults")
    p.add_argument("--model", help=f"one of {', '.join(list_models())} (default protopnet)")
    p.add_argument("--backbone", help="tiny_cnn, tiny_cnn_s4, tiny_cnn_rf10, small_cnn, rn_cnn, "
                   "rn_cnn_rgb or any timm model (default: the model family's own, e.g. "
                   "tiny_cnn_rf10 for protopnet)")
    p.add_argument("--pretrained", help="'timm' for timm's weights, or a weights file path")
    p.add_argument("--stage", type=int, help="backbone feature stage (default -1, the last)")
    p.add_argument("--dataset", help=f"one of {', '.join(list_datasets())} (default "
                   "synthetic-parts)")
    p.add_argument("--data-dir", help="dataset folder (for folder, cub, cub-zsl and clevr)")
    p.add_argument("--cache-dir", help="where generated datasets are cached")
    p.add_argument("--image-size", type=int, help="resize images to SxS (default: the "
                   "dataset's: folder and clevr keep the images' own size)")
    p.add_argument("--num-classes", type=int, help="classes of a generated dataset")
    p.add_argument("--num-train", type=int, help="training images of a generated dataset")
    p.add_argument("--num-test", type=int, help="test images of a generated dataset")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--epochs", type=int, help="default: the model family's schedule")
    p.add_argument("--schedule", help="family schedule (ProtoPNet: auto, short, paper)")
    by_size: dict[int, list[str]] = {}
    for name in list_models():
        by_size.setdefault(model_batch_size(name), []).append(name)
    p.add_argument("--batch-size", type=int, help="default: the family's (" + "; ".join(
        f"{size}: {', '.join(names)}" for size, names in sorted(by_size.items())) + ")")
    p.add_argument("--lr", type=float, help="default: the model family's learning rates")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra model argument, e.g. --model-arg prototypes_per_class=5")
    p.add_argument("--loss-weight", action="append", default=[], metavar="TERM=VALUE",
                   help="loss coefficient, e.g. --loss-weight cluster=0.8")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--amp", help="auto (default: bf16/fp16 on GPU, off on CPU), off, bf16, fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loader worker processes (default 0)")
    p.add_argument("--out", help="run directory (default runs/MODEL-DATASET-TIME)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate on the test split and write the report at the end (default on)")
    return p.parse_args(argv)


def _key_values(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} '{item}' must look like KEY=VALUE")
        out[key.replace("-", "_")] = _value(value)
    return out


def _value(text: str):
    """A flag's value as JSON (``3``, ``0.5``, ``true``, ``[1, 2]``), Python's spellings of
    true/false/None too (``film=False`` must not become the true string "False"), else a string."""
    words = {"true": True, "false": False, "none": None, "null": None}
    if text.strip().lower() in words:
        return words[text.strip().lower()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were given."""
    values = read_yaml(args.config) if args.config else {}
    if values:  # wrong keys or shapes in the file (model_args: "hops=3") name the file; a
        # null stands for the default, which is filled in below (batch_size, backbone)
        TrainConfig.from_dict({k: v for k, v in values.items() if v is not None},
                              source=args.config)
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "resume", "model_arg", "loss_weight", "base")}
    if flags.get("pretrained") == "timm":
        flags["pretrained"] = True
    values.update(flags)
    family = values.get("model", TrainConfig.model)
    base = args.base or values.get("model_args", {}).get("base")
    if base or extends_runs(family):  # a head on a trained run: that run's data by default
        values = {**base_settings(base, family), **values, "model_args": {
            **values.get("model_args", {}), "base": base}}
    if values.get("backbone") is None:  # the family's own default, recorded in the run
        values["backbone"] = model_default(family, "backbone")
    if values.get("batch_size") is None:  # the family's ZooModel.default_batch_size
        values["batch_size"] = model_batch_size(family)
    values["model_args"] = {**values.get("model_args", {}), **_key_values(args.model_arg,
                                                                          "--model-arg")}
    values["loss_weights"] = {**values.get("loss_weights", {}),
                              **_key_values(args.loss_weight, "--loss-weight")}
    # the file alone passed above, so what fails now came from the flags
    return TrainConfig.from_dict(values, source="the command line")


def check_model_data(cfg: TrainConfig) -> None:
    """A VQA model needs questions, and questions need a VQA model; a generated dataset reads
    no ``--data-dir``."""
    check_data_dir(cfg.dataset, cfg.data_dir)
    vqa_datasets = [n for n in list_datasets() if dataset_entry(n).task == "vqa"]
    vqa_model, vqa_data = model_task(cfg.model) == "vqa", cfg.dataset in vqa_datasets
    if vqa_model and not vqa_data:
        raise UserError(f"model '{cfg.model}' answers questions about images: train it on "
                        f"--dataset {' or '.join(vqa_datasets)}")
    if vqa_data and not vqa_model:
        raise UserError(f"dataset '{cfg.dataset}' holds questions about images: train a VQA "
                        f"model on it (--model {', '.join(models_for_task('vqa'))})")


# flags that may change when a run continues (where it runs, not what it trains)
RESUME_FLAGS = ("device", "workers")


def _resume_overrides(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """``--resume`` continues the saved config: ``--device``/``--workers`` may change, any other
    flag is an error rather than silently ignored."""
    given = [k for k, v in vars(args).items() if k != "resume" and v not in (None, [])]
    ignored = [k for k in given if k not in RESUME_FLAGS]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise UserError(f"--resume continues the run with its saved config, so {flags} would be "
                        "ignored: drop them, or start a new run with --out")
    for key in given:
        setattr(cfg, key, getattr(args, key))
    cfg.check("the command line")


def _resume(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    run_dir = Path(args.resume)
    if never_started(run_dir):
        raise UserError(f"'{run_dir}' holds no {RUN_CONFIG} (its run was stopped as it started, "
                        f"so nothing is lost): run the same train.py command again with --out "
                        f"{run_dir}; it starts over in place")
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {RUN_CONFIG}); pass the "
                        "--out folder of an earlier train.py run")
    cfg = read_run_config(run_dir)
    _resume_overrides(args, cfg)
    state = read_resume_state(run_dir)
    if state["model_name"] != cfg.model:
        raise UserError(f"'{run_dir}' holds the state of a '{state['model_name']}' model but "
                        f"its train_config.json says '{cfg.model}': the run folder was mixed "
                        "up; start a new run with --out")
    cfg.out = str(run_dir)
    return cfg, state


def train_main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    resume = None
    if args.resume:
        cfg, resume = _resume(args)
        if resume["position"].get("finished"):
            print(f"run '{cfg.out}' already finished; nothing to resume")
            return 0
    else:
        cfg = resolve_config(args)
        check_model_data(cfg)

    dist = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)

    # Data and model are checked before anything is written, so bad input leaves no run folder.
    mean, std = backbone_normalization(cfg.backbone)
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, mean=mean,
                      std=std, num_classes=cfg.num_classes, seed=cfg.seed,
                      val_fraction=cfg.val_fraction, augment=cfg.augment,
                      cache_dir=cfg.cache_dir, num_train=cfg.num_train, num_test=cfg.num_test)
    if cfg.image_size is None and dataset_entry(cfg.dataset).image_size is None:
        if dist.is_main:
            print(f"images: {data.image_size} px, the dataset's own size (--image-size S "
                  "resizes them to SxS)", flush=True)
        cfg.image_size = data.image_size  # recorded, so evaluation and --resume read the same
    if resume:
        model = model_from_state(resume, str(Path(cfg.out) / "train_state.pt"))
    else:
        model = build_model(cfg, data)  # the family's from_config
    run_training(cfg, model, data, cfg.out if resume else default_run_dir(cfg), dist,
                 resume=resume, cli=True)
    if dist.enabled:  # leave the group together; rank 0 alone evaluates
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if not dist.is_main:
            # Its work is done and written by rank 0. Skip the interpreter's teardown: there,
            # now and then, a rank aborted inside the runtime ("terminate called without an
            # active exception", no Python frame left; two-process CPU launches on 2026-12-02:
            # 1 of 30 without the barrier, 1 of 45 with it, 0 of 45 with os._exit), and
            # torchrun then killed rank 0 in the middle of its evaluation.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    if cfg.report and dist.is_main:
        run_dir = Path(cfg.out)
        metrics = evaluate_run(run_dir, model=model, data=data, device=dist.device)
        print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                   if isinstance(v, float)))
        print(f"report: {run_dir / 'report' / 'index.html'}")
    return 0


# ----------------------------------------------------------------------------- evaluate
def evaluate_main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=EVALUATE_DOC,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run directory written by train.py (or protozoo.save)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report/ with the explanation pages (default on)")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="also explain these image files in the report")
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", help="dataset, for checkpoints without a train_config.json")
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", metavar="DIR", help="write metrics.json and report/ here instead of "
                   "into the run folder (e.g. for a read-only run)")
    p.add_argument("--explainers", metavar="NAMES",
                   help="also judge explainers on the same test images: 'all' or a comma list "
                   "of intrinsic, gradient, smoothgrad, integrated_gradients, occlusion, "
                   "gradcam, guided_backprop, random (metrics.json key 'explainers', and a "
                   "report section); the post-hoc ones need pip install 'protozoo[explain]'")
    p.add_argument("--explainer-images", type=int, default=128, metavar="N",
                   help="with --explainers: the first N test images (default 128; 0: all)")
    p.add_argument("--random-labels", action="store_true",
                   help="with --explainers: also train a copy on shuffled labels with the "
                   "run's schedule and compare its maps (Adebayo et al.'s data randomisation "
                   "test; takes as long as the training)")
    args = p.parse_args(argv)
    # Checked before the (long) evaluation, so a typo in a path fails at once.
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise UserError(f"image '{missing[0]}' not found (or not a file): check the --images paths")
    if args.images and not args.report:
        raise UserError("--images are explained in the report: drop --no-report")
    from .data.images import decode_sample

    for path in args.images:  # an unreadable file fails now, not after the evaluation
        decode_sample(path, 8)
    if args.explainers is not None:
        from .explain.explainers import check_explainers

        check_explainers(args.explainers)  # names and Captum, before loading anything
        if args.explainer_images < 0:
            raise UserError(f"--explainer-images {args.explainer_images} must be >= 0 (0: all)")
    elif args.random_labels:
        raise UserError("--random-labels is a check of the explainers: add --explainers")
    overrides = {"dataset": args.dataset, "data_dir": args.data_dir, "batch_size": args.batch_size}
    options = {"num_images": args.explainer_images or None}
    metrics = evaluate_run(args.run, device=args.device, report=args.report, images=args.images,
                           overrides=overrides, out_dir=args.out, explainers=args.explainers,
                           explainer_options=options, random_labels=args.random_labels)
    for key, value in metrics.items():
        if key == "explainers":
            for name, scores in value.items():
                print(f"explainer {name}: " + ", ".join(
                    f"{k}={v:.3f}" for k, v in scores.items()
                    if not k.endswith("_chance") and k != "seconds"))
        elif key == "explainer_settings":
            print(f"explainers: {value['num_images']} images, {value['seconds']:.1f} s "
                  f"({value['cpu_seconds']:.1f} s CPU) on {value['device']}")
        else:
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    out = args.out or args.run
    print(f"wrote {out}/metrics.json" + (f" and {out}/report/index.html" if args.report else ""))
    return 0


# ----------------------------------------------------------------------------- console scripts
COMMANDS = {"train": (train_main, TRAIN_DOC), "evaluate": (evaluate_main, EVALUATE_DOC)}


def main(argv=None) -> int:
    """``protozoo train ...`` / ``protozoo evaluate ...`` (``python -m protozoo``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: protozoo {train,evaluate} [--help] ...\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:9s}{doc.splitlines()[0]}")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"protozoo {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command '{argv[0]}': use protozoo train ... or protozoo "
                        "evaluate ... (protozoo --help)")
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:], prog=f"protozoo {argv[0]}")


def protozoo_command() -> int:
    """Console script ``protozoo``."""
    return run_cli(main)


def train_command() -> int:
    """Console script ``protozoo-train``."""
    return run_cli(lambda argv: train_main(argv, prog="protozoo-train"))


def evaluate_command() -> int:
    """Console script ``protozoo-evaluate``."""
    return run_cli(lambda argv: evaluate_main(argv, prog="protozoo-evaluate"))
