"""protozoo: an interpretable-by-design model zoo for PyTorch.

>>> import protozoo
>>> model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=5)
>>> history = protozoo.train(model, train_data, epochs=3)    # any Dataset of (image, label)
>>> metrics = protozoo.evaluate(model, test_data, report_dir="report")
>>> out = model(images)          # a dataclass: out.logits, out.cams, out.stride
>>> protozoo.save(model, "runs/my-cam")
>>> same = protozoo.load("runs/my-cam")

What a dataset must yield: :mod:`protozoo.data.contract`.
"""
from __future__ import annotations

from .version import __version__
from . import models  # noqa: E402,F401  (registers the model families)
from .api import evaluate, train  # noqa: E402
from .backbones import create_backbone, list_backbones  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .data import list_datasets, register_dataset  # noqa: E402
from .errors import CheckpointError, DataError, UserError  # noqa: E402
from .registry import create_model, list_models, register_model  # noqa: E402

__all__ = ["create_model", "list_models", "register_model", "create_backbone", "list_backbones",
           "train", "evaluate", "register_dataset", "list_datasets", "save", "load",
           "UserError", "DataError", "CheckpointError", "__version__"]
