"""Report dispatch: each family names its own report writer (``ZooModel.report_writer``, e.g.
``"protozoo.render.cam_report:write_cam_report"``); this resolves and runs it. A model that names
none gets the page of its metrics alone."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .html import metrics_table, write_page


def write_report(model, data, out_dir: Path, metrics: dict, images=None) -> Path:
    """Write ``out_dir/index.html`` (+ PNGs) for ``model`` on ``data``'s test split."""
    return report_writer(model)(model, data, Path(out_dir), metrics, images=images)


def report_writer(model) -> Callable:
    """The function named by ``model.report_writer`` ("module:function"), or
    :func:`write_accuracy_report` when it names none."""
    spec = getattr(model, "report_writer", None)
    if spec is None:
        return write_accuracy_report
    module, _, name = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"model '{model.model_name}' names the report writer '{spec}', which "
                        "cannot be imported: give it as 'package.module:function'") from None


def write_accuracy_report(model, data, out_dir: Path, metrics: dict, images=None) -> Path:
    """The report of a family without one of its own: the metrics page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_page(out_dir / "index.html", f"Report — {model.model_name}", metrics_table(metrics))
    return out_dir / "index.html"
