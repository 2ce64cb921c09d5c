"""One evaluation of every explainer on the same model and the same images.

For each batch of ``num_images`` images of a dataset (spread over its classes), every explainer
explains the same target classes (the prediction, or the label), and its maps are scored at once
and dropped, so memory stays that of one batch whatever the number of images:

* against the part masks, when the data has them: :func:`protozoo.metrics.map_scores` --
  strict pointing, the fixed-size region around the peak and relevance mass, each beside its
  ``_chance`` level (the score of a map that carries no information);
* deletion and insertion AUC (:mod:`.faithfulness`);
* on the first batch (at most ``sanity_images`` images), the sanity checks (:mod:`.sanity`):
  cascading randomisation, and the random-labels model when one is given.

The result is JSON-ready: ``scores`` is ``{explainer: {metric: value}}``; ``curves``,
``cascade`` and ``settings`` hold what the plots need and how it was measured.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch.utils.data import DataLoader, Subset

from ..errors import UserError
from ..metrics import map_scores, region_side
from ..runtime import resolve_device, to_device
from .explainers import check_image_model, explain, resolve_explainers
from .faithfulness import deletion_insertion
from .sanity import cascading_randomization, similarity


def spread_subset(dataset, count: int | None, seed: int = 0):
    """``count`` items of ``dataset`` spread over its classes, round-robin in class order and
    seeded (:func:`protozoo.data.base.pick_examples`), so a split stored class by class is not
    read as its first class alone and every batch holds every class; all of it when ``count``
    is None or not smaller."""
    if count is None or int(count) >= len(dataset):
        return dataset
    from ..data.base import pick_examples
    from .training import dataset_labels

    return Subset(dataset, pick_examples(dataset_labels(dataset), int(count), seed))


def _seeded(explainer, offset: int):
    """The explainer with its noise seed moved by ``offset`` (each batch gets its own noise)."""
    if any(f.name == "seed" for f in dataclasses.fields(explainer)):
        return dataclasses.replace(explainer, seed=explainer.seed + offset)
    return explainer


def all_maps(model, images, target, explainers, output=None, batch_index: int = 0,
             seconds: dict | None = None) -> dict[str, torch.Tensor]:
    """``{explainer name: maps [B, H, W]}`` for one batch; adds each one's time to ``seconds``."""
    out = {}
    for e in explainers:
        start = time.perf_counter()
        out[e.name] = explain(model, images, _seeded(e, batch_index), target, output=output)
        if seconds is not None:
            seconds[e.name] = seconds.get(e.name, 0.0) + time.perf_counter() - start
    return out


def evaluate_explainers(model, dataset, explainers="all", *, params: dict | None = None,
                        num_images: int | None = 128, batch_size: int = 32, device="auto",
                        target: str = "prediction", steps: int = 16, baseline: str = "zero",
                        blur_sigma: float | None = None, sanity_images: int = 16,
                        cascade: bool = True, random_labels_model=None, seed: int = 0) -> dict:
    """Score ``explainers`` (``"all"``, a name or a list; ``params``: ``{name: {parameter:
    value}}``) on ``model`` over ``num_images`` items of ``dataset`` spread over its classes
    (:func:`spread_subset`; all if None).

    ``target``: ``"prediction"`` (default) or ``"label"``: the class every map explains.
    ``steps``, ``baseline``, ``blur_sigma``: the deletion/insertion settings
    (:func:`~protozoo.explain.faithfulness.deletion_insertion`). ``cascade``: run cascading
    randomisation on the first ``min(sanity_images, batch_size)`` images; with
    ``random_labels_model`` (the same architecture trained for the same steps on shuffled
    labels) its maps of the same images and targets are compared too. ``seed`` fixes every
    random choice (noise, random maps, ties, re-initialisation).

    Returns ``{"scores": {explainer: {metric: value}}, "curves": ..., "cascade": ...,
    "settings": ...}`` (plain numbers and lists)."""
    check_image_model(model)
    if target not in ("prediction", "label"):
        raise UserError(f"target must be 'prediction' or 'label', got '{target}'")
    methods = resolve_explainers(explainers, params, model)
    methods = [_seeded(e, seed) for e in methods]
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    dataset = spread_subset(dataset, num_images, seed)
    if len(dataset) == 0:
        raise UserError("no images to explain: the dataset is empty")
    names = [e.name for e in methods]
    sums: dict[str, dict[str, float]] = {n: {} for n in names}
    curve_sums = {kind: {n: 0.0 for n in names} for kind in ("deletion", "insertion")}
    seconds = {n: 0.0 for n in names}
    forward_seconds, deletion_seconds, count, correct, pixels, sanity = 0.0, 0.0, 0, 0, None, None
    started, cpu_started = time.perf_counter(), time.process_time()
    was = model.training
    model.eval()
    try:
        for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, shuffle=False)):
            batch = to_device(batch, device)
            images, labels = batch["image"].float(), batch["label"]
            start = time.perf_counter()
            with torch.no_grad():
                output = model(images)
            forward_seconds += time.perf_counter() - start
            preds = output.logits.argmax(1)
            goal = preds if target == "prediction" else labels
            maps = all_maps(model, images, goal, methods, output, i, seconds)
            masks = batch.get("mask")
            for name, m in maps.items():
                values = {}
                if masks is not None:
                    values.update(map_scores(m, masks[:, 0], region_side(int(m.shape[-1]))))
                start = time.perf_counter()
                curves = deletion_insertion(model, images, m, goal, steps, baseline, blur_sigma,
                                            seed + i)
                deletion_seconds += time.perf_counter() - start
                pixels = curves["pixels"].tolist()
                values["deletion_auc"] = curves["deletion_auc"]
                values["insertion_auc"] = curves["insertion_auc"]
                for key, v in values.items():
                    sums[name][key] = sums[name].get(key, 0.0) + float(v.float().sum())
                for kind in ("deletion", "insertion"):
                    curve_sums[kind][name] = curve_sums[kind][name] + curves[kind].sum(0).cpu()
            if i == 0 and (cascade or random_labels_model is not None):
                n = min(sanity_images, len(images))
                sanity = (images[:n], goal[:n], {k: v[:n] for k, v in maps.items()})
            count += len(images)
            correct += int((preds == labels).sum())
    finally:
        model.train(was)
    scores = {n: {k: v / count for k, v in sums[n].items()} for n in names}
    for n in names:
        scores[n]["seconds"] = seconds[n]
    result = {"scores": scores,
              "curves": {"pixels": pixels, "fraction": [p / pixels[-1] for p in pixels],
                         **{kind: {n: (curve_sums[kind][n] / count).tolist() for n in names}
                            for kind in curve_sums}},
              "settings": {"num_images": count, "accuracy": correct / count, "target": target,
                           "batch_size": batch_size, "steps": steps, "baseline": baseline,
                           "blur_sigma": blur_sigma, "seed": seed, "device": str(device),
                           "forward_seconds": forward_seconds,
                           "deletion_insertion_seconds": deletion_seconds,
                           "explainers": {e.name: e.params() for e in methods}}}
    if sanity is not None:
        start = time.perf_counter()
        result.update(_sanity(model, methods, sanity, cascade, random_labels_model, seed, device,
                              scores))
        result["settings"]["sanity_seconds"] = time.perf_counter() - start
    result["settings"]["seconds"] = time.perf_counter() - started
    result["settings"]["cpu_seconds"] = time.process_time() - cpu_started  # all threads
    return result


def _sanity(model, methods, sanity, cascade, random_labels_model, seed, device, scores) -> dict:
    images, goal, trained = sanity
    out: dict = {}

    def explain_fn(m, x, t):
        return all_maps(m, x, t, methods)

    if cascade:
        cas = cascading_randomization(model, images, goal, explain_fn, trained, seed)
        out["cascade"] = {"layers": cas["layers"], "num_images": len(images),
                          **{key: {n: cas[n][key] for n in trained} for key in ("spearman",
                                                                                  "ssim")}}
        for n in trained:
            for key in ("spearman", "ssim"):
                scores[n][f"cascade_{key}_top"] = cas[n][key][0]
                scores[n][f"cascade_{key}_full"] = cas[n][key][-1]
    if random_labels_model is not None:
        random_labels_model.to(device)
        was = random_labels_model.training
        try:
            other = explain_fn(random_labels_model, images, goal)
        finally:
            random_labels_model.train(was)
        for n in trained:
            for key, values in similarity(trained[n], other[n]).items():
                scores[n][f"random_labels_{key}"] = float(values.mean())
    return out
