"""Judge every explanation: the model's own against the post-hoc ones, on the same model and
the same images (ground truth, faithfulness, sanity checks, embeddings).

    from protozoo.explain import explain, explain_model
    maps = explain(model, images, "integrated_gradients")      # [B, H, W]
    results = explain_model(model, data.test, "runs/cam/report")  # scores + explainers.html
    metrics.update(explainer_metrics(model, data.test, "all", "runs/cam/report"))

``python evaluate.py RUN --explainers all`` and ``protozoo.evaluate(model, test_data,
explainers="all")`` run :func:`explainer_metrics`: ``metrics.json`` gets ``"explainers"``
(``{explainer: {metric: value}}``, one key per explainer) and ``"explainer_settings"``, and
the report's ``index.html`` the section of table and figures.

* :mod:`.explainers` -- the maps: intrinsic, gradient, SmoothGrad, Integrated Gradients,
  occlusion, Grad-CAM, Guided Backprop (post-hoc ones through Captum) and a random control;
* :mod:`.faithfulness` -- deletion and insertion (Petsiuk et al. 2018), ROAR's pixel removal;
* :mod:`.sanity` -- cascading randomisation and the random-labels model (Adebayo et al. 2018);
* :mod:`.scoring` -- all of it in one batched pass, with the ground-truth metrics of
  :mod:`protozoo.metrics` and their chance levels;
* :mod:`.embeddings` -- PCA and t-SNE of the last layer's inputs, trained against untrained;
* :mod:`.report` -- the table and plots as HTML; :mod:`.training` -- the models the checks
  train (random labels, ROAR), through the engine.

Captum is an optional dependency (``pip install 'protozoo[explain]'``); ``intrinsic`` and
``random`` run without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .embeddings import embedding_figure, last_layer_inputs
from .explainers import check_explainers, create_explainer, explain, list_explainers
from .faithfulness import deletion_insertion, remove_top
from .report import explainer_section, write_explainer_report
from .sanity import cascading_randomization, rank_correlation, ssim
from .scoring import evaluate_explainers
from .training import fresh_copy, train_random_labels

__all__ = ["cascading_randomization", "check_explainers", "create_explainer",
           "deletion_insertion", "embedding_figure", "evaluate_explainers", "explain",
           "explain_model", "explainer_metrics", "explainer_section", "fresh_copy",
           "last_layer_inputs", "list_explainers", "rank_correlation", "remove_top", "ssim",
           "train_random_labels", "write_explainer_report"]


def explain_model(model, dataset, out_dir=None, explainers="all", *, params: dict | None = None,
                  num_images: int | None = 128, batch_size: int = 32, device="auto",
                  random_labels_model=None, embeddings: bool = True, embedding_images: int = 500,
                  grid_images: int = 6, seed: int = 0, append_to=None, **settings) -> dict:
    """Score ``explainers`` on ``model`` over ``num_images`` items of ``dataset`` (a test
    split; spread over its classes) with :func:`evaluate_explainers` (``settings``: its other
    keyword arguments, e.g. ``steps``, ``baseline``, ``target``, ``cascade``); with
    ``out_dir``, also write ``explainers.json`` (the results), ``explainers.html`` and its PNGs
    there, including the embeddings of the trained model and of a random initialisation
    (:func:`fresh_copy`); ``append_to``: a page in ``out_dir`` that gets the same section.
    Returns the results (JSON-ready; ``results["scores"]`` is ``{explainer: {metric: value}}``)."""
    results = evaluate_explainers(model, dataset, explainers, params=params,
                                  num_images=num_images, batch_size=batch_size, device=device,
                                  random_labels_model=random_labels_model, seed=seed, **settings)
    if out_dir is None:
        return results
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = None
    if embeddings:
        device_used = results["settings"]["device"]
        figure = embedding_figure(model, fresh_copy(model, seed).to(device_used), dataset,
                                  out / "explainers_embeddings.png", num_images=embedding_images,
                                  batch_size=batch_size, device=device_used, seed=seed)
    from ..fileio import atomic_write_text

    atomic_write_text(out / "explainers.json", json.dumps(results, indent=2))
    write_explainer_report(out, results, model, dataset, grid_images=grid_images,
                           embeddings=figure, explainers=explainers, params=params,
                           append_to=append_to)
    return results


# what metrics.json keeps of the settings (the per-explainer parameters stay in explainers.json)
_SETTINGS = ("num_images", "accuracy", "target", "batch_size", "steps", "baseline", "blur_sigma",
             "seed", "device", "seconds", "cpu_seconds", "forward_seconds",
             "deletion_insertion_seconds", "sanity_seconds")


def explainer_metrics(model, dataset, explainers="all", report_dir=None, **options) -> dict:
    """The entries a run's ``metrics.json`` gets from :func:`explain_model` (``options``: its
    keyword arguments): ``"explainers"``, one key per explainer with its scores (the
    ground-truth metrics beside their ``_chance`` levels when the data has masks, deletion and
    insertion AUC, the cascade's Spearman and SSIM, seconds), and ``"explainer_settings"`` (how
    they were measured, wall and CPU time). With ``report_dir`` (a written report), also
    ``explainers.json``, ``explainers.html`` and its PNGs there, and the same section at the end
    of its ``index.html``."""
    append_to = None
    if report_dir is not None and (Path(report_dir) / "index.html").is_file():
        append_to = Path(report_dir) / "index.html"
    results = explain_model(model, dataset, report_dir, explainers, append_to=append_to,
                            **options)
    settings = {k: results["settings"][k] for k in _SETTINGS if k in results["settings"]}
    if "cascade" in results:
        settings["cascade_layers"] = results["cascade"]["layers"]
        settings["sanity_images"] = results["cascade"]["num_images"]
    return {"explainers": results["scores"], "explainer_settings": settings}
