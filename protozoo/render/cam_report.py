"""CAM report: for test images (and any user images), the class activation maps over the image,
the box they localise, and the ground truth; a PNG grid plus an HTML index page."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..maps import threshold_box, upsample
from .html import esc, img_tag, metrics_table, table, write_page
from .overlay import draw_box, heatmap_overlay, mask_outline, save_png, upscale

GREEN, YELLOW, RED = (0, 200, 0), (255, 230, 0), (230, 0, 0)


def _scale(image_size: int) -> int:
    return max(1, 192 // image_size)


def cam_panels(image: np.ndarray, cams: torch.Tensor, pred: int, label: int | None,
               mask: np.ndarray | None = None, box=None) -> np.ndarray:
    """One row: the image with its ground truth, the predicted class's CAM with its box, and the
    true class's CAM when the prediction is wrong. ``cams`` is ``[K, h, w]``."""
    h, w = image.shape[:2]
    up = upsample(cams[None].float(), (h, w))[0].cpu().numpy()
    truth = image
    if mask is not None:
        truth = mask_outline(truth, mask > 0.5, RED)
    if box is not None:
        truth = draw_box(truth, box, GREEN)
    panels = [truth, draw_box(heatmap_overlay(image, up[pred]), threshold_box(up[pred]), YELLOW)]
    if label is not None and label != pred:
        panels.append(draw_box(heatmap_overlay(image, up[label]), threshold_box(up[label]), YELLOW))
    return side_by_side(panels)


def side_by_side(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Equal-height uint8 panels in one row, separated by ``gap`` white columns."""
    spacer = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [spacer, p]
    return np.concatenate(row, axis=1)


def start_report(model, data, out_dir: Path, count: int):
    """(the test split, ``count`` of its indices spread over the classes, the model's device) for
    a report page, with ``out_dir`` created and the model in eval mode."""
    from ..data.base import pick_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    return data.test, pick_examples(data.test.labels, count), next(model.parameters()).device


def write_cam_report(model, data, out_dir: Path, metrics: dict, images=None,
                     count: int = 24) -> Path:
    dataset, picked, device = start_report(model, data, out_dir, count)
    rows, grid = [], []
    scale = _scale(data.image_size)
    for n, index in enumerate(picked):
        item = dataset[index]
        with torch.no_grad():
            out = model(item["image"][None].to(device))
        pred, label = int(out.logits.argmax(1)), int(item["label"])
        mask = item["mask"][0].numpy() if "mask" in item else None
        box = item["box"].tolist() if "box" in item else None
        panel = upscale(cam_panels(dataset.raw_image(index), out.cams[0], pred, label, mask, box),
                        scale)
        name = f"cam_{n:03d}.png"
        save_png(out_dir / name, panel)
        grid.append(panel)
        verdict = "ok" if pred == label else "bad"
        rows.append([img_tag(name, f"CAM for test image {index}"),
                     f"{esc(Path(item['path']).name)}",
                     f"<span class='{verdict}'>{esc(model.class_names[pred])}</span>",
                     esc(model.class_names[label])])
    user_rows = _user_image_rows(model, images or [], out_dir, data.image_size, scale)
    _save_grid(out_dir / "cams.png", grid)
    body = (metrics_table(metrics)
            + "<p>Left: the image with the ground-truth part outlined in red and the object box in "
              "green. Middle: the CAM of the predicted class, with the box of Zhou et al.'s rule "
              "(20% of the maximum, largest connected component) in yellow. Right, for errors "
              "only: the CAM of the true class.</p>"
            + f"<p>{img_tag('cams.png', 'all panels')}</p>"
            + table(["CAM", "file", "predicted", "true"], rows) + user_rows)
    write_page(out_dir / "index.html", f"CAM report — {model.model_name} ({model.backbone.name})",
               body)
    return out_dir / "index.html"


def _save_grid(path: Path, panels: list[np.ndarray], columns: int = 4) -> None:
    if not panels:
        return
    width = max(p.shape[1] for p in panels)
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0] + 4), (0, width - p.shape[1] + 4), (0, 0)),
                     constant_values=255) for p in panels]
    while len(padded) % columns:
        padded.append(np.full_like(padded[0], 255))
    rows = [np.concatenate(padded[i:i + columns], axis=1) for i in range(0, len(padded), columns)]
    save_png(path, np.concatenate(rows, axis=0))


def _user_image_rows(model, paths, out_dir: Path, image_size: int, scale: int) -> str:
    if not paths:
        return ""
    from ..data.images import load_image_for_model

    rows = []
    device = next(model.parameters()).device
    for n, path in enumerate(paths):
        tensor, raw = load_image_for_model(path, image_size, model.mean, model.std)
        with torch.no_grad():
            out = model(tensor[None].to(device))
        pred = int(out.logits.argmax(1))
        name = f"user_{n:03d}.png"
        save_png(out_dir / name, upscale(cam_panels(raw, out.cams[0], pred, None), scale))
        rows.append([img_tag(name, f"CAM for {Path(path).name}"), esc(Path(path).name),
                     esc(model.class_names[pred]), "—"])
    return ("<h2>Your images</h2>" + table(["CAM", "file", "predicted", "true"], rows)) if rows \
        else ""

