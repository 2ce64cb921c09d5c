"""VQA report: for test questions, the image, the question, the predicted and true answers, and
where the model looked -- every attention hop of a soft-attention model as a heatmap, or, for a
model whose hard attention keeps cells (``model.keeps_cells``), the cells it kept outlined on the
image, with the objects the answer depends on outlined in red when the data has masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cam_report import RED, _save_grid, side_by_side, start_report
from .html import esc, img_tag, metrics_table, table, write_page
from .overlay import draw_box, heatmap_overlay, mask_outline, save_png, upscale

KEPT = (255, 230, 0)


def _scale(image_size: int) -> int:
    return max(1, 225 // image_size)


def kept_overlay(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Dim the cells the reasoning module never saw and outline the kept ones (``kept`` [h, w])."""
    h, w = image.shape[:2]
    rows, cols = kept.shape
    out = (image.astype(np.float32) * 0.35).astype(np.uint8)
    for i, j in zip(*np.nonzero(kept)):
        y0, y1 = i * h // rows, (i + 1) * h // rows
        x0, x1 = j * w // cols, (j + 1) * w // cols
        out[y0:y1, x0:x1] = image[y0:y1, x0:x1]
        out = draw_box(out, (x0, y0, x1, y1), KEPT)
    return out


def vqa_panels(image: np.ndarray, attention: torch.Tensor, kept: torch.Tensor | None,
               mask: np.ndarray | None) -> np.ndarray:
    """One row: the image (relevant objects outlined in red), then one panel per attention hop,
    or the kept cells for hard attention. ``attention`` is ``[hops, h, w]``."""
    truth = mask_outline(image, mask > 0.5, RED) if mask is not None else image
    if kept is not None:
        panels = [truth, kept_overlay(image, kept.cpu().numpy().astype(bool))]
    else:
        panels = [truth] + [heatmap_overlay(image, hop.float().cpu().numpy()) for hop in attention]
    return side_by_side(panels)


def write_vqa_report(model, data, out_dir: Path, metrics: dict, images=None,
                     count: int = 24) -> Path:
    """``out_dir/index.html`` + one PNG per question and a grid of all of them."""
    dataset, picked, device = start_report(model, data, out_dir, count)
    scale = _scale(data.image_size)
    rows, grid = [], []
    for n, index in enumerate(picked):
        item = dataset[index]
        batch = {k: (torch.as_tensor(v)[None].to(device) if isinstance(v, (torch.Tensor, int))
                     else v) for k, v in item.items()}
        with torch.no_grad():
            out = model(*model.inputs(batch))
        pred, label = int(out.logits.argmax(1)), int(item["label"])
        mask = item["mask"][0].numpy() if "mask" in item else None
        kept = out.kept[0] if getattr(out, "kept", None) is not None else None
        panel = upscale(vqa_panels(dataset.raw_image(index), out.attention[0], kept, mask), scale)
        name = f"vqa_{n:03d}.png"
        save_png(out_dir / name, panel)
        grid.append(panel)
        verdict = "ok" if pred == label else "bad"
        rows.append([img_tag(name, f"attention for test question {index}"),
                     esc(dataset.question_text(index)),
                     f"<span class='{verdict}'>{esc(model.class_names[pred])}</span>",
                     esc(model.class_names[label]), esc(Path(item["path"]).name)])
    _save_grid(out_dir / "attention.png", grid, columns=3)
    what = ("the cells the hard attention kept (bright, yellow outline); the reasoning module never "
            "saw the dimmed ones" if getattr(model, "keeps_cells", False) else
            "the attention of every hop, first hop first (a uniform map for models without "
            "attention)")
    body = (metrics_table(metrics)
            + ("<p>Left: the image, with the objects the answer depends on outlined in red. "
               if getattr(dataset, "has_masks", False) else
               "<p>Left: the image (the data has no object masks, so nothing is outlined). ")
            + f"Then {esc(what)}.</p>"
            + f"<p>{img_tag('attention.png', 'all panels')}</p>"
            + table(["attention", "question", "predicted", "true", "image"], rows))
    write_page(out_dir / "index.html",
               f"VQA report — {model.model_name} ({model.backbone.name})", body)
    return out_dir / "index.html"
