"""Train any protozoo model. Reads top to bottom: config -> data -> model -> engine -> report.

    python train.py                                   # ProtoPNet on built-in synthetic-parts
    python train.py --model cam --backbone tiny_cnn --dataset synthetic-parts --out runs/cam
    python train.py --config my.yaml --lr 3e-4        # flags override the YAML file
    python train.py --resume runs/cam                 # continue a killed run
    torchrun --nproc_per_node=2 train.py --model cam --out runs/cam-ddp
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import protozoo
from protozoo.backbones import backbone_normalization
from protozoo.cli import base_settings, build_model, extends_runs
from protozoo.config import RUN_CONFIG, TrainConfig, describe_schedule, read_run_config, read_yaml
from protozoo.data import DATASETS, VQA_DATASETS, build_data, check_data_dir
from protozoo.engine import Trainer, read_resume_state, setup_distributed
from protozoo.errors import UserError, run_cli
from protozoo.registry import (model_batch_size, model_default, model_task, models_for_task,
                               saved_kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file of options; command-line flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last epoch")
    p.add_argument("--base", metavar="RUN_DIR", help="for a model that extends a trained run "
                   "(niwt: its seen-class classifier), that run; its data settings are the "
                   "defaults")
    p.add_argument("--model", help=f"one of {', '.join(protozoo.list_models())} (default protopnet)")
    p.add_argument("--backbone", help="tiny_cnn, tiny_cnn_s4, tiny_cnn_rf18, small_cnn, rn_cnn, rn_cnn_rgb or any timm model "
                   "(default: the model family's own, e.g. tiny_cnn_rf18 for protopnet)")
    p.add_argument("--pretrained", help="'timm' for timm's weights, or a weights file path")
    p.add_argument("--stage", type=int, help="backbone feature stage (default -1, the last)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default synthetic-parts)")
    p.add_argument("--data-dir", help="dataset folder (for folder and cub)")
    p.add_argument("--cache-dir", help="where generated datasets are cached")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-classes", type=int, help="classes of a generated dataset")
    p.add_argument("--num-train", type=int, help="training images of a generated dataset")
    p.add_argument("--num-test", type=int, help="test images of a generated dataset")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--epochs", type=int, help="default: the model family's schedule")
    p.add_argument("--schedule", help="family schedule (ProtoPNet: auto, short, paper)")
    p.add_argument("--batch-size", type=int, help="default: the family's (64; VQA models 320)")
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
    if values.get("batch_size") is None:  # VQA: 320 questions = ~16 scenes, one CNN pass each
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
    vqa_model, vqa_data = model_task(cfg.model) == "vqa", cfg.dataset in VQA_DATASETS
    if vqa_model and not vqa_data:
        raise UserError(f"model '{cfg.model}' answers questions about images: train it on "
                        f"--dataset {' or '.join(VQA_DATASETS)}")
    if vqa_data and not vqa_model:
        raise UserError(f"dataset '{cfg.dataset}' holds questions about images: train a VQA "
                        f"model on it (--model {', '.join(models_for_task('vqa'))})")


def dry_run(model, data, cfg: TrainConfig) -> None:
    """The schedule, one forward pass and its loss on two training items, before the run folder
    is written: a model argument that cannot work (``embed_dim=0``, or a loss the data cannot
    feed) then fails with a one-line error instead of leaving a half-written run. The RNG is
    restored, so training is unchanged."""
    from torch.utils.data import default_collate

    model.check_training(cfg)
    model.phases(cfg)
    given = {k: v for k, v in cfg.model_args.items() if k != "base"}  # --base is not an arg
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # augmentation draws too
            batch = default_collate([data.train[i] for i in range(min(2, len(data.train)))])
            model.eval()
            model.objective(model(*model.inputs(batch)), batch)  # what the loss needs, too
    except UserError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        if not given:
            raise
        args = " ".join(f"{k}={v}" for k, v in given.items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model '{cfg.model}' fails on a batch of {cfg.dataset} ({first}); "
                        f"check the --model-arg values ({args})") from None
    finally:
        model.train(was_training)


def new_run_dir(cfg: TrainConfig, dist) -> Path:
    out = cfg.out or f"runs/{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.enabled:  # every process must agree on the folder
        holder = [out]
        torch.distributed.broadcast_object_list(holder, src=0)
        out = holder[0]
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out '{run_dir}' is a file; a run is a folder: choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):  # every process stops, not only rank 0
        raise UserError(f"run directory '{run_dir}' already exists; continue it with --resume "
                        f"{run_dir} or choose another --out")
    if dist.enabled:  # nobody writes into the folder before every process has checked it
        torch.distributed.barrier()
    return run_dir


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


def main(argv=None) -> int:
    args = parse_args(argv)
    resume = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"'{run_dir}' is not a run directory (no {RUN_CONFIG}); pass the "
                            "--out folder of an earlier train.py run")
        cfg = read_run_config(run_dir)
        _resume_overrides(args, cfg)
        resume = read_resume_state(run_dir)
        if resume["model_name"] != cfg.model:
            raise UserError(f"'{run_dir}' holds the state of a '{resume['model_name']}' model but "
                            f"its train_config.json says '{cfg.model}': the run folder was mixed "
                            "up; start a new run with --out")
        if resume["position"].get("finished"):
            print(f"run '{run_dir}' already finished; nothing to resume")
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
    if resume:
        model = protozoo.create_model(resume["model_name"], **saved_kwargs(
            resume["model_name"], {**json.loads(resume["model_config"]), "pretrained": False}))
        model.metadata = json.loads(resume["metadata"])
        protozoo.checkpoint.load_state(model, resume["model"], source=str(run_dir / "train_state.pt"))
    else:
        model = build_model(cfg, data)  # the family's from_config
        model.backbone.check_input(torch.zeros(1, 3, data.image_size, data.image_size))
        dry_run(model, data, cfg)
        run_dir = new_run_dir(cfg, dist)
    model.metadata["image_size"] = data.image_size
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder '{run_dir}' ({exc.strerror}); choose "
                            "a writable --out") from None
        cfg.out = str(run_dir)
        cfg.save(run_dir / RUN_CONFIG)
        items, classes = (("questions", "answers") if data.vocab is not None
                          else ("images", "classes"))
        print(f"training {cfg.model} ({cfg.backbone}) on {cfg.dataset}: {len(data.train)} train / "
              f"{len(data.val)} val / {len(data.test)} test {items}, {len(data.class_names)} "
              f"{classes}, device {dist.device}, run {run_dir}", flush=True)
        print(f"schedule ({cfg.schedule}):\n{describe_schedule(model.phases(cfg))}", flush=True)

    Trainer(cfg, model, data, run_dir, dist).fit(resume)
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
        from protozoo.evaluation import evaluate_run

        metrics = evaluate_run(run_dir, model=model, data=data, device=dist.device)
        print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                   if isinstance(v, float)))
        print(f"report: {run_dir / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
