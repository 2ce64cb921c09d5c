"""The training the explanation checks need, through the project's one training loop
(:class:`protozoo.engine.Trainer`, the model's own schedule): an untrained copy of a model, a
copy trained on shuffled labels (Adebayo et al. 2018's data randomisation test), and a model
retrained on modified images (ROAR, Hooker et al. 2019). The only module of
:mod:`protozoo.explain` that touches the engine.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..registry import create_model, saved_kwargs


def fresh_copy(model, seed: int = 0):
    """A randomly initialised model of the same family and constructor arguments (pretrained
    weights off), initialised from ``seed``; in eval mode."""
    kwargs = {k: v for k, v in model.config().items()}
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy = create_model(model.model_name, **saved_kwargs(model.model_name, kwargs))
    return copy.eval()


def train_model(model, data, *, epochs: int | None = None, lr: float | None = None,
                batch_size: int = 64, seed: int = 0, device="cpu", quiet: bool = True):
    """Train ``model`` in place on ``data`` (a :class:`~protozoo.data.DataBundle`) with its
    family's schedule (``epochs``, ``lr``: as train.py's flags), writing no files; returns it in
    eval mode."""
    import contextlib
    import io

    from ..engine import Trainer
    from ..runtime import DistInfo, resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    cfg = TrainConfig.from_dict({"model": model.model_name, "epochs": epochs, "lr": lr,
                                 "batch_size": batch_size, "seed": seed, "device": str(device),
                                 "amp": "off"}, source="protozoo.explain.training")
    torch.manual_seed(seed)
    out = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        Trainer(cfg, model, data, None, DistInfo(0, 1, device)).fit()
    return model.eval()


class RelabelledDataset(Dataset):
    """``dataset`` with item ``i``'s label replaced by ``labels[i]``."""

    def __init__(self, dataset: Dataset, labels):
        self.dataset, self.labels = dataset, [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "label": self.labels[i]}


def dataset_labels(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return np.asarray(labels, dtype=np.int64)
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)


def shuffled_labels_data(data, seed: int = 0):
    """``data`` with the labels of its training split (and of ``push``, the same items, in the
    same order) permuted at random, and of ``val`` permuted separately; test is untouched."""
    rng = np.random.default_rng(seed)
    train = dataset_labels(data.push)
    perm = rng.permutation(len(train))
    val = dataset_labels(data.val)
    return dataclasses.replace(
        data, train=RelabelledDataset(data.train, train[perm]),
        push=RelabelledDataset(data.push, train[perm]),
        val=RelabelledDataset(data.val, val[rng.permutation(len(val))]))


def train_random_labels(model, data, *, epochs: int | None = None, lr: float | None = None,
                        batch_size: int = 64, seed: int = 0, device="cpu"):
    """Adebayo et al.'s data randomisation test model: a fresh copy of ``model`` trained with
    the same schedule (pass the ``epochs`` and ``lr`` the model was trained with, so it takes
    the same steps) on ``data`` with shuffled training labels."""
    copy = fresh_copy(model, seed)
    return train_model(copy, shuffled_labels_data(data, seed), epochs=epochs, lr=lr,
                       batch_size=batch_size, seed=seed, device=device)


class TensorImages(Dataset):
    """Images already normalised in memory (``[N, C, H, W]``) with their labels, as dataset
    items (``image``, ``label``, ``index``); what ROAR retrains on."""

    def __init__(self, images: torch.Tensor, labels):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i}
