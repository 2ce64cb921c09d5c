"""State dicts in and out of modules, and the files of a checkpoint folder.

A leaf of the package (DESIGN.md, "Layering"): the backbones (a ``--pretrained`` weights file)
and :mod:`protozoo.checkpoint` (a model folder) both load weights through :func:`load_state`, and
both must tell a whole protozoo checkpoint from bare weights (:func:`is_checkpoint_weights`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REQUIRED_KEYS = ("model", "kwargs", "class_names")  # what rebuilds the model


def is_checkpoint_weights(path: str | os.PathLike) -> bool:
    """Is ``path`` the weights file of a protozoo checkpoint folder (a ``config.json`` beside it
    with protozoo's keys)? timm's downloads also keep a ``config.json`` beside
    ``model.safetensors``, so the name alone does not tell."""
    config = Path(path).parent / CONFIG
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"format_version", *REQUIRED_KEYS} <= set(values)


def load_state(model, state: dict, source: str) -> None:
    """``load_state_dict`` with a one-line error naming what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"checkpoint '{source}' does not match model "
                              f"'{getattr(model, 'model_name', type(model).__name__)}': "
                              f"{'; '.join(parts)}; build the model with the checkpoint's "
                              "config.json (protozoo.load) or pick the right run directory")
    model.load_state_dict(state)
