"""Report dispatch: each model family renders its own explanations; this picks the writer."""
from __future__ import annotations

from pathlib import Path


def write_report(model, data, out_dir: Path, metrics: dict, images=None) -> Path:
    """Write ``out_dir/index.html`` (+ PNGs) for ``model`` on ``data``'s test split."""
    from . import cam_report

    writers = {"cam": cam_report.write_cam_report}
    for name, writer in _family_writers().items():
        writers.setdefault(name, writer)
    writer = writers.get(model.model_name, cam_report.write_accuracy_report)
    return writer(model, data, Path(out_dir), metrics, images=images)


def _family_writers() -> dict:
    """Writers of families registered later (ProtoPNet, VQA, NIWT) that may not be importable."""
    writers = {}
    try:
        from .evidence import write_evidence_report

        writers["protopnet"] = write_evidence_report
    except ImportError:
        pass
    from .vqa_report import write_vqa_report

    for family in ("san", "han", "cnn_lstm", "rn"):
        writers[family] = write_vqa_report
    try:
        from .niwt_report import write_niwt_report

        writers["niwt"] = write_niwt_report
    except ImportError:
        pass
    return writers
