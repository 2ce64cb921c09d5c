"""Prototype projection ("push", Chen et al. 2019, Sec. 2.2): replace each prototype by its nearest
feature patch among the training images of its own class.

Three separate steps, as the design asks: :func:`compute_push` is pure computation and returns a
:class:`PushResult` with provenance; :func:`apply_push` writes it into the model; rendering reads
the provenance from ``model.metadata["prototypes"]`` (saved with the checkpoint, so reports work
after ``protozoo.load``).

Vectorised over prototypes and images: one pass over the data keeps, for *all* prototypes at once,
a running list of the nearest images (one patch per image) with a handful of tensor operations on
the device (the official code loops over prototypes in Python for every batch). Memory is one
batch of feature and distance maps plus ``P x k`` candidates, whatever the dataset size.

Three rules beyond the paper, so that the evidence a prototype stands for is what it claims:

* **One source image per prototype of a class.** The paper projects every prototype on its own
  nearest patch, so two prototypes of a class can become the *same* patch (a class spending its
  prototype budget twice on one piece of evidence). Here the prototypes of a class take their
  nearest image in turn (nearest first), each image at most once per class.
* **No class-agnostic projection.** Where a prototype's nearest own-class patch is one every
  class's images have (its class specificity below the pruning bar), it is projected onto its
  class's most specific patch instead (:func:`class_specific_sources`); the provenance records
  which (``projection``: ``nearest`` or ``class-specific``). ``specific_push=False`` (a model
  argument) turns the rule off.
* **Exact provenance.** A prototype's distance to its source patch is computed exactly (it is 0:
  the prototype *is* that feature vector), and the provenance records its similarity there, so
  the final model can be checked against it (the engine runs frozen modules in eval mode, so no
  later phase moves the features under a pushed prototype).

:func:`image_distances` (every prototype against every image, ``P x N`` floats) serves pruning
and the class-specificity check of :mod:`protozoo.models.protopnet.prune`.
"""
from __future__ import annotations

from dataclasses import dataclass

from pathlib import PurePath

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ...errors import UserError
from ...maps import peak_region_box, percentile_boxes, upsample
from ...runtime import autocast_for, to_device
from .specificity import MIN_SPECIFICITY, class_specificity

# ProtoPNet's similarity maps are upsampled as the official code does (cv2 INTER_CUBIC)
MAP_UPSAMPLING = "bicubic"
CANDIDATE_IMAGES = 32  # images of a class whose cells are candidates for a class-specific patch
REFERENCE_IMAGES_PER_CLASS = 32  # images of each class that candidates are scored against,
REFERENCE_IMAGES = 1024  # ... at most this many in all (at least 2 a class)
CANDIDATE_CHUNK = 512  # candidate vectors scored at once (memory: chunk x reference cells)


@dataclass
class PushResult:
    vectors: torch.Tensor  # [P, D] the projected prototypes
    distances: torch.Tensor  # [P] distance from the old prototype to its new patch
    image_index: torch.Tensor  # [P] index in the push dataset
    cell: torch.Tensor  # [P, 2] (row, col) of the patch in the feature map
    similarity_maps: torch.Tensor  # [P, h, w] the new prototype's similarity over its source image
    provenance: list[dict]
    moved: torch.Tensor  # [P] bool: projected onto a class-specific patch instead


def _scan(model, dataset, batch_size: int, device, amp: str, vectors=None):
    """Yield ``(offset, labels [B], min_distances [B, P], nearest cell [B, P, 2])`` per batch,
    in eval mode without gradients (the model's mode is restored afterwards); distances to the
    model's prototypes or to ``vectors`` ``[P, D]``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    autocast, _ = autocast_for(device, amp)
    was_training = model.training
    model.eval()
    offset = 0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                with autocast:
                    features = model.add_on(model.backbone(batch["image"]))
                min_d, maps = model.prototype_distances(features.float(), vectors)
                w = maps.shape[-1]
                where = maps.flatten(2).argmin(2)
                yield offset, batch["label"], min_d, torch.stack([where // w, where % w], -1)
                offset += len(min_d)
    finally:
        model.train(was_training)


def nearest_images(model, dataset, k: int, batch_size: int = 64, device=None,
                   own_class: bool = False, amp: str = "auto"):
    """The ``k`` images whose closest patch is nearest to each prototype (one patch per image, as
    the official ``find_k_nearest_patches_to_prototypes``); ``own_class`` keeps only images of
    the prototype's class. Ties keep the earlier image.

    Returns ``(distances [P, k], image_index [P, k], cell [P, k, 2])`` sorted nearest first;
    ``inf`` / ``-1`` where fewer than ``k`` images qualify.
    """
    device = device or next(model.parameters()).device
    P = model.num_prototypes
    classes = model.prototype_class.to(device)
    top_d = torch.full((P, 0), float("inf"), device=device)
    top_i = torch.zeros((P, 0), dtype=torch.long, device=device)
    top_c = torch.zeros((P, 0, 2), dtype=torch.long, device=device)
    for offset, labels, min_d, cells in _scan(model, dataset, batch_size, device, amp):
        B = len(labels)
        value = min_d.t()  # [P, B]
        if own_class:
            value = value.masked_fill(labels.view(1, B) != classes.view(P, 1), float("inf"))
        all_d = torch.cat([top_d, value], 1)
        all_i = torch.cat([top_i, torch.arange(offset, offset + B, device=device).expand(P, B)], 1)
        all_c = torch.cat([top_c, cells.transpose(0, 1)], 1)
        keep = torch.sort(all_d, dim=1, stable=True).indices[:, :k]
        top_d, top_i = all_d.gather(1, keep), all_i.gather(1, keep)
        top_c = all_c.gather(1, keep[..., None].expand(-1, -1, 2))
    top_i = torch.where(torch.isinf(top_d), torch.full_like(top_i, -1), top_i)
    return top_d, top_i, top_c


def image_distances(model, dataset, batch_size: int = 64, device=None,
                    amp: str = "auto") -> torch.Tensor:
    """``[P, N]`` on the CPU: each prototype's distance to each image's closest patch (what the
    model's logits use), in dataset order."""
    device = device or next(model.parameters()).device
    columns = [min_d.t().cpu() for _, _, min_d, _ in _scan(model, dataset, batch_size, device,
                                                           amp)]
    return torch.cat(columns, 1) if columns else torch.zeros(model.num_prototypes, 0)


def distinct_sources(image_index: torch.Tensor, classes: torch.Tensor,
                     distances: torch.Tensor) -> torch.Tensor:
    """Which candidate each prototype takes so that no two prototypes of a class share a source
    image: prototypes choose in order of their nearest candidate's distance (ties: lower index
    first), each taking its nearest image not yet taken by its class. ``image_index`` and
    ``distances`` are ``[P, k]`` candidates sorted nearest first (-1 / inf: none). Returns
    ``[P]`` column indices; a prototype whose class has too few images takes its nearest one
    even if taken (the only case of a shared source)."""
    image_index, classes, distances = image_index.cpu(), classes.cpu(), distances.cpu()
    order = sorted(range(len(classes)), key=lambda j: (float(distances[j, 0]), j))
    taken: set[tuple[int, int]] = set()
    choice = torch.zeros(len(classes), dtype=torch.long)
    for j in order:
        c = int(classes[j])
        row = image_index[j].tolist()
        free = [n for n, i in enumerate(row) if i >= 0 and (c, i) not in taken]
        choice[j] = free[0] if free else 0
        taken.add((c, row[int(choice[j])]))
    return choice


@torch.no_grad()
def source_features(model, dataset, indices: list[int], batch_size: int = 64, device=None,
                    amp: str = "auto") -> torch.Tensor:
    """Add-on feature maps ``[len(indices), D, h, w]`` (fp32) of the given items, in eval mode."""
    device = device or next(model.parameters()).device
    autocast, _ = autocast_for(device, amp)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False):
            with autocast:
                out.append(model.add_on(model.backbone(batch["image"].to(device))).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def compute_push(model, dataset, batch_size: int = 64, device=None, amp: str = "auto",
                 percentile: float = 95.0, class_specific: bool = True) -> PushResult:
    """Find every prototype's projection and its provenance (no change to the model): its
    nearest own-class patch (one source image per prototype of a class), or, with
    ``class_specific``, a class-specific patch where the nearest one would be class-agnostic
    (:func:`class_specific_sources`)."""
    device = device or next(model.parameters()).device
    classes = model.prototype_class
    per_class = int(torch.bincount(classes.cpu()).max()) if len(classes) else 0
    cand_d, cand_i, cand_c = nearest_images(model, dataset, per_class, batch_size, device,
                                            own_class=True, amp=amp)
    missing = (cand_i[:, 0] < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"prototypes {missing[:5]} have no training image of their class to "
                         "project onto; every class needs training images")
    P = len(classes)
    pick = distinct_sources(cand_i, classes, cand_d).to(cand_i.device)
    rows = torch.arange(P, device=cand_i.device)
    best, image, cell = cand_d[rows, pick], cand_i[rows, pick], cand_c[rows, pick]
    feats, vectors = _patches(model, dataset, image, cell, batch_size, device, amp)
    moved = torch.zeros(P, dtype=torch.bool)
    nearest_specificity = torch.full((P,), float("nan"))
    if class_specific:
        image, cell, moved, nearest_specificity = class_specific_sources(
            model, dataset, vectors, image, cell, batch_size, device, amp)
        if bool(moved.any()):
            feats, new = _patches(model, dataset, image, cell, batch_size, device, amp)
            best = best.clone()
            old = model.prototypes.detach().float().to(new.device)
            best[moved.to(best.device)] = _distances_to(
                model, old[:, :, None, None], new)[:, 0, 0][moved.to(new.device)]
            vectors = new
    maps = model.similarity_of(_distances_to(model, feats, vectors))  # [P, h, w]
    provenance = _provenance(model, dataset, image, cell, best, maps, percentile)
    for j, record in enumerate(provenance):
        record["projection"] = "class-specific" if bool(moved[j]) else "nearest"
        if not bool(torch.isnan(nearest_specificity[j])):
            record["nearest_patch_specificity"] = round(float(nearest_specificity[j]), 4)
    return PushResult(vectors, best, image, cell, maps, provenance, moved)


def _patches(model, dataset, image: torch.Tensor, cell: torch.Tensor, batch_size: int, device,
             amp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features of each prototype's source image [P, D, h, w], its patch [P, D])``."""
    unique, slot = torch.unique(image.cpu(), return_inverse=True)
    feats = source_features(model, dataset, unique.tolist(), batch_size, device, amp)[slot]
    rows = torch.arange(len(image))
    return feats, feats[rows, :, cell[:, 0].cpu(), cell[:, 1].cpu()]


def _spread(indices: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` of ``indices``, evenly spaced (deterministic)."""
    if len(indices) <= count:
        return indices
    return indices[torch.linspace(0, len(indices) - 1, count).round().long()]


@torch.no_grad()
def class_specific_sources(model, dataset, vectors: torch.Tensor, image: torch.Tensor,
                           cell: torch.Tensor, batch_size: int = 64, device=None,
                           amp: str = "auto"):
    """Move every projection that would be class-agnostic to a class-specific patch (ours).

    The nearest own-class patch of a prototype can be one that every image has (background, the
    zero-padded border, a colour all classes share): its similarity is then about the same for
    every image, a constant bonus to its class rather than evidence. Such a projection is
    detected exactly as pruning detects it -- its class specificity over the push set (the ROC
    AUC of own-class against other images, :func:`.specificity.class_specificity`) is below
    :data:`.specificity.MIN_SPECIFICITY` -- and the prototype is projected instead onto the most
    class-specific patch of its class: every cell of up to :data:`CANDIDATE_IMAGES` images of
    the class is a candidate, scored by its specificity against up to
    :data:`REFERENCE_IMAGES_PER_CLASS` images of every class (:data:`REFERENCE_IMAGES` in all;
    ties: the candidate whose nearest other-class image is farthest beyond its class's median
    distance), each source image used once per class. A prototype only moves to a candidate
    more specific than its nearest patch.

    Why (measured, ``docs/protopnet.md`` section 6): with a backbone trained from scratch the
    warm-up (backbone frozen at its random initialisation) collapses the add-on space, and the
    nearest own-class patch of 46-49 of 50 prototypes was then class-agnostic; training from there
    left some seeds with class-agnostic prototypes only. The paper (pretrained backbones) has no
    such rule; its push is the nearest patch, which is what this returns whenever that patch is
    class-specific.

    Returns ``(image [P], cell [P, 2], moved bool [P], specificity of the nearest patch [P])``.
    """
    device = device or next(model.parameters()).device
    classes = model.prototype_class.cpu()
    image, cell = image.cpu().clone(), cell.cpu().clone()
    columns, seen = [], []  # one pass: distances and labels (any dataset, no ``.labels`` needed)
    for _, batch_labels, min_d, _ in _scan(model, dataset, batch_size, device, amp,
                                           vectors.to(device)):
        columns.append(min_d.t().cpu())
        seen.append(torch.as_tensor(batch_labels).cpu())
    distances, labels = torch.cat(columns, 1), torch.cat(seen).long()
    specificity = class_specificity(distances, labels.view(1, -1) == classes.view(-1, 1))
    weak = specificity < MIN_SPECIFICITY
    moved = torch.zeros(len(classes), dtype=torch.bool)
    if not bool(weak.any()):
        return image, cell, moved, specificity
    present = labels.unique()
    per_class = max(2, min(REFERENCE_IMAGES_PER_CLASS, REFERENCE_IMAGES // len(present)))
    reference = torch.cat([_spread((labels == c).nonzero().flatten(), per_class)
                           for c in present])
    ref_feats = source_features(model, dataset, reference.tolist(), batch_size, device, amp)
    ref_labels = labels[reference]
    for c in classes[weak].unique().tolist():
        sources = _spread((labels == c).nonzero().flatten(), CANDIDATE_IMAGES)
        feats = source_features(model, dataset, sources.tolist(), batch_size, device, amp)
        M, D, h, w = feats.shape
        candidates = feats.permute(0, 2, 3, 1).reshape(M * h * w, D)
        dist = torch.cat([torch.cat([model.prototype_distances(ref, chunk)[0].t().cpu()
                                     for ref in ref_feats.split(batch_size)], 1)
                          for chunk in candidates.split(CANDIDATE_CHUNK)])  # [M*h*w, R]
        own = (ref_labels == c).view(1, -1).expand_as(dist)
        score = class_specificity(dist, own)
        margin = dist[:, ref_labels != c].amin(1) - dist[:, ref_labels == c].median(1).values
        order = sorted(range(len(score)), key=lambda k: (-float(score[k]), -float(margin[k]), k))
        mine = (classes == c).nonzero().flatten().tolist()
        taken = {int(image[j]) for j in mine if not bool(weak[j])}
        for j in (j for j in mine if bool(weak[j])):
            for k in order:
                source = int(sources[k // (h * w)])
                if source in taken:
                    continue
                if float(score[k]) > float(specificity[j]):
                    image[j], cell[j] = source, torch.tensor([(k % (h * w)) // w, k % w])
                    moved[j] = True
                    taken.add(source)
                break
    return image, cell, moved, specificity


def _distances_to(model, feats: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Distance of prototype p's new vector to every cell of its own source image: ``[P, h, w]``,
    as the sum of squared differences (exactly 0 at the source cell)."""
    if model.similarity == "cosine":
        feats = torch.nn.functional.normalize(feats, dim=1)
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    diff = feats - vectors[:, :, None, None]
    return (diff * diff).sum(1)


def high_activation_boxes(maps: torch.Tensor, size: tuple[int, int],
                          percentile: float = 95.0) -> torch.Tensor:
    """Chen et al.'s high-activation boxes ``[N, 4]`` of similarity maps ``[N, h, w]``: upsampled
    bicubically to the image (as the official code) and boxed at their ``percentile``-th
    percentile (:func:`protozoo.maps.percentile_boxes`)."""
    return percentile_boxes(upsample(maps[:, None], size, MAP_UPSAMPLING)[:, 0], percentile)


def evidence_boxes(maps: torch.Tensor, size: tuple[int, int],
                   percentile: float = 95.0) -> list[tuple[int, int, int, int]]:
    """The boxes reports draw: :func:`protozoo.maps.peak_region_box` of each similarity map
    ``[N, h, w]`` upsampled as :func:`high_activation_boxes` does -- the connected region around
    the peak rather than the box of every pixel above the percentile (the official rule, kept in
    the provenance as ``high_activation_box``)."""
    up = upsample(maps[:, None], size, MAP_UPSAMPLING)[:, 0].cpu().numpy()
    return [peak_region_box(m, percentile) for m in up]


def _provenance(model, dataset, image, cell, best, maps, percentile) -> list[dict]:
    size = model.metadata.get("image_size") or _image_size(dataset)
    geometry = model.backbone.geometry
    boxes = high_activation_boxes(maps, (size, size), percentile).tolist()
    regions = evidence_boxes(maps, (size, size), percentile)
    paths = getattr(dataset, "paths", None)
    records = []
    for j in range(len(best)):
        i, r, c = int(image[j]), int(cell[j, 0]), int(cell[j, 1])
        records.append({
            "prototype": j,
            "class": int(model.prototype_class[j]),
            "image_index": i,
            "image_path": str(paths[i]) if paths is not None else None,
            "cell": [r, c],
            "distance": float(best[j]),
            "source_similarity": float(maps[j, r, c]),
            "receptive_field_box": list(geometry.cell_box(r, c, size, size)),
            "high_activation_box": boxes[j],
            "evidence_box": list(regions[j]),
        })
    return records


def _image_size(dataset) -> int:
    return int(dataset[0]["image"].shape[-1])


def apply_push(model, result: PushResult) -> None:
    """Copy the projected vectors into the model and store provenance in its metadata."""
    with torch.no_grad():
        model.prototypes.copy_(result.vectors.to(model.prototypes.dtype))
    model.metadata["prototypes"] = result.provenance


def push_action(ctx) -> dict:
    """The engine's ``push`` phase: validation accuracy before and after, then the projection."""
    before = ctx.evaluate(ctx.data.val)["accuracy"]
    result = compute_push(ctx.model, ctx.data.push, ctx.cfg.batch_size, ctx.dist.device,
                          ctx.cfg.amp, class_specific=getattr(ctx.model, "specific_push", True))
    apply_push(ctx.model, result)
    after = ctx.evaluate(ctx.data.val)["accuracy"]
    return {"val/accuracy_before_push": before, "val/accuracy_after_push": after,
            "push/mean_distance": float(result.distances.mean()),
            "push/class_specific": int(result.moved.sum())}


def labels_of(dataset, indices: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(dataset.labels))
    return labels[indices.cpu()]


@torch.no_grad()
def source_similarity_maps(model, dataset, records: list[dict], batch_size: int = 64,
                           device=None, amp: str = "auto") -> torch.Tensor:
    """``[P, h, w]``: each prototype's similarity map over its recorded source image, computed by
    the model as it is now (the maps the report and the metrics must agree with)."""
    device = device or next(model.parameters()).device
    images = torch.tensor(source_indices(records, dataset), dtype=torch.long)
    unique, slot = torch.unique(images, return_inverse=True)
    feats = source_features(model, dataset, unique.tolist(), batch_size, device, amp)
    _, maps = model.prototype_distances(feats)  # [U, P, h, w], exact at each minimum
    return model.similarity_of(maps[slot.to(maps.device), torch.arange(len(records))])


def same_file(a: str, b: str | None) -> bool:
    """Is push item path ``a`` the recorded source ``b`` (the same class folder and file name
    count, so data that moved still matches)?"""
    return b is None or a == b or PurePath(a).parts[-2:] == PurePath(b).parts[-2:]


def locate_sources(records: list[dict], dataset) -> list[int | None]:
    """Each push record's source image as an index into ``dataset``: the recorded
    ``image_index`` when the item there has the recorded ``image_path``, else the item that has
    it, else None. The push set a model was projected onto may be part of the data given later
    (a model trained from Python, whose validation split was carved out of ``train_data``,
    evaluated with ``push_data=train_data``)."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return [int(r["image_index"]) for r in records]
    paths = [str(p) for p in paths]
    where: dict | None = None
    found: list[int | None] = []
    for r in records:
        i, path = int(r["image_index"]), r.get("image_path")
        if 0 <= i < len(paths) and same_file(paths[i], path):
            found.append(i)
            continue
        if where is None:
            where = {}
            for n, p in reversed(list(enumerate(paths))):  # the first item wins
                where[p] = where[PurePath(p).parts[-2:]] = n
        found.append(where.get(path, where.get(PurePath(str(path)).parts[-2:])))
    return found


def source_indices(records: list[dict], dataset) -> list[int]:
    """:func:`locate_sources`, with a one-line error for a source the data does not hold."""
    found = locate_sources(records, dataset)
    for r, n in zip(records, found):
        if n is None:
            raise UserError(f"prototype p{r.get('prototype')}'s source image "
                            f"'{r.get('image_path')}' is not in the push data: pass the "
                            "training data the model was trained on (push_data=train_data)")
    return found
