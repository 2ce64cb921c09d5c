"""The base class every zoo model derives from: what the engine, checkpoints and reports rely on.

A family overrides only what differs from a plain image classifier: its ``forward`` (returning a
dataclass from :mod:`protozoo.outputs`), ``objective`` (its loss terms), ``param_groups`` and
``phases`` (its training schedule as data), and optionally ``tasks`` (the data and loss of a
step phase, :class:`StepTask`, e.g. ``han``'s ``describe`` pretraining), ``actions`` (steps like
ProtoPNet's push that run between phases) and ``inputs`` (VQA models also take a question).

Its policies are declared here too, so generic code asks the model instead of testing its name:
``report_writer`` (the report :func:`protozoo.render.reports.write_report` draws),
``data_class_names`` (the classes its data is checked against), ``data_args`` (what it dictates
to the data it is evaluated on), ``from_config`` (how ``train.py`` builds it) and ``base_run`` /
``inherited_config`` (for a family that extends a trained run, ``train.py --base RUN``),
``sample_fields`` (what every item of its data must carry, checked before training) and
``uses_training_images`` (its metrics and report read the push set).

A model built directly (``CAMNet(num_classes=3)``) records its registered name and constructor
arguments like one built by :func:`protozoo.create_model`, so it saves and loads.

Adding a family: a module with a subclass registered by
:func:`protozoo.registry.register_model`, imported in :mod:`protozoo.models`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

from .. import losses
from ..backbones import Backbone, create_backbone
from ..config import Phase, TrainConfig
from ..errors import UserError
from ..registry import MODELS, create_model


def _recording(init: Callable) -> Callable:
    """Wrap a family's ``__init__`` so that a model built directly (``CAMNet(num_classes=3)``)
    records, like one built by :func:`protozoo.create_model`, its registered name and every
    constructor argument with its default (what :func:`protozoo.save` writes so that
    :func:`protozoo.load` can rebuild it). Only the most derived constructor records: a
    family's ``super().__init__(...)`` call does not overwrite its subclass's record."""
    signature = inspect.signature(init)
    plain = [name for name, p in signature.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]  # not ``self``
    extra = next((name for name, p in signature.parameters.items()
                  if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(init)
    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is recording_init:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = {name: bound.arguments[name] for name in plain}
            values.update(bound.arguments.get(extra) or {})
            self.init_kwargs = values
            self.model_name = MODELS.name_of(type(self)) or ""

    return recording_init


class StepTask:
    """What a step phase (:class:`protozoo.config.Phase` with ``steps`` and ``task``) trains on
    and for, when that is not the model's own ``objective`` over its training set: the engine
    draws batches from :meth:`train_set` (with replacement, seeded), optimises ``"loss"`` of
    :meth:`terms` under the run's autocast and DDP, checkpoints and resumes it like an epoch
    phase, and validates :meth:`terms` on :meth:`val_set` at the phase's end."""

    eval_batch_size: int | None = None  # the validation batch; None: the run's --batch-size

    def train_set(self, data) -> torch.utils.data.Dataset:
        """The items the phase's batches are drawn from (``data``: the run's DataBundle)."""
        raise NotImplementedError

    def val_set(self, data) -> torch.utils.data.Dataset | None:
        """The items its validation terms are averaged over; None: no validation."""
        return None

    def terms(self, model: ZooModel, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of ``model`` on a batch (already on the device); ``"loss"`` is optimised,
        every term is logged (``train/NAME``, ``val/NAME``)."""
        raise NotImplementedError


class ZooModel(nn.Module):
    """Backbone + family head. Subclasses build ``self.backbone`` through :meth:`_init_backbone`."""

    model_name: str = ""  # the registered name (set when built, directly or by create_model)
    init_kwargs: dict = {}  # every constructor argument, recorded when built
    default_batch_size: int = 64  # train.py's --batch-size when neither flag nor config sets it
    explains_images: bool = True  # can its report explain a user's image file (--images)?
    task: str = "classify"  # or "vqa": which datasets it trains on (train.py checks the pair)
    # The explanation metrics that need a ground-truth field of the data ("masks", "boxes"): when
    # the data lacks it, evaluation says once which of them it cannot compute.
    ground_truth_metrics: dict[str, tuple[str, ...]] = {}
    # What one test item is: "image", or e.g. "question" when several items share an image;
    # then metrics.json counts both (num_test_questions, and num_test_images distinct images).
    test_item: str = "image"
    loss_terms: tuple[str, ...] = ()  # the weights ``objective`` takes (--loss-weight TERM=W)
    schedules: tuple[str, ...] = ("auto",)  # the --schedule names ``phases`` knows
    # The family's report, as "module:function" (a function like
    # protozoo.render.cam_report.write_cam_report); None: the page of metrics alone. A name, not
    # the function, because the renderers import the families' algorithms, not the other way.
    report_writer: str | None = None
    # How its maps at feature resolution are upsampled to pixels (protozoo.maps.upsample mode).
    map_upsampling: str = "bilinear"
    # What a run this family extends must be (train.py --base RUN; said in the error when it is
    # missing); None: the family trains from scratch and --base is an error.
    base_run: str | None = None
    # The fields every item of its data must have (protozoo.data.contract checks them once,
    # before training); VQA families add the question.
    sample_fields: tuple[str, ...] = ("image", "label")
    # Do its metrics and report read the training images (``DataBundle.push``, e.g. the patches
    # ProtoPNet's prototypes were projected onto)? protozoo.evaluate then needs ``push_data``.
    uses_training_images: bool = False
    # Constructor arguments added after the family was first saved whose default is not what an
    # earlier model computed: a checkpoint or resume state without one loads with this value
    # (``protozoo.registry.saved_kwargs``), so an old run is still the model it trained.
    absent_kwargs: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__dict__["__init__"])

    def _init_backbone(self, backbone: str, pretrained, stage: int,
                       num_classes: int | None, class_names: list[str] | None) -> Backbone:
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names given")
        if num_classes is None:
            if class_names is None:
                raise ValueError("give num_classes or class_names")
            num_classes = len(class_names)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.backbone = create_backbone(backbone, pretrained=pretrained, stage=stage)
        # Free-form JSON metadata saved with the checkpoint (e.g. ProtoPNet's push provenance).
        self.metadata: dict = {}
        return self.backbone

    # ---------------------------------------------------------------- what checkpoints store
    def config(self) -> dict:
        """Constructor keyword arguments that rebuild this model (weights aside)."""
        return {**self.init_kwargs, "class_names": self.class_names}

    @property
    def data_class_names(self) -> list[str]:
        """The classes of the data it trains on, which evaluation checks the data against (a head
        that adds classes known only by description classifies over more)."""
        return self.class_names

    def data_args(self) -> dict:
        """Arguments of :func:`protozoo.data.build_data` this model dictates when the data is
        rebuilt for it (e.g. the vocabulary it encodes questions with)."""
        return {}

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    @property
    def stride(self) -> int:
        return self.backbone.stride

    # ---------------------------------------------------------------- how train.py builds it
    @classmethod
    def from_config(cls, cfg: TrainConfig, data, base: ZooModel | None = None) -> ZooModel:
        """The model a run trains: ``cfg.model`` with the constructor arguments the data dictates
        (``data.model_kwargs``, e.g. a vocabulary), then the run's backbone, weights, stage and
        ``--model-arg`` values (names and types checked by :func:`protozoo.registry.create_model`).
        ``base`` is the model of the run given by ``--base``, for families with a ``base_run``."""
        kwargs = dict(backbone=cfg.backbone, class_names=data.class_names,
                      **{**data.model_kwargs, **cfg.model_args})
        if cfg.pretrained:
            kwargs["pretrained"] = cfg.pretrained
        if cfg.stage != -1:
            kwargs["stage"] = cfg.stage
        try:
            return create_model(cfg.model, **kwargs)
        except ValueError as exc:  # a --model-arg value the constructor rejects
            raise UserError(f"model '{cfg.model}': {exc}; fix the --model-arg value") from None

    @classmethod
    def inherited_config(cls, run_config: dict, checkpoint_config: dict) -> dict:
        """The run settings a family with a ``base_run`` takes from that run unless the command
        line gives them: from its ``train_config.json`` (``run_config``; empty for a bare
        checkpoint) and its checkpoint's ``config.json`` (``checkpoint_config``)."""
        return {}

    # ---------------------------------------------------------------- what the engine calls
    def inputs(self, batch: dict) -> tuple:
        """The positional arguments of ``forward`` taken from a data batch."""
        return (batch["image"],)

    def objective(self, output, batch: dict, **weights: float) -> dict[str, torch.Tensor]:
        """Loss terms; key ``"loss"`` is the total that is optimised, the rest are logged."""
        ce = losses.cross_entropy(output.logits, batch["label"])
        return {"loss": ce, "cross_entropy": ce}

    def check_training(self, cfg: TrainConfig) -> None:
        """One-line UserErrors for ``--loss-weight`` terms and a ``--schedule`` this family does
        not have (they would be ignored, or fail after the run folder is written)."""
        name = self.model_name or type(self).__name__
        unknown = sorted(set(cfg.loss_weights) - set(self.loss_terms))
        if unknown:
            terms = (f"its terms are {', '.join(self.loss_terms)}" if self.loss_terms else
                     "it has no weighted loss terms (its docstring lists the model arguments)")
            raise UserError(f"model '{name}' has no loss term {', '.join(unknown)} for "
                            f"--loss-weight: {terms}")
        if cfg.schedule not in self.schedules:
            raise UserError(f"model '{name}' has no schedule '{cfg.schedule}': use one of "
                            f"{', '.join(self.schedules)}")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return {"backbone": backbone, "head": [p for p in self.parameters() if id(p) not in ids]}

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        """Default schedule: one phase training everything at ``cfg.lr`` (Adam, cosine decay).

        Without ``--epochs``: 3 epochs for a backbone trained from scratch (a tiny CNN reaches
        1.00 test accuracy on synthetic-parts in 3, measured), 30 to fine-tune pretrained
        weights. The dataset's name plays no part; train.py prints the schedule first."""
        lr = cfg.lr if cfg.lr is not None else 1e-3
        epochs = cfg.epochs if cfg.epochs is not None else (30 if cfg.pretrained else 3)
        return [Phase("train", epochs, {g: lr for g in self.param_groups()},
                      weight_decay=cfg.weight_decay, schedule="cosine")]

    def tasks(self) -> dict[str, StepTask]:
        """The tasks its step phases name (``Phase.task``)."""
        return {}

    def actions(self) -> dict[str, Callable]:
        return {}

    def explanation_metrics(self, output, batch: dict) -> dict[str, torch.Tensor]:
        """Per-image scores of the model's explanations against ground truth (masks, boxes) for
        one batch, as ``{name: tensor [B]}``; evaluation averages them over the test split."""
        return {}

    def dataset_metrics(self, data, amp: str = "auto") -> dict[str, float]:
        """Metrics of the model as a whole against ground truth in ``data`` (e.g. ProtoPNet's
        ``prototype_purity`` over the push set); evaluation adds them to ``metrics.json``.
        ``amp``: the precision of any inference they run (``--amp``, as for the test metrics)."""
        return {}

    def intrinsic_map(self, output, target: torch.Tensor) -> torch.Tensor | None:
        """The model's own explanation of class ``target[b]`` as one map ``[B, h, w]`` at feature
        resolution (larger = more evidence), from the output of its forward pass; ``None`` for a
        family without one. :mod:`protozoo.explain` compares it with post-hoc explainers."""
        return None

    def eval_forward(self, *inputs):
        """The forward pass in eval mode (BatchNorm's running statistics, no dropout), the
        model's mode restored afterwards: what ``explain`` methods show."""
        was_training = self.training
        self.eval()
        try:
            return self(*inputs)
        finally:
            self.train(was_training)

    def logits_view(self) -> nn.Module:
        """A module whose forward returns the logits tensor only, sharing this model's
        parameters: ``forward(x)`` for an image classifier (what Grad-CAM, Captum,
        ``torch.export`` and ONNX export expect), ``forward(*inputs)`` for a model that takes
        more than an image (VQA: ``model.inputs(batch)``)."""
        return LogitsView(self) if self.task == "classify" else InputsLogitsView(self)


class LogitsView(nn.Module):
    """Wraps an image model so ``forward(x)`` returns ``model(x).logits`` ``[B, K]``."""

    def __init__(self, model: ZooModel):
        super().__init__()
        self.model = model
        self.train(model.training)  # the model's mode (an exported eval model stays in eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class InputsLogitsView(nn.Module):
    """Wraps a model of several inputs so ``forward(*inputs)`` returns its logits."""

    def __init__(self, model: ZooModel):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, *inputs) -> torch.Tensor:
        return self.model(*inputs).logits
