"""Dataclass configs: what a training run is (``TrainConfig``) and what a training phase is.

A run is resolved from, in increasing priority: the dataclass defaults, a YAML file
(``--config``), then command-line flags. The resolved config is saved in the run directory as
``train_config.json`` so a run can be resumed or reproduced from it alone.

Why this module is a leaf (it imports only :mod:`protozoo.errors` and :mod:`protozoo.fileio`):
families declare their schedules as :class:`Phase` data chosen from the run's
:class:`TrainConfig` (``model.phases(cfg)``), the registry checks constructor arguments with
:func:`check_type`, and the engine, the evaluation and the command line read the same config.
Keeping both dataclasses here, below all of them, lets every layer read a run's settings
without an import cycle; splitting ``Phase`` into a module of its own would still leave the
families reading ``TrainConfig``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass
class Phase:
    """One training phase, as data, so one engine loop serves every family.

    ``lrs`` maps the model's parameter groups (``model.param_groups()``) to learning rates; groups
    not named are frozen. A phase with ``action`` set (``"push"``, ``"prune"``) trains nothing: the
    engine calls ``model.actions()[action](context)`` once and logs what it returns.
    """

    name: str
    epochs: int = 0
    lrs: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    action: str | None = None
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" or "cosine" (over the phase's epochs)


def describe_schedule(phases: list[Phase]) -> str:
    """The schedule in full, one phase a line: epochs, learning rate per parameter group (the
    others frozen), loss weights; or the action."""
    lines = []
    for n, phase in enumerate(phases, 1):
        if phase.action:
            lines.append(f"  {n}. {phase.name}: action '{phase.action}'")
            continue
        lrs = ", ".join(f"{group} {lr:.3g}" for group, lr in phase.lrs.items())
        extra = [f"{phase.schedule} lr"]
        if phase.weight_decay:
            extra.append(f"weight decay {phase.weight_decay:g}")
        if phase.loss_weights:
            extra.append("loss " + ", ".join(f"{k} {v:g}" for k, v in phase.loss_weights.items()))
        lines.append(f"  {n}. {phase.name}: {phase.epochs} epochs, lr {lrs}; {'; '.join(extra)}")
    return "\n".join(lines)


@dataclass
class TrainConfig:
    model: str = "protopnet"
    backbone: str | None = None  # None: the model family's default (ProtoPNet tiny_cnn_rf10, ...)
    pretrained: Any = False  # False, True (timm weights) or a path to a weights file
    stage: int = -1
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "synthetic-parts"
    data_dir: str | None = None
    cache_dir: str | None = None
    image_size: int | None = None
    num_classes: int | None = None
    num_train: int | None = None
    num_test: int | None = None
    val_fraction: float = 0.1
    augment: bool = False
    epochs: int | None = None  # None: the family's default schedule for this dataset
    batch_size: int = 64
    lr: float | None = None  # None: the family's default learning rates
    weight_decay: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=dict)
    schedule: str = "auto"  # family-specific schedule name (ProtoPNet: auto, short, paper)
    device: str = "auto"
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU), off, bf16, fp16
    channels_last: bool = False
    seed: int = 0
    workers: int = 0
    out: str | None = None
    report: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)} in {source}; valid keys: "
                            f"{', '.join(sorted(known))}")
        values = dict(values)
        for key in ("loss_weights", "model_args"):  # YAML 1.1 reads "1e-4" as a string
            if isinstance(values.get(key), dict):
                values[key] = {k: _yaml_number(v) for k, v in values[key].items()}
        for name, hint in typing.get_type_hints(cls).items():  # a YAML typo ("epochs: ten")
            if name not in values:  # fails here, not mid-run
                continue
            if float in _members(hint) and isinstance(values[name], str):
                try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                    values[name] = float(values[name])
                except ValueError:
                    pass
            check_type(values[name], hint, f"'{name}' in {source}")
        config = cls(**values)
        config.check(source)
        return config

    # (field, lowest allowed value, inclusive?) for the numbers a run cannot work without
    # (the image size is checked once, by build_data, which every entry point goes through)
    _LIMITS = (("epochs", 1, True), ("batch_size", 1, True), ("lr", 0, False),
               ("weight_decay", 0, True), ("workers", 0, True), ("num_classes", 1, True))
    AMP = ("auto", "off", "bf16", "fp16")

    def check(self, source: str = "config") -> None:
        """One-line UserErrors for values no run can use (``--epochs 0``, a negative learning
        rate, an unknown ``--amp``), before anything is built or written."""
        for name, low, inclusive in self._LIMITS:
            value = getattr(self, name)
            if value is not None and (value < low if inclusive else value <= low):
                bound = f">= {low}" if inclusive else f"> {low}"
                raise UserError(f"'{name}' in {source} must be {bound}, got {value}; fix the "
                                "value or leave it unset for the default")
        if self.amp not in self.AMP:
            raise UserError(f"'amp' in {source} must be one of {', '.join(self.AMP)}, got "
                            f"'{self.amp}'")
        for term, weight in self.loss_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise UserError(f"loss weight '{term}' in {source} must be a number, got "
                                f"{weight!r}; e.g. --loss-weight {term}=0.8")

    def save(self, path: Path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value):
    """``"1e-4"`` -> 1e-4: YAML 1.1 (PyYAML) reads exponents without a dot as strings."""
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) \
        else value


def _members(hint) -> tuple:
    """The types of a union (``int | None`` -> ``(int, NoneType)``), else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def has_type(value, hint) -> bool:
    """Whether ``value`` fits the type ``hint`` (a real type, as :func:`typing.get_type_hints`
    returns it): a union if one member fits; a container by its kind, not its items
    (``dict[str, float]`` takes any dict); an int is a float, a bool is no number, a list is a
    tuple (JSON has no tuples); ``Any``, and a kind of hint not handled here, take everything."""
    if hint is typing.Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(has_type(value, member) for member in _members(hint))
    hint = typing.get_origin(hint) or hint
    if not isinstance(hint, type):
        return True
    if isinstance(value, bool) and hint in (int, float):
        return False
    accepted = {float: (int, float), list: (list, tuple), tuple: (list, tuple)}.get(hint, hint)
    return isinstance(value, accepted)


def type_name(hint) -> str:
    """How an error names a type hint: ``int | None``, ``dict[str, Any]``, ``true or false``."""
    if hint is bool:
        return "true or false"
    return _name(hint)


def _name(hint) -> str:
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_name(member) for member in _members(hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is not None and args:
        return f"{_name(origin)}[{', '.join(_name(a) for a in args)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_type(value, hint, what: str) -> None:
    """A one-line UserError when ``value`` does not fit the type ``hint`` (see :func:`has_type`)."""
    if not has_type(value, hint):
        raise UserError(f"{what} must be {type_name(hint)}, got {value!r}; fix the value")


RUN_CONFIG = "train_config.json"


def read_config_json(path: Path) -> dict:
    """A run's saved config (``train_config.json``) as a dict; a damaged file is a one-line error
    that names it."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' cannot be read as JSON ({type(exc).__name__}): the run's "
                        "config is damaged; restore it from a copy or start a new run") from None
    if not isinstance(values, dict):
        raise UserError(f"'{path}' must hold a JSON object of option: value; restore it from a "
                        "copy or start a new run")
    return values


def read_run_config(run_dir) -> TrainConfig:
    """The resolved config a ``train.py`` run saved in its folder."""
    path = Path(run_dir) / RUN_CONFIG
    return TrainConfig.from_dict(read_config_json(path), source=str(path))


def read_yaml(path: str) -> dict:
    """Read a YAML config file into a dict, with one-line errors for the usual mistakes."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file '{path}' must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
