"""protozoo from Python: :func:`train` and :func:`evaluate` any zoo model on any dataset.

The application layer (DESIGN.md, "Layering"). :func:`train` runs the same engine as
``train.py`` / ``protozoo-train`` -- the family's phases (``model.phases``), its actions (push,
pruning), checkpoints and the resume state every epoch when ``run_dir`` is given, resume, DDP
under ``torchrun`` -- on the data the caller gives: any map-style ``torch.utils.data.Dataset``
(or ``DataLoader``) whose items are ``(image, label)`` or dicts (the sample contract,
:mod:`protozoo.data.contract`), or a :class:`~protozoo.data.DataBundle` from
:func:`protozoo.data.build_data`. The command line is a thin layer over :func:`run_training`,
the part both share.

What a run needs beyond the training items is built from them: the validation split (seeded,
stratified, carved out of ``train_data`` when ``val_data`` is None) and the push set (the
training items without augmentation, where ProtoPNet projects its prototypes and pruning reads
their labels: ``push_data``, by default ``train_data`` itself -- pass it when ``train_data``'s
transforms augment). Everything is checked before any training: the arguments, the samples
(one-line :class:`~protozoo.errors.DataError` naming the item and field), the schedule and one
forward pass with its loss on two items.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import RUN_CONFIG, TrainConfig, describe_schedule, read_run_config
from .data import DataBundle, stratified_split
from .data.contract import adapt, check_samples
from .engine import Trainer, read_resume_state, setup_distributed
from .errors import DataError, UserError
from .evaluation import (PYTHON_DATA, check_classes, check_explainer_request, explainer_results,
                         model_metrics, write_report)
from .fileio import atomic_write_text
from .models.base import ZooModel
from .registry import create_model, saved_kwargs
from .runfolder import never_started, run_folder
from .runtime import DistInfo, resolve_device

# constructor arguments TrainConfig records in fields of their own
_OWN_FIELDS = ("backbone", "pretrained", "stage", "class_names")
# what resume=True compares with the saved run (where the run runs may change, not what it is)
_RUN_SETTINGS = ("schedule", "epochs", "lr", "batch_size", "weight_decay", "loss_weights",
                 "seed", "val_fraction", "amp", "channels_last")


def train(model: ZooModel, train_data, val_data=None, *, schedule: str | None = None,
          epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
          weight_decay: float = 0.0, loss_weights: dict | None = None, run_dir=None,
          device: str = "auto", amp: str = "auto", seed: int = 0, resume: bool = False,
          val_fraction: float = 0.1, push_data=None, workers: int = 0,
          channels_last: bool = False) -> list[dict]:
    """Train ``model`` in place with its family's schedule; returns the history (one record
    per epoch or action, as ``log.jsonl`` holds it).

    Args:
        model: a zoo model (``protozoo.create_model(...)`` or a family class).
        train_data: a Dataset or DataLoader of ``(image, label)`` or dict samples
            (:mod:`protozoo.data.contract`), or a :class:`~protozoo.data.DataBundle`. A
            DataLoader is read through its dataset and batch size; the engine batches and
            shuffles itself (seeded, resumable, sharded under DDP).
        val_data: held-out data for model selection; None carves ``val_fraction`` of every
            class out of ``train_data`` (seeded by ``seed``).
        schedule, epochs, lr: the family's schedule (``"auto"``; ProtoPNet also ``"short"``,
            ``"paper"``), its epoch count and learning-rate scale, as ``--schedule``,
            ``--epochs``, ``--lr``; it is printed in full before training.
        run_dir: a folder for checkpoints every epoch, ``log.jsonl``, ``curves.png`` and the
            resume state (None: nothing is written); ``resume=True`` continues it.
        push_data: the training items without augmentation (default ``train_data``), the same
            items in the same order.
        device, amp, seed, workers, channels_last, batch_size, weight_decay, loss_weights: as
            the command-line flags of the same names.
    """
    _check_model(model)
    loader_batch = getattr(train_data, "batch_size", None) if isinstance(
        train_data, torch.utils.data.DataLoader) else None
    values = dict(model=model.model_name, backbone=model.backbone.name,
                  pretrained=model.init_kwargs.get("pretrained", False),
                  stage=model.init_kwargs.get("stage", -1),
                  model_args={k: v for k, v in model.init_kwargs.items() if k not in _OWN_FIELDS},
                  dataset=PYTHON_DATA + type(train_data).__name__,
                  schedule="auto" if schedule is None else schedule, epochs=epochs, lr=lr,
                  batch_size=batch_size or loader_batch or model.default_batch_size,
                  weight_decay=weight_decay, loss_weights=dict(loss_weights or {}),
                  device=device, amp=amp, seed=seed, val_fraction=val_fraction, workers=workers,
                  channels_last=channels_last, out=None if run_dir is None else str(run_dir),
                  report=False)
    cfg = TrainConfig.from_dict(values, source="protozoo.train()")
    state = _resume_state(model, run_dir, cfg) if resume else None
    if state is not None and state["position"].get("finished"):
        print(f"run '{run_dir}' already finished; nothing to resume")
        return json.loads(state["log"])
    created = not torch.distributed.is_initialized()
    dist = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    data = training_data(model, train_data, val_data, push_data, val_fraction=val_fraction,
                         seed=seed)
    cfg.image_size = data.image_size
    history = run_training(cfg, model, data, run_dir, dist, resume=state)
    if dist.enabled and created:  # under torchrun: leave the group this call joined, together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return history


def evaluate(model: ZooModel, test_data, *, report_dir=None, push_data=None,
             batch_size: int = 64, device: str = "auto", amp: str = "auto",
             images: list | None = None, explainers=None,
             explainer_options: dict | None = None) -> dict:
    """Test metrics of ``model`` on ``test_data`` -- accuracy, mean per-class accuracy and the
    family's explanation metrics (scored against ``mask``/``box`` where the items carry them)
    -- and, with ``report_dir``, the family's report (``index.html``) and ``metrics.json``
    there. ``test_data``: a Dataset or DataLoader (as for :func:`train`), or a
    :class:`~protozoo.data.DataBundle` (its test split and push set). ``push_data``: the
    training data the model was trained on (a ProtoPNet's report shows the training patches
    its prototypes come from, and its prototype metrics read them; without it they are left
    out). ``images``: image files the report explains too. ``explainers`` (``"all"``, a name,
    a list or ``"a,b"``): also judge those explainers -- the model's own explanation and the
    post-hoc ones -- on the same test images (:mod:`protozoo.explain`): the metrics get
    ``"explainers"`` (one key per explainer: ground-truth scores with chance levels, deletion
    and insertion AUC, cascading randomisation) and ``"explainer_settings"``, and the report
    its section (table, curves, cascade, grid of maps, embeddings); ``explainer_options``: the
    keyword arguments of :func:`protozoo.explain.explain_model` (``num_images``,
    ``batch_size``, ``steps``, ``params``, ``random_labels_model``, ...). Returns the metrics
    dict."""
    _check_model(model)
    if images and not model.explains_images:
        raise UserError(f"images: a '{model.model_name}' model answers questions about an "
                        "image, so an image alone has nothing to explain; drop images")
    if isinstance(test_data, DataBundle):  # protozoo.data.build_data(...): its test split
        if push_data is not None:
            raise UserError("test_data is a DataBundle, which holds its own push split: drop "
                            "push_data")
        data = test_data
        check_classes(model, data.class_names, "test_data")
    else:
        data = _evaluation_data(model, test_data, push_data, report_dir is not None)
    if explainers is not None:
        check_explainer_request(model, explainers, explainer_options)
    device = resolve_device(device)
    metrics = model_metrics(model, data, batch_size, device, amp)
    out = None
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        write_report(model, data, out, metrics, images=[str(p) for p in images or []])
    if explainers is not None:
        metrics.update(explainer_results(model, data, explainers, out, device,
                                         explainer_options))
        if out is not None:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


# ----------------------------------------------------------------------------- data
def _evaluation_data(model: ZooModel, test_data, push_data, report: bool) -> DataBundle:
    """The :class:`DataBundle` :func:`evaluate` reads: ``test_data`` as its test split and
    ``push_data`` (or None) as its push set, both checked against the sample contract."""
    test = adapt(test_data, "test_data", model.mean, model.std)
    check_classes(model, _class_names(model, test, "test_data", adopt=False), "test_data")
    check_samples(test, "test_data", model.num_classes, model.sample_fields)
    push = None
    if push_data is not None:
        push = adapt(push_data, "push_data", model.mean, model.std)
        check_samples(push, "push_data", model.num_classes, model.sample_fields)
    elif model.uses_training_images and report:
        raise UserError(f"a '{model.model_name}' model's report shows the training images its "
                        "evidence comes from: pass push_data=train_data (the data it was "
                        "trained on)")
    return DataBundle(train=push if push is not None else test, val=test, test=test, push=push,
                      class_names=list(model.class_names), image_size=test.image_size,
                      has_masks=test.has_masks, has_boxes=test.has_boxes)


def training_data(model: ZooModel, train_data, val_data=None, push_data=None, *,
                  val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """The :class:`DataBundle` a run of ``model`` trains on, built from the caller's data and
    checked against the sample contract (see the module doc)."""
    if isinstance(train_data, DataBundle):
        if val_data is not None or push_data is not None:
            raise UserError("train_data is a DataBundle, which holds its own val and push "
                            "splits: drop val_data and push_data")
        check_classes(model, train_data.class_names, "train_data")
        return train_data
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), "
                        "or pass val_data")
    train = adapt(train_data, "train_data", model.mean, model.std)
    names = _class_names(model, train, "train_data", adopt=True)
    check_samples(train, "train_data", len(names), model.sample_fields)
    push = train
    if push_data is not None:
        push = adapt(push_data, "push_data", model.mean, model.std)
        check_samples(push, "push_data", len(names), model.sample_fields)
        if len(push) != len(train) or push.labels != train.labels:
            raise DataError("push_data must hold train_data's items in the same order (without "
                            f"augmentation); it has {len(push)} items against {len(train)}, or "
                            "other labels")
    if val_data is None:
        kept, held = stratified_split(train.labels, val_fraction, seed)
        if held.size == 0:
            raise DataError("train_data is too small for a validation split: give every class "
                            "at least 2 items, or pass val_data")
        val, train, push = train.subset(held), train.subset(kept), push.subset(kept)
    else:
        val = adapt(val_data, "val_data", model.mean, model.std)
        check_samples(val, "val_data", len(names), model.sample_fields)
        if val.image_size != train.image_size:
            raise DataError(f"val_data's images are {val.image_size} px but train_data's are "
                            f"{train.image_size} px: give both one size")
    return DataBundle(train=train, val=val, test=val, push=push, class_names=names,
                      image_size=int(train.image_size), has_masks=bool(train.has_masks),
                      has_boxes=bool(train.has_boxes))


def _class_names(model: ZooModel, dataset, what: str, adopt: bool) -> list[str]:
    """The classes of ``dataset`` (its ``classes``), which must be as many as the model's. A
    model whose class names are only numbers takes the data's names (``adopt``: reports and
    checkpoints then show them)."""
    found = getattr(dataset, "class_names", None)
    if not found:
        return list(model.data_class_names)
    if len(found) != model.num_classes:
        raise DataError(f"{what} has {len(found)} classes ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}) but the model has "
                        f"{model.num_classes}: build the model with num_classes={len(found)}")
    numbered = list(model.class_names) == [str(k) for k in range(model.num_classes)]
    if adopt and numbered:
        model.class_names = list(found)
    return list(model.class_names) if numbered else list(found)


def _check_model(model) -> None:
    if not isinstance(model, ZooModel):
        raise UserError(f"model is a {type(model).__name__}: give a zoo model "
                        "(protozoo.create_model(...), or a model family's class)")
    if not model.model_name:
        raise UserError(f"model class {type(model).__name__} is not registered: register it "
                        "with @protozoo.register_model('name') so runs and checkpoints can "
                        "rebuild it")


# ----------------------------------------------------------------------------- the run
def run_training(cfg: TrainConfig, model, data: DataBundle, run_dir, dist: DistInfo, *,
                 resume: dict | None = None, cli: bool = False) -> list[dict]:
    """What :func:`train` and ``train.py`` share: a new run checks the schedule and one forward
    pass before its folder is made (``run_dir`` None: no files), writes its config, prints the
    data and the schedule in full, then runs the engine; a resumed run continues its folder.
    The folder is held by :func:`protozoo.runfolder.run_folder` throughout: one writer, and a
    run that fails before its first checkpoint leaves no folder behind."""
    if resume is None:
        model.backbone.check_input(torch.zeros(1, 3, data.image_size, data.image_size))
        dry_run(model, data, cfg, cli)
        run_dir = agree_run_dir(run_dir, dist)
    elif run_dir is not None:
        run_dir = Path(run_dir)
    model.metadata["image_size"] = data.image_size
    with contextlib.ExitStack() as stack:
        error = None
        if run_dir is not None and dist.is_main:
            try:
                stack.enter_context(run_folder(run_dir, new=resume is None, cli=cli))
            except UserError as exc:
                error = exc
        if dist.enabled and run_dir is not None:  # every process stops, not only rank 0
            holder = [None if error is None else str(error)]
            torch.distributed.broadcast_object_list(holder, src=0)
            if error is None and holder[0] is not None:
                error = UserError(holder[0])
        if error is not None:
            raise error
        if dist.is_main:
            if run_dir is not None:
                cfg.out = str(run_dir)
                cfg.save(run_dir / RUN_CONFIG)
            items, classes = (("questions", "answers") if data.vocab is not None
                              else ("images", "classes"))
            where = f", run {run_dir}" if run_dir is not None else ""
            print(f"training {cfg.model} ({cfg.backbone}) on {cfg.dataset}: {len(data.train)} "
                  f"train / {len(data.val)} val" + (f" / {len(data.test)} test" if cli else "")
                  + f" {items}, {len(data.class_names)} {classes}, device {dist.device}{where}",
                  flush=True)
            print(f"schedule ({cfg.schedule}):\n{describe_schedule(model.phases(cfg))}",
                  flush=True)
        return Trainer(cfg, model, data, run_dir, dist).fit(resume)


def dry_run(model, data, cfg: TrainConfig, cli: bool = False) -> None:
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
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        if cli and not given:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("check the --model-arg values (" + " ".join(f"{k}={v}" for k, v in given.items())
                + ")" if cli else "check the model's arguments and the data's samples")
        raise UserError(f"model '{cfg.model}' fails on a batch of {cfg.dataset} ({first}); "
                        f"{hint}") from None
    finally:
        model.train(was_training)


def agree_run_dir(run_dir, dist: DistInfo) -> Path | None:
    """The run folder every process uses (rank 0's, under DDP); rank 0 alone writes it."""
    if dist.enabled:  # every process must agree on the folder
        holder = [None if run_dir is None else str(run_dir)]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    return None if run_dir is None else Path(run_dir)


def default_run_dir(cfg: TrainConfig) -> str:
    return cfg.out or f"runs/{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- resume
def model_from_state(state: dict, source: str):
    """The model a resume state (``train_state.pt``) holds, rebuilt from its config alone."""
    name, saved = state["model_name"], json.loads(state["model_config"])
    model = create_model(name, **saved_kwargs(name, {**saved, "pretrained": False}))
    model.init_kwargs = {k: v for k, v in saved.items() if k != "class_names"}
    restore_state(model, state, source)
    return model


def restore_state(model, state: dict, source: str) -> None:
    """Load a resume state into ``model`` in place. A model whose architecture changed since
    it was built (a ProtoPNet pruned during the run) is first rebuilt, in place, from the
    state's config, so the caller's reference stays the trained model."""
    saved = json.loads(state["model_config"])
    if saved != model.config():
        name = state["model_name"]
        fresh = create_model(name, **saved_kwargs(name, {**saved, "pretrained": False}))
        model.__dict__.update(fresh.__dict__)  # parameters, buffers, modules and attributes
        model.init_kwargs = {k: v for k, v in saved.items() if k != "class_names"}
    model.metadata = json.loads(state["metadata"])
    checkpoint.load_state(model, state["model"], source=source)


def _resume_state(model, run_dir, cfg: TrainConfig) -> dict:
    """The state ``resume=True`` continues, checked against the model and the settings."""
    if run_dir is None:
        raise UserError("resume=True continues a run folder: pass its run_dir")
    run_dir = Path(run_dir)
    if never_started(run_dir):
        raise UserError(f"'{run_dir}' holds no {RUN_CONFIG} (its run was stopped as it started, "
                        "so nothing is lost): call protozoo.train(..., run_dir) without "
                        "resume=True; it starts over in place")
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(f"'{run_dir}' is not a run folder (no {RUN_CONFIG}); pass the run_dir "
                        "of an earlier protozoo.train run, or drop resume=True")
    saved = read_run_config(run_dir)
    state = read_resume_state(run_dir, cli=False)
    if state["model_name"] != model.model_name:
        raise UserError(f"'{run_dir}' holds a '{state['model_name']}' model, not a "
                        f"'{model.model_name}': pass the model it trained, or another run_dir")
    for key in _RUN_SETTINGS:
        if getattr(cfg, key) != getattr(saved, key):
            raise UserError(f"resume=True continues '{run_dir}' with its saved settings, but "
                            f"{key}={getattr(cfg, key)!r} differs from its "
                            f"{getattr(saved, key)!r}: pass the same value, or a new run_dir")
    restore_state(model, state, str(run_dir / "train_state.pt"))
    return state
