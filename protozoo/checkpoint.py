"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``. Loading never unpickles.

``config.json`` holds everything that rebuilds the model: the registered model name, its
constructor arguments, class names, input normalisation and size, free-form metadata (e.g.
ProtoPNet's push provenance), the format version, and the SHA-256 of the weights file. Each file is
written atomically (weights first, config last), and loading checks the hash, so an interrupted
save is reported instead of silently mixing two versions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError, UserError
from .fileio import atomic_path, atomic_write_text, sha256_file
from .registry import create_model, saved_kwargs
from .runtime import resolve_device
from .version import __version__
# re-exported: the layout and the state-dict helpers live in the leaf protozoo.weights
from .weights import (CONFIG, FORMAT_VERSION, REQUIRED_KEYS, WEIGHTS,  # noqa: F401
                      is_checkpoint_weights, load_state)


def save(model, run_dir: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write ``model`` to ``run_dir`` (created if needed); returns the directory."""
    from safetensors.torch import save_file

    if not getattr(model, "model_name", ""):
        raise CheckpointError(f"model class {type(model).__name__} is not registered: register "
                              "it with @protozoo.register_model('name') so protozoo.load can "
                              "rebuild it")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"'{run_dir}' is a file; a checkpoint is a folder (model.safetensors"
                              " + config.json): pass a folder path")
    run_dir.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied or sliced parameters).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        digest = sha256_file(tmp)
    config = {
        "format_version": FORMAT_VERSION,
        "protozoo_version": __version__,
        "model": model.model_name,
        "kwargs": model.config(),
        "class_names": list(model.class_names),
        "normalization": {"mean": list(model.mean), "std": list(model.std)},
        "image_size": image_size if image_size is not None else model.metadata.get("image_size"),
        "metadata": model.metadata,
        "weights_sha256": digest,
    }
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2))
    return run_dir


def read_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint folder '{run_dir}' not found; pass a run directory "
                              "written by train.py or protozoo.save")
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' has no {CONFIG}: it is not a protozoo checkpoint (or "
                              "training has not finished its first epoch yet)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"'{path}' is not valid JSON; restore it from the run or re-save "
                              "the model") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise CheckpointError(f"'{path}' lacks {', '.join(missing)}: it is not a protozoo "
                              "checkpoint config (or was edited); restore it or re-save the model")
    if not isinstance(config["kwargs"], dict) or not isinstance(config["class_names"], list):
        raise CheckpointError(f"'{path}' must hold kwargs as an object and class_names as a "
                              "list: it was edited; restore it or re-save the model")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has format version {version}, this protozoo reads "
                              f"version {FORMAT_VERSION}; use a matching protozoo release")
    return config


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a model from a checkpoint directory alone (no pickle), in eval mode."""
    from safetensors.torch import load_file

    device = resolve_device(str(device))  # an unknown name or a missing GPU: one-line error
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"'{run_dir}' has {CONFIG} but no {WEIGHTS}; the checkpoint is "
                              "incomplete, re-save the model")
    if config.get("weights_sha256") and sha256_file(weights) != config["weights_sha256"]:
        raise CheckpointError(f"'{weights}' does not match its {CONFIG} (a save was interrupted "
                              "or a file was replaced); re-save, or resume the run with --resume")
    kwargs = dict(config["kwargs"])
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False  # the weights come from the checkpoint, never the network
    try:  # an edited config.json (num_classes against class_names, a wrong type) fails here
        model = create_model(config["model"], **saved_kwargs(config["model"], kwargs))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, UserError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"'{run_dir / CONFIG}' does not describe a model that can be "
                              f"built ({first}): it was edited or damaged; restore it from a "
                              "copy, or re-save the model") from None
    model.init_kwargs = {k: v for k, v in config["kwargs"].items() if k != "class_names"}
    model.class_names = list(config["class_names"])
    model.metadata = dict(config.get("metadata") or {})
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors' SafetensorError: truncated or not safetensors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"'{weights}' cannot be read ({first}): the weights file is "
                              "truncated or damaged; restore it from a copy, or re-save the "
                              "model (an unfinished run rewrites it: train.py --resume)") from None
    load_state(model, state, source=str(weights))
    return model.to(device).eval()
