"""NIWT's fits and its zero-shot evaluation, wired to data bundles.

:func:`fit_niwt` runs the three steps of :mod:`protozoo.models.niwt` on a bundle with a zero-shot
split (``DataBundle.zero_shot``, :class:`protozoo.data.zero_shot.ZeroShotSplit`);
:func:`zero_shot_metrics` scores NIWT and both baselines on the same features in one run.

NIWT's fits are closed-form or full-batch optimisation fits, not SGD phases
---------------------------------------------------------------------------
This is the one place that says so. Every zoo family that trains on images does so in the
engine's epoch or step phases (:class:`protozoo.config.Phase`), with its mixed precision, DDP,
checkpoints and resume; NIWT does not train on images. Its fits run inside one engine action
(``niwt``, :meth:`protozoo.models.niwt.NIWT.phases`), which the engine logs and checkpoints once
it ends, like a push:

* **neuron importances** are computed, not fitted: one pass of gradients over the seen training
  images, in order (:func:`collect_importances`, :meth:`protozoo.models.niwt.NIWT.importances`),
  and the importance Jacobians of a seeded sample of them (:func:`collect_jacobians`);
* **attributes -> importances** (step 2): a linear map fitted by *full-batch* Adam on the
  precomputed (attributes, importances) pairs, the step count chosen by the lowest cosine loss on
  held-out seen classes (:func:`protozoo.models.zeroshot.fit_attribute_map`);
* **lambda**: a grid search scored by the pseudo-GZSL H on held-out seen classes
  (:func:`select_lambda`, :func:`protozoo.models.zeroshot.validation_gzsl_h`);
* **unseen-class weights** (step 3): *full-batch* Adam on the precomputed Jacobians with early
  stopping (:func:`protozoo.models.zeroshot.optimise_unseen_weights`); their biases in closed
  form (:func:`protozoo.models.zeroshot.calibrated_biases`);
* **baselines** (evaluation only): ridge regression attributes -> weights in closed form
  (:func:`protozoo.models.zeroshot.direct_regression_weights`, its strength by
  :func:`~protozoo.models.zeroshot.select_ridge_alpha`) and DAP's per-attribute logistic
  regressions (scikit-learn, :func:`protozoo.models.zeroshot.dap_scores`).

Why not engine phases: each fits a linear map or a few weight vectors on tensors already
computed from the frozen base, in full batches (no sampler, no images), with its own selection
rule (the best held-out step, early stopping); the engine's batching, AMP (which would change
the cosine losses), DDP and mid-phase resume would add nothing. All of them are seeded by
``--seed``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset

from . import zeroshot as zs
from ..runtime import iterate
from ..errors import UserError


def zero_shot_split(model, data):
    """The bundle's :class:`ZeroShotSplit`, checked against the model's classes and attributes."""
    split = getattr(data, "zero_shot", None)
    if split is None:
        raise UserError("NIWT needs a zero-shot dataset (synthetic-attributes or cub-zsl): this "
                        "data has no unseen classes")
    if list(split.class_names) != list(model.class_names):
        raise UserError(f"the data's classes ({split.num_seen} seen + {split.num_unseen} unseen) "
                        f"are not the model's ({model.num_seen} + "
                        f"{model.num_classes - model.num_seen}); use the dataset it was built on")
    if list(split.attribute_names) != list(model.attribute_names):
        raise UserError("the data's attributes are not the ones the model was built with; use "
                        "the dataset it was built on")
    return split


def collect_importances(model, dataset, batch_size: int, device):
    """(importances [N, C] of every image's own class, labels [N], final-layer inputs [N, D] as
    float64 numpy) over ``dataset``."""
    alphas, labels, feats = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        y = batch["label"].to(device)
        alpha, _, _, feat = model.importances(batch["image"].to(device), y)
        alphas.append(alpha)
        labels.append(y)
        feats.append(feat.float().cpu())
    return torch.cat(alphas), torch.cat(labels), torch.cat(feats).numpy().astype(np.float64)


def collect_jacobians(model, dataset, count: int, batch_size: int, device, seed: int):
    """Importance Jacobians [n, D, C] of a seeded sample of ``count`` images of ``dataset``."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.permutation(len(dataset))[: min(count, len(dataset))])
    jacobians = []
    for batch in DataLoader(Subset(dataset, picked.tolist()), batch_size=max(1, batch_size // 4)):
        jacobians.append(model.importance_jacobians(batch["image"].to(device)))
    return torch.cat(jacobians)


def _warn_if_degenerate(model, alphas, labels) -> bool:
    if not zs.importances_are_constant(alphas, labels):
        return False
    warnings.warn(model.degenerate_message(), model.degenerate_warning, stacklevel=3)
    return True


@torch.no_grad()
def _store(model, amap, unseen, bias, alphas, attrs) -> None:
    model.attribute_map.weight.copy_(amap.weight)
    model.attribute_map.bias.copy_(amap.bias)
    model.unseen_weight.copy_(unseen.weight)
    model.unseen_bias.copy_(torch.as_tensor(bias, dtype=model.unseen_bias.dtype))
    model.neuron_attribute_corr.copy_(zs.attribute_correlations(alphas, attrs))
    model.fitted.fill_(True)


def _seen_weights(model) -> np.ndarray:
    """[S, D+1]: the base's final-layer weights with the bias as the last column."""
    head = model.base.get_submodule(model.head_name)
    bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
    weights = torch.cat([head.weight, bias[:, None].to(head.weight)], 1)
    return weights.detach().cpu().double().numpy()


def _optimise(model, jacobians, targets, seen_w: np.ndarray, reg_lambda: float, seed: int,
              feats: np.ndarray, labels: np.ndarray):
    """(optimisation result, weights [U, D+1] with their biases) for ``targets`` [U, C], the new
    classes competing with the seen classes ``seen_w`` whose images are ``feats``/``labels``."""
    hp = model.hp
    weights = torch.as_tensor(seen_w[:, :-1], dtype=jacobians.dtype, device=jacobians.device)
    result = zs.optimise_unseen_weights(
        jacobians, targets, weights, reg_lambda=reg_lambda, lr=hp["lr"],
        max_steps=hp["max_steps"], patience=hp["patience"], min_improvement=hp["min_improvement"],
        seed=seed)
    new = result.weight.cpu().double().numpy()
    if hp["unseen_bias"] == "calibrated":
        bias = zs.calibrated_biases(new, seen_w, feats, labels)
    else:  # "zero" (the official code's untrained new bias) or "mean" (mean seen bias)
        bias = np.full(len(new), seen_w[:, -1].mean() if hp["unseen_bias"] == "mean" else 0.0)
    return result, np.concatenate([new, bias[:, None]], 1)


def select_lambda(model, held_out_map, attributes, jacobians, train, val_data, val_classes,
                  batch_size, device, seed) -> tuple[float, float]:
    """(lambda, validation H): each candidate lambda transfers weights to the held-out seen
    classes (from the map fitted without them, initialised, regularised and calibrated by the
    other seen classes alone), scored by :func:`protozoo.models.zeroshot.validation_gzsl_h` on
    ``val_data`` (held-out images of all seen classes). ``train`` = (features, labels) of the
    seen training images. A fixed ``reg_lambda`` skips the search."""
    if model.hp["reg_lambda"] is not None:
        return float(model.hp["reg_lambda"]), float("nan")
    _, feats, labels = _outputs(model, val_data, batch_size, device)
    seen_w = _seen_weights(model)
    fit = np.array([k for k in range(model.num_seen) if k not in set(val_classes)])
    keep = np.isin(train[1], fit)
    fit_labels = np.searchsorted(fit, train[1][keep])  # index into seen_w[fit]
    targets = held_out_map(attributes[val_classes])
    scored = []
    for reg_lambda in model.hp["lambda_grid"]:
        _, new = _optimise(model, jacobians, targets, seen_w[fit], reg_lambda, seed,
                           train[0][keep], fit_labels)
        scored.append((zs.validation_gzsl_h(feats, labels, seen_w, new, val_classes), reg_lambda))
    best_h, best = max(scored, key=lambda t: (t[0], t[1]))  # ties: the stronger regulariser
    return float(best), float(best_h)


def fit_niwt(model, data, device, batch_size: int = 64, seed: int = 0) -> dict:
    """NIWT steps 1-3 on ``data`` (seen training images: ``data.push``); returns the log record."""
    split = zero_shot_split(model, data)
    hp, num_seen = model.hp, model.num_seen
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        attributes = torch.as_tensor(split.class_attributes, device=device)
        with torch.no_grad():
            model.class_attributes.copy_(attributes)
        alphas, labels, feats = collect_importances(model, data.push, batch_size, device)
        degenerate = _warn_if_degenerate(model, alphas, labels)
        _, val_classes = zs.validation_classes(num_seen, hp["val_class_fraction"], seed)
        amap = zs.fit_attribute_map(attributes[labels], alphas, labels, val_classes,
                                    hp["map_steps"], hp["map_lr"], seed=seed)
        jacobians = collect_jacobians(model, data.push, hp["num_images"], batch_size, device, seed)
        train = (feats, labels.cpu().numpy())
        reg_lambda, val_h = select_lambda(model, amap.held_out, attributes, jacobians, train,
                                          data.val, val_classes, batch_size, device, seed)
        unseen, new = _optimise(model, jacobians, amap(attributes[num_seen:]),
                                _seen_weights(model), reg_lambda, seed, *train)
        _store(model, amap, unseen, new[:, -1], alphas, attributes[labels])
    finally:
        model.train(was_training)
    model.metadata["niwt"] = {"val_classes": [split.class_names[k] for k in val_classes],
                              "seed": seed, "reg_lambda": reg_lambda}
    return {"importance_images": len(alphas), "map_steps": amap.steps,
            "map_val_cosine_distance": amap.val_loss, "reg_lambda": reg_lambda,
            "val_gzsl_h": val_h, "unseen_steps": unseen.steps, "unseen_loss": unseen.loss,
            "unseen_cosine": unseen.cosine, "degenerate_layer": int(degenerate)}


# ----------------------------------------------------------------------------- evaluation

def _outputs(model, dataset, batch_size: int, device):
    """(logits [N, K], penultimate features [N, D], labels [N]) as numpy arrays."""
    logits, feats, labels = [], [], []
    for batch, out in iterate(model, dataset, batch_size, device, amp="off"):
        logits.append(out.logits.float().cpu())
        feats.append(out.penultimate.float().cpu())
        labels.append(batch["label"].cpu())
    return (torch.cat(logits).numpy(), torch.cat(feats).numpy().astype(np.float64),
            torch.cat(labels).numpy())


def _linear_scores(features, weights):
    return features @ weights[:, :-1].T + weights[:, -1]


def explanation_precision(model, dataset, batch_size: int, device,
                          top_k: int = 3) -> dict[str, float]:
    """How often the attribute naming each of the top-k neurons of a prediction is an attribute
    the predicted class has (binarised signature), against chance (the fraction of attributes a
    class has); and how often the top neuron's map peaks on the object (ground-truth mask; strict
pointing, chance = the object's share of the image)."""
    from ..maps import upsample
    from ..metrics import part_share, pointing

    signatures = zs.binarize_attributes(model.class_attributes.cpu().numpy())
    hits, on_object, object_share = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        images = batch["image"].to(device)
        expl = model.explain(images, top_k=top_k)
        for cls, names in zip(expl.classes.tolist(), expl.names):
            for neuron in names:
                top = neuron[0][0] if neuron else None
                hits.append(top is not None and
                            bool(signatures[cls, model.attribute_names.index(top)]))
        if "mask" in batch:
            maps = upsample(expl.maps[:, :1].float(), images.shape[-2:])[:, 0]
            on_object.append(pointing(maps, batch["mask"][:, 0]))
            object_share.append(part_share(batch["mask"][:, 0]))
    result = {"explanation_attribute_precision": float(np.mean(hits)),
              "explanation_attribute_chance": float(signatures.mean())}
    if on_object:
        result["explanation_top_neuron_on_object"] = float(torch.cat(on_object).mean())
        result["explanation_top_neuron_on_object_chance"] = float(torch.cat(object_share).mean())
    return result


def zero_shot_metrics(model, data, batch_size: int = 64) -> dict[str, float]:
    """GZSL metrics (``gzsl_seen``, ``gzsl_unseen``, ``gzsl_h``, ``zsl_unseen``) of NIWT, then of
    ``direct_regression/...`` and ``dap/...`` computed on the same seen classifier's features,
    plus the explanation scores of :func:`explanation_precision`."""
    split = zero_shot_split(model, data)
    device = next(model.parameters()).device
    num_seen = model.num_seen
    seen_logits, seen_feats, seen_labels = _outputs(model, data.test, batch_size, device)
    unseen_logits, unseen_feats, unseen_labels = _outputs(model, split.unseen_test, batch_size,
                                                          device)
    metrics = zs.gzsl_metrics(seen_logits, seen_labels, unseen_logits, unseen_labels, num_seen)

    attributes = split.class_attributes.astype(np.float64)
    seen_w = _seen_weights(model)
    _, val_feats, val_labels = _outputs(model, data.val, batch_size, device)
    names = model.metadata.get("niwt", {}).get("val_classes")
    val_classes = [split.class_names.index(n) for n in names] if names else \
        zs.validation_classes(num_seen, model.hp["val_class_fraction"], 0)[1]
    ridge, _ = zs.select_ridge_alpha(attributes[:num_seen], seen_w, val_feats, val_labels,
                                     val_classes)
    all_w = np.concatenate([seen_w, zs.direct_regression_weights(
        attributes[:num_seen], seen_w, attributes[num_seen:], ridge)])
    direct = zs.gzsl_metrics(_linear_scores(seen_feats, all_w), seen_labels,
                             _linear_scores(unseen_feats, all_w), unseen_labels, num_seen)
    metrics.update({f"direct_regression/{k}": v for k, v in direct.items()})
    metrics["direct_regression/ridge_alpha"] = float(ridge)

    _, train_feats, train_labels = _outputs(model, data.push, batch_size, device)
    test_feats = np.concatenate([seen_feats, unseen_feats])
    dap = zs.dap_scores(train_feats, train_labels, attributes, num_seen, test_feats)
    dap_metrics = zs.gzsl_metrics(dap[: len(seen_feats)], seen_labels, dap[len(seen_feats):],
                                  unseen_labels, num_seen)
    metrics.update({f"dap/{k}": v for k, v in dap_metrics.items()})
    both = ConcatDataset([data.test, split.unseen_test])
    picked = np.random.default_rng(0).permutation(len(both))[:600]
    metrics.update(explanation_precision(model, Subset(both, sorted(picked.tolist())),
                                         batch_size, device))
    return metrics
