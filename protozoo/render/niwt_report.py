"""NIWT report: zero-shot results next to the baselines, the neurons named by attributes, and for
test images (unseen classes first) the visual + textual explanation of the prediction: the most
important neurons of the predicted class, each with its Grad-CAM map and attribute names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .html import esc, img_tag, table, write_page
from .overlay import heatmap_overlay, mask_outline, save_png, upscale

METHODS = (("NIWT", ""), ("direct regression", "direct_regression/"), ("DAP", "dap/"))
COLUMNS = ("zsl_unseen", "gzsl_seen", "gzsl_unseen", "gzsl_h")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def comparison_table(metrics: dict) -> str:
    rows = [[esc(name)] + [esc(_fmt(metrics[prefix + c])) if prefix + c in metrics else "—"
                           for c in COLUMNS] for name, prefix in METHODS]
    return table(["method", *COLUMNS], rows)


def _other_metrics(metrics: dict) -> str:
    shown = {prefix + c for _, prefix in METHODS for c in COLUMNS}
    rows = [[esc(k), esc(_fmt(v))] for k, v in metrics.items() if k not in shown]
    return table(["metric", "value"], rows)


def explanation_panel(raw: np.ndarray, maps: torch.Tensor, mask=None) -> np.ndarray:
    """One row: the image (ground-truth object outlined in red), then each neuron's map."""
    first = mask_outline(raw, mask > 0.5) if mask is not None else raw
    panels = [first] + [heatmap_overlay(raw, m.float().numpy()) for m in maps]
    gap = np.full((raw.shape[0], 2, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def _neuron_text(neuron: int, importance: float, names) -> str:
    named = ", ".join(f"{esc(a)} (r={c:.2f})" for a, c in names) or "no attribute"
    return f"neuron {neuron}: {named}; importance {importance:.3g}"


def _explain_rows(model, items, out_dir: Path, prefix: str, scale: int, top_k: int) -> list:
    """(image, raw, mask or None, true label or None, display name) -> table rows + PNGs."""
    device = next(model.parameters()).device
    rows = []
    for n, (image, raw, mask, label, name) in enumerate(items):
        expl = model.explain(image[None].to(device), top_k=top_k)
        pred = int(expl.classes[0])
        png = f"{prefix}_{n:03d}.png"
        save_png(out_dir / png, upscale(explanation_panel(raw, expl.maps[0], mask), scale))
        neurons = "<br>".join(_neuron_text(int(i), float(v), names) for i, v, names in zip(
            expl.neurons[0], expl.importances[0], expl.names[0]))
        verdict = "" if label is None else ("ok" if pred == label else "bad")
        truth = "—" if label is None else esc(model.class_names[label])
        rows.append([img_tag(png, f"neuron maps for {name}"), esc(name),
                     f"<span class='{verdict}'>{esc(model.class_names[pred])}</span>", truth,
                     neurons])
    return rows


def _dataset_items(dataset, indices):
    for i in indices:
        item = dataset[i]
        mask = item["mask"][0].numpy() if "mask" in item else None
        yield (item["image"], dataset.raw_image(i), mask, int(item["label"]),
               Path(str(item["path"])).name)


def _neuron_table(model, limit: int = 16) -> str:
    """The neurons that matter most on average for the classes, with their attribute names."""
    weights = model.attribute_map(model.class_attributes).detach().cpu()  # predicted importances
    order = weights.clamp_min(0).mean(0).argsort(descending=True)[:limit].tolist()
    names = model.neuron_names()
    rows = [[esc(i), ", ".join(f"{esc(a)} ({c:.2f})" for a, c in names[i]) or "—"]
            for i in order]
    return table(["neuron", "attributes it correlates with (r)"], rows)


def _unseen_table(model, top_k: int) -> str:
    attrs = model.class_attributes.detach().cpu()
    predicted = model.attribute_map(attrs).detach()
    names = model.neuron_names()
    rows = []
    for k in range(model.num_seen, model.num_classes):
        has = [esc(a) for a, v in zip(model.attribute_names, attrs[k].tolist())
               if v > float(attrs[:, model.attribute_names.index(a)].mean())]
        top = predicted[k].topk(min(top_k, predicted.shape[1])).indices.tolist()
        rows.append([esc(model.class_names[k]), ", ".join(has),
                     "<br>".join(f"{i}: " + (", ".join(esc(a) for a, _ in names[i]) or "—")
                                 for i in top)])
    return table(["unseen class", "attributes", "neurons its attributes predict"], rows)


def write_niwt_report(model, data, out_dir: Path, metrics: dict, images=None, count: int = 12,
                      top_k: int = 3) -> Path:
    from ..data.base import pick_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    split = getattr(data, "zero_shot", None)
    scale = max(1, 96 // data.image_size)
    sections = [("unseen", split.unseen_test if split else None, count * 2 // 3),
                ("seen", data.test, count - count * 2 // 3)]
    body = ["<h2>Zero-shot results</h2>", comparison_table(metrics),
            "<p>zsl_unseen: unseen test images classified among the unseen classes; gzsl_*: "
            "mean per-class accuracy of seen / unseen test images classified over all classes; "
            "gzsl_h: their harmonic mean.</p>", "<h2>Other metrics</h2>", _other_metrics(metrics),
            "<h2>Unseen classes</h2>", _unseen_table(model, top_k),
            "<h2>Neurons named by attributes</h2>", _neuron_table(model)]
    header = ["neuron maps", "file", "predicted", "true", "most important neurons"]
    for name, dataset, n in sections:
        if dataset is None or n <= 0:
            continue
        picked = pick_examples(dataset.labels, n)
        rows = _explain_rows(model, _dataset_items(dataset, picked), out_dir, name, scale, top_k)
        body += [f"<h2>Test images of {esc(name)} classes</h2>",
                 "<p>Left: the image, ground-truth object outlined in red. Then the Grad-CAM map "
                 "of each of the predicted class's most important neurons "
                 "(relu(importance x activation)).</p>", table(header, rows)]
    if images:
        from ..data.images import load_image_for_model

        items = []
        for path in images:
            tensor, raw = load_image_for_model(path, data.image_size, model.mean, model.std)
            items.append((tensor, raw, None, None, Path(path).name))
        body += ["<h2>Your images</h2>",
                 table(header, _explain_rows(model, items, out_dir, "user", scale, top_k))]
    title = f"NIWT report — {model.model_name} on {model.base.model_name} ({model.backbone.name})"
    write_page(out_dir / "index.html", title, "\n".join(body))
    return out_dir / "index.html"
