"""Evaluate a run directory: test accuracy, the family's explanation metrics, and its report.

Used by ``evaluate.py`` and at the end of ``train.py``. The model is rebuilt from the run directory
alone; the data from the run's ``train_config.json`` (or flags for a bare checkpoint). Only the
*test* split is read here; model selection never happens on it.
"""
from __future__ import annotations

import errno
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from . import checkpoint
from .config import RUN_CONFIG, TrainConfig, read_config_json
from .data.base import pick_examples  # noqa: F401  (re-exported: it lived here before)
from .errors import UserError
from .fileio import atomic_write_text, check_writable
from .metrics import mean_class_accuracy
from .runtime import iterate, resolve_device


# The dataset a run records when it was trained from Python on the user's own data
# (protozoo.train): "python:<the dataset's type>"; no loader can rebuild such data.
PYTHON_DATA = "python:"


def run_config(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    values = {}
    path = Path(run_dir) / RUN_CONFIG
    if path.is_file():
        values = read_config_json(path)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    TrainConfig.from_dict(flags, source="the command line")  # a bad flag is blamed on the flag
    values.update(flags)
    if not path.is_file() and (overrides or {}).get("dataset") is None:
        raise UserError(f"'{run_dir}' has no {RUN_CONFIG} (a checkpoint saved outside "
                        "train.py); say which data to use with --dataset [--data-dir]")
    if str(values.get("dataset", "")).startswith(PYTHON_DATA):
        raise UserError(f"'{run_dir}' was trained from Python on its own data "
                        f"({values['dataset'][len(PYTHON_DATA):]}), which no loader rebuilds: "
                        "evaluate it with protozoo.evaluate(model, test_data), or pass "
                        "--dataset [--data-dir]")
    return TrainConfig.from_dict(values, source=str(path) if path.is_file() else "flags")


def build_eval_data(cfg: TrainConfig, model):
    from .data import build_data

    return build_data(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                      mean=model.mean, std=model.std, num_classes=cfg.num_classes, seed=cfg.seed,
                      val_fraction=cfg.val_fraction, augment=False, cache_dir=cfg.cache_dir,
                      num_train=cfg.num_train, num_test=cfg.num_test,
                      # each test image is read once: streamed, memory does not grow with them
                      test_preload=False,
                      **model.data_args())  # e.g. the words a model encodes questions with


def test_metrics(model, dataset, batch_size: int, device, amp: str = "auto") -> dict:
    """Top-1 and mean per-class accuracy plus the mean of every explanation metric."""
    preds, labels = [], []
    sums, counts = defaultdict(float), defaultdict(int)
    for batch, output in iterate(model, dataset, batch_size, device, amp):
        preds.append(output.logits.argmax(1).cpu())
        labels.append(batch["label"].cpu())
        for name, values in model.explanation_metrics(output, batch).items():
            sums[name] += float(values.float().sum())
            counts[name] += len(values)
    preds_np, labels_np = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    result = {"accuracy": float((preds_np == labels_np).mean()),
              "mean_class_accuracy": mean_class_accuracy(preds_np, labels_np, model.num_classes)}
    result.update(_test_counts(model, dataset, int(len(labels_np))))
    result.update({name: sums[name] / counts[name] for name in sums})
    return result


def _test_counts(model, dataset, items: int) -> dict:
    """``num_test_images``; for a model whose test items are not images (``model.test_item``,
    e.g. questions sharing an image) also ``num_test_<item>s``, and the images counted as the
    distinct ``dataset.paths``."""
    item = getattr(model, "test_item", "image")
    if item == "image":
        return {"num_test_images": items}
    paths = getattr(dataset, "paths", None)
    images = len(set(paths)) if paths is not None and len(paths) == items else None
    return {"num_test_images": images, f"num_test_{item}s": items}


def check_classes(model, class_names: list[str], source: str) -> None:
    """The data's classes must be the model's, in its order (else its labels would be scored
    against the wrong classes); ``source`` names the data in the one-line error."""
    trained_on = list(model.data_class_names)  # a head may classify over more classes
    if len(class_names) != len(trained_on):
        raise UserError(f"the model has {len(trained_on)} classes but {source} has "
                        f"{len(class_names)}; evaluate on the data it was trained on")
    differ = [i for i, (a, b) in enumerate(zip(trained_on, class_names)) if a != b]
    if differ:
        i = differ[0]
        raise UserError(f"class {i} is '{trained_on[i]}' in the model but '{class_names[i]}' "
                        f"in {source} ({len(differ)} of {len(trained_on)} differ): its labels "
                        "would be scored against the wrong classes; evaluate on the data it was "
                        "trained on")


def model_metrics(model, data, batch_size: int, device, amp: str = "auto") -> dict:
    """What ``metrics.json`` holds: :func:`test_metrics` on ``data.test``, the family's metrics
    over the whole data (``model.dataset_metrics``, e.g. a prototype family's purity over the
    push set) and facts about the test data."""
    model.to(device)
    _say_what_cannot_be_computed(model, data)
    metrics = test_metrics(model, data.test, batch_size, device, amp)
    metrics.update(model.dataset_metrics(data, amp))
    metrics.update(data.data_metrics())  # e.g. test words the model never saw, read as <unk>
    return metrics


def _say_what_cannot_be_computed(model, data) -> None:
    """One notice on stderr per ground-truth field the data lacks (``data.has_masks``,
    ``data.has_boxes``),
    naming the family's metrics that need it (``model.ground_truth_metrics``), so that they do
    not silently vanish from ``metrics.json``."""
    for field, names in getattr(model, "ground_truth_metrics", {}).items():
        if names and not getattr(data, f"has_{field}", True):
            print(f"note: the data has no {field}, so {', '.join(names)} cannot be computed "
                  "and are not in metrics.json", file=sys.stderr)


def write_report(model, data, out_dir, metrics: dict, images=None) -> Path:
    """The family's report (``model.report_writer``) into ``out_dir``."""
    from .render.reports import write_report as write

    return write(model, data, Path(out_dir), metrics, images=images)


def _check_out_dir(out_dir: Path, own: bool) -> None:
    """A one-line error before the (long) evaluation when ``out_dir`` cannot be written."""
    existing = out_dir  # a new --out folder is made when the results are written, not now
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"'{out_dir}' lies inside the file '{existing}': choose a folder for "
                        "--out")
    try:
        check_writable(existing)
    except OSError as exc:
        raise _cannot_write(existing, exc, own) from None


def _cannot_write(path: Path, exc: OSError, own: bool) -> UserError:
    fix = ("free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "make it writable")
    where = "write metrics and report elsewhere with --out DIR" if own else "choose another --out"
    return UserError(f"cannot write in '{path}' ({exc.strerror}): {fix}, or {where}")
def check_explainer_request(model, explainers, options: dict | None = None) -> None:
    """One-line UserErrors, before any evaluation, for explainers that cannot run on ``model``:
    an unknown name (the valid ones listed), Captum missing, a model without an image input."""
    from .explain import check_explainers
    from .explain.explainers import check_image_model

    check_image_model(model)
    check_explainers(explainers, (options or {}).get("params"), model)


def explainer_results(model, data, explainers, report_dir, device, options: dict | None = None,
                      random_labels_model=None) -> dict:
    """What ``metrics.json`` gets from the explainer evaluation on ``data.test`` (see
    :func:`protozoo.explain.explainer_metrics`; ``options``: its keyword arguments, e.g.
    ``num_images``, ``batch_size``, ``steps``); with ``report_dir``, its section of the
    report."""
    from .explain import explainer_metrics

    options = dict(options or {})
    if random_labels_model is not None:
        options["random_labels_model"] = random_labels_model
    return explainer_metrics(model, data.test, explainers, report_dir, device=device, **options)


def evaluate_run(run_dir, model=None, data=None, device="auto", report: bool = True,
                 images: list[str] | None = None, overrides: dict | None = None,
                 out_dir=None, explainers=None, explainer_options: dict | None = None,
                 random_labels: bool = False) -> dict:
    """Write ``metrics.json`` (and ``report/``) into ``out_dir`` (default ``run_dir``); returns
    the metrics. A folder that cannot be written is a one-line error before anything runs.
    ``explainers`` (``"all"``, a name, a list or ``"a,b"``): also judge those explainers on the
    test images (:func:`explainer_results`: ``metrics["explainers"]``, one key each, and their
    section of the report); ``random_labels``: with them, train a copy of the model on
    shuffled labels with the run's schedule for the data randomisation test."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    if run_dir.is_dir() or out_dir is not None:
        _check_out_dir(out, out_dir is None)
    device = resolve_device(device) if isinstance(device, str) else device
    if model is None:
        model = checkpoint.load(run_dir, device)
    if images and not model.explains_images:
        raise UserError(f"--images: a '{model.model_name}' model answers questions about an "
                        "image, so an image alone has nothing to explain; drop --images (the "
                        "report explains test questions)")
    if random_labels and explainers is None:
        raise UserError("--random-labels is a check of the explainers: add --explainers")
    if explainers is not None:
        check_explainer_request(model, explainers, explainer_options)
    cfg = run_config(run_dir, overrides)
    if data is None:
        data = build_eval_data(cfg, model)
    check_classes(model, data.class_names, f"dataset '{cfg.dataset}'")
    metrics = model_metrics(model, data, cfg.batch_size, device, cfg.amp)
    try:  # the disk may fill up during the evaluation
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        if report:
            write_report(model, data, out / "report", metrics, images=images)
    except OSError as exc:
        raise _cannot_write(Path(exc.filename or out), exc, out_dir is None) from None
    if explainers is not None:
        shuffled = None
        if random_labels:
            from .explain import train_random_labels

            shuffled = train_random_labels(model, data, epochs=cfg.epochs, lr=cfg.lr,
                                           batch_size=cfg.batch_size, seed=cfg.seed,
                                           device=device)
        metrics.update(explainer_results(model, data, explainers,
                                         out / "report" if report else None, device,
                                         explainer_options, shuffled))
        try:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        except OSError as exc:
            raise _cannot_write(Path(exc.filename or out), exc, out_dir is None) from None
    return metrics
