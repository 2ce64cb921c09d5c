"""What the representation looks like: PCA and t-SNE of the last layer's inputs, for the
trained model and a randomly initialised one, coloured by class.

The last layer's input is what the classifier separates: the globally average-pooled feature map
for CAM (Zhou et al. 2016: the input of its linear layer), ProtoPNet's similarities to its
prototypes (Chen et al. 2019), NIWT's final-layer input. ProtoPNet's prototypes are drawn in the
same space: prototype j sits where an image whose nearest patch to every prototype is prototype
j itself would sit (its similarities to all prototypes, computed by the model's own distance).
t-SNE (van der Maaten & Hinton, JMLR 2008) is fitted on the images and prototypes together,
seeded; PCA on the images only, the prototypes projected onto its axes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..outputs import CAMOutput, PrototypeOutput
from ..runtime import iterate, resolve_device


def _last_layer_input(output) -> torch.Tensor:
    if isinstance(output, PrototypeOutput):
        return output.similarities
    if isinstance(output, CAMOutput):
        return output.features.float().mean(dim=(2, 3))
    penultimate = getattr(output, "penultimate", None)
    if torch.is_tensor(penultimate):
        return penultimate
    raise UserError(f"no last-layer input in a {type(output).__name__}: the embeddings know "
                    "CAMOutput (pooled features), PrototypeOutput (similarities) and outputs "
                    "with a 'penultimate' tensor")


@torch.no_grad()
def prototype_points(model) -> torch.Tensor | None:
    """``[P, P]``: each ProtoPNet prototype in the space of similarities (see the module doc);
    ``None`` for a model without prototypes."""
    protos = getattr(model, "prototypes", None)
    if not isinstance(protos, torch.Tensor) or not hasattr(model, "distances_from_features"):
        return None
    cells = protos.detach().float()[:, :, None, None]  # each prototype as a 1x1 feature map
    return model.similarity_of(model.distances_from_features(cells)).flatten(1)


def last_layer_inputs(model, dataset, num_images: int | None = 500, batch_size: int = 64,
                      device="cpu") -> dict:
    """``{"features": [N, D], "labels": [N], "prototypes": [P, D] or None,
    "prototype_classes": [P] or None}`` (numpy) over ``num_images`` items spread over the
    classes (:func:`~protozoo.explain.scoring.spread_subset`)."""
    from .scoring import spread_subset

    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    dataset = spread_subset(dataset, num_images)
    feats, labels = [], []
    for batch, output in iterate(model, dataset, batch_size, device, amp="off"):
        feats.append(_last_layer_input(output).float().cpu())
        labels.append(batch["label"].cpu())
    protos = prototype_points(model)
    classes = getattr(model, "prototype_class", None)
    return {"features": torch.cat(feats).numpy(), "labels": torch.cat(labels).numpy(),
            "prototypes": None if protos is None else protos.cpu().numpy(),
            "prototype_classes": None if protos is None else classes.cpu().numpy()}


def _zoom_to_images(ax, xy: np.ndarray, n: int) -> str:
    """Limit the view to the images' points (the first ``n`` of ``xy``) when the prototypes
    spread so much wider that the images would shrink to a dot (a random initialisation's
    prototypes, uniform in the unit cube, against features that barely vary); returns the
    title's note of how many prototypes fall outside."""
    lo, hi = xy[:n].min(0), xy[:n].max(0)
    if np.all(hi - lo >= 0.25 * np.ptp(xy, 0)):
        return ""
    pad = 0.1 * (hi - lo) + 1e-9
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    outside = int(((xy[n:] < lo - pad) | (xy[n:] > hi + pad)).any(1).sum())
    return f"\n(zoomed on the images: {outside} of {len(xy) - n} prototypes outside)"


def project(points: dict, seed: int = 0, perplexity: float = 30.0) -> dict[str, np.ndarray]:
    """2-D PCA and t-SNE of :func:`last_layer_inputs`: ``{"pca": [N(+P), 2], "tsne": ...}``,
    images first, then prototypes."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = points["features"].astype(np.float64)
    protos = points["prototypes"]
    both = x if protos is None else np.concatenate([x, protos.astype(np.float64)])
    pca = PCA(n_components=2, random_state=seed).fit(x)
    perplexity = float(min(perplexity, (len(both) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                max_iter=500).fit_transform(both)
    return {"pca": pca.transform(both), "tsne": tsne}


def embedding_figure(trained, untrained, dataset, path, *, num_images: int | None = 500,
                     batch_size: int = 64, device="cpu", seed: int = 0) -> Path:
    """A PNG at ``path``: PCA and t-SNE (columns) of the last layer's inputs of ``trained`` and
    ``untrained`` (rows; e.g. :func:`protozoo.explain.training.fresh_copy`) on
    ``num_images`` items of ``dataset`` spread over its classes, coloured by class;
    prototypes, if any, as stars in their class's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_path

    rows = [("trained", trained), ("random init", untrained)]
    names = list(getattr(trained, "class_names", []))
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if max(len(names), 1) <= 10 else "tab20")
    for r, (label, model) in enumerate(rows):
        points = last_layer_inputs(model, dataset, num_images, batch_size, device)
        coords = project(points, seed)
        n = len(points["features"])
        for c, method in enumerate(("pca", "tsne")):
            ax = axes[r][c]
            xy = coords[method]
            for k in np.unique(points["labels"]):
                hit = points["labels"] == k
                ax.scatter(xy[:n][hit, 0], xy[:n][hit, 1], s=9, color=cmap(int(k) % cmap.N),
                           label=names[int(k)] if int(k) < len(names) else str(k), alpha=0.7)
            if points["prototypes"] is not None:
                pc = points["prototype_classes"]
                ax.scatter(xy[n:, 0], xy[n:, 1], s=110, marker="*",
                           c=[cmap(int(k) % cmap.N) for k in pc], edgecolors="black",
                           linewidths=0.8, label="prototypes")
            title = f"{label}: {'PCA' if method == 'pca' else 't-SNE'}"
            if method == "pca" and len(xy) > n:
                title += _zoom_to_images(ax, xy, n)
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].legend(fontsize=7, markerscale=1.2, loc="best")
    fig.suptitle("last layer's inputs, coloured by class", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
