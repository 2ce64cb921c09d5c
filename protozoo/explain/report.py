"""The explainer comparison as an HTML section or page: a table of every explainer's scores,
the deletion and insertion curves, the randomisation cascade, a grid of every explainer's maps on
the same images, and the embeddings figure. Every string from data goes through
:func:`protozoo.render.html.esc`; the plots are drawn from the JSON results alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_path
from ..render.html import append_to_page, esc, img_tag, table, write_page

COLUMNS = (  # (metric, header, better); metrics with a _chance companion show it
    ("pointing", "pointing", "higher"),
    ("region_on_part", "region on part", "higher"),
    ("relevance_mass", "relevance mass", "higher"),
    ("deletion_auc", "deletion AUC", "lower"),
    ("insertion_auc", "insertion AUC", "higher"),
    ("cascade_spearman_top", "cascade Spearman, top layer", "lower"),
    ("cascade_spearman_full", "cascade Spearman, all layers", "lower"),
    ("cascade_ssim_top", "cascade SSIM, top layer", "lower"),
    ("cascade_ssim_full", "cascade SSIM, all layers", "lower"),
    ("random_labels_spearman", "random-labels Spearman", "lower"),
    ("random_labels_ssim", "random-labels SSIM", "lower"),
    ("seconds", "seconds", "lower"),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    _plt().close(fig)


def plot_deletion_curves(results: dict, path) -> Path:
    """Deletion and insertion curves (mean over images) of every explainer, one panel each."""
    plt = _plt()
    curves = results["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for name, ys in curves[kind].items():
            auc = results["scores"][name].get(f"{kind}_auc", float("nan"))
            ax.plot(curves["fraction"], ys, marker=".", label=f"{name} ({auc:.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the target class")
        ax.set_title(f"{kind} (AUC: {'lower' if kind == 'deletion' else 'higher'} is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def plot_cascade(results: dict, path) -> Path:
    """Spearman and SSIM between trained and randomised maps after each layer is randomised."""
    plt = _plt()
    cas = results["cascade"]
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.4))
    xs = np.arange(len(cas["layers"]))
    for ax, key in zip(axes, ("spearman", "ssim")):
        for name, ys in cas[key].items():
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels(cas["layers"], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="grey", linewidth=0.7)
        ax.set_title(f"{'Spearman rank correlation' if key == 'spearman' else 'SSIM'} with the "
                     "trained model's maps", fontsize=10)
        ax.set_xlabel("randomised down to layer (cumulative, top first)")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the lines
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def maps_grid(model, images: torch.Tensor, path, explainers="all", params=None,
              masks: torch.Tensor | None = None, target: torch.Tensor | None = None) -> Path:
    """A PNG grid: a row per image (``[N, 3, H, W]``, normalised as the model expects), the
    image (part mask outlined) then every explainer's map for the same target (default: the
    prediction) blended over it, clipped at 0 (the evidence for the class) and scaled to its
    own maximum."""
    from ..data import denormalize
    from ..render.overlay import heatmap_overlay, mask_outline
    from .explainers import explain, predict, resolve_explainers

    plt = _plt()
    methods = resolve_explainers(explainers, params, model)
    device = next(model.parameters()).device
    images = images.to(device)
    output, preds = predict(model, images)
    target = preds if target is None else target.to(device)
    maps = {e.name: explain(model, images, e, target, output=output).cpu() for e in methods}
    n, cols = len(images), len(methods) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.4), squeeze=False)
    names = list(getattr(model, "class_names", []))
    for i in range(n):
        rgb = denormalize(images[i].cpu(), model.mean, model.std)
        shown = rgb if masks is None else mask_outline(rgb, masks[i, 0].cpu().numpy() > 0.5)
        axes[i][0].imshow(shown)
        k = int(target[i])
        axes[i][0].set_ylabel(names[k] if k < len(names) else str(k), fontsize=7)
        for j, e in enumerate(methods, start=1):
            # positive evidence only: a signed map's zero would otherwise take a colour of
            # its own in each image (Integrated Gradients, occlusion, a CAM)
            shown_map = maps[e.name][i].clamp_min(0).numpy()
            axes[i][j].imshow(heatmap_overlay(rgb, shown_map, alpha=0.6))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, title in enumerate(["image"] + [e.name for e in methods]):
        axes[0][j].set_title(title.replace("_", " "), fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def _cell(scores: dict, metric: str) -> str:
    if metric not in scores:
        return ""
    text = f"{scores[metric]:.3f}"
    if metric + "_chance" in scores:
        text += f" (chance {scores[metric + '_chance']:.3f})"
    return esc(text)


def scores_table(results: dict) -> str:
    """The scores of every explainer as an HTML table (chance levels beside their metric)."""
    scores = results["scores"]
    present = [c for c in COLUMNS if any(c[0] in s for s in scores.values())]
    header = ["explainer"] + [f"{h} ({better} is better)" if m != "seconds" else h
                              for m, h, better in present]
    rows = [[esc(name)] + [_cell(s, m) for m, _, _ in present] for name, s in scores.items()]
    return table(header, rows)


def explainer_section(results: dict, files: dict[str, str] | None = None) -> str:
    """An HTML section: the scores table, how they were measured, and the figures in
    ``files`` (``{"deletion": relative path, "cascade": ..., "grid": ..., "embeddings":
    ...}``)."""
    files = files or {}
    s = results["settings"]
    sanity_images = results.get("cascade", {}).get("num_images", 0)
    accuracy, seconds = f"{s['accuracy']:.3f}", f"{s['seconds']:.1f}"
    cpu = f" ({s['cpu_seconds']:.0f} s of CPU time)" if "cpu_seconds" in s else ""
    parts = ["<h2>Every explanation, judged on the same model and images</h2>",
             scores_table(results),
             f"<p>{esc(s['num_images'])} test images (spread over the classes), batches of "
             f"{esc(s['batch_size'])} (memory: one batch), accuracy on them {esc(accuracy)}; "
             f"each map explains the {esc(s['target'])}. Deletion/insertion: {esc(s['steps'])} "
             f"steps, removed pixels set to the '{esc(s['baseline'])}' baseline, curve = softmax "
             "probability of the target (Petsiuk et al. 2018). Cascade: layers re-initialised "
             "from the top down, Spearman and SSIM against the trained model's maps on the first "
             f"{esc(sanity_images)} images (Adebayo et al. 2018). Seed {esc(s['seed'])}; "
             f"{esc(seconds)} s in all{esc(cpu)} on {esc(s['device'])}.</p>"]
    captions = {"grid": "Every explainer's map of the same images (part outlined in red), "
                        "clipped at 0 (evidence for the class) and scaled to its own maximum; "
                        "an all-blue map is 0 everywhere.",
                "deletion": "Deletion and insertion curves, mean over images.",
                "cascade": "Cascading randomisation: similarity to the trained model's maps.",
                "embeddings": "Last layer's inputs, trained against random initialisation."}
    for key in ("grid", "deletion", "cascade", "embeddings"):
        if key in files:
            parts.append(f"<figure>{img_tag(files[key], key)}<figcaption>{esc(captions[key])}"
                         "</figcaption></figure>")
    return "\n".join(parts)


def write_explainer_report(out_dir, results: dict, model=None, dataset=None, *,
                           grid_images: int = 6, embeddings: str | Path | None = None,
                           explainers="all", params=None,
                           title: str = "Explainers compared", append_to=None) -> Path:
    """Write ``explainers.html`` and its PNGs into ``out_dir``; returns the page's path. The
    grid of maps needs ``model`` and ``dataset`` (``grid_images`` items spread over its
    classes, batched once); ``embeddings``: a PNG already written into ``out_dir`` (see
    :func:`protozoo.explain.embeddings.embedding_figure`). ``append_to``: a page in
    ``out_dir`` (a run's ``index.html``) that gets the same section at its end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"deletion": plot_deletion_curves(results, out / "explainers_deletion.png").name}
    if "cascade" in results:
        files["cascade"] = plot_cascade(results, out / "explainers_cascade.png").name
    if model is not None and dataset is not None and grid_images > 0:
        from .scoring import spread_subset

        shown = spread_subset(dataset, grid_images)  # one image per class, in class order
        items = [shown[i] for i in range(min(grid_images, len(shown)))]
        images = torch.stack([torch.as_tensor(it["image"]) for it in items]).float()
        masks = (torch.stack([torch.as_tensor(it["mask"]) for it in items])
                 if all("mask" in it for it in items) else None)
        files["grid"] = maps_grid(model, images, out / "explainers_grid.png", explainers,
                                  params, masks).name
    if embeddings is not None:
        files["embeddings"] = Path(embeddings).name
    page = out / "explainers.html"
    section = explainer_section(results, files)
    write_page(page, title, section)
    if append_to is not None:
        append_to_page(append_to, section)
    return page
