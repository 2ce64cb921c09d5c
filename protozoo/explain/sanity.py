"""Sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): an
explanation of a model must depend on the model.

* **Cascading randomisation**: the layers are re-initialised one after another from the top
  (the logits' side) down, cumulatively, and after each the maps of the randomised copy are
  compared with the trained model's, for the same images and the same target classes. A map
  that stays similar while the weights that compute the prediction are random explains the
  image, not the model.
* **Random labels**: a copy of the model trained for the same steps on shuffled labels (the
  caller trains it, e.g. with :func:`protozoo.explain.training.train_random_labels`) must
  explain differently.

Similarity: Spearman's rank correlation (``scipy.stats.spearmanr``) of the two maps' pixels, and
SSIM (Wang et al., IEEE TIP 2004) of the two maps each scaled to [0, 1] by its own minimum and
maximum, as Adebayo et al. report. The maps are compared as each explainer defines them (the
gradient methods' already as absolute values; Integrated Gradients and CAM signed). A map that
is constant (e.g. Grad-CAM clipped to 0 everywhere by a random layer) has no ranking: its rank
correlation with any map is taken as 0.

Layers are the modules that own parameters, ordered by when backpropagation from the logits
reaches their parameters (top first), so the order follows the computation, not the order the
modules were declared in; a normalisation layer is randomised in one step with the layer it
normalises. Re-initialising a layer calls its ``reset_parameters`` (its
construction-time initialisation; a norm layer also forgets its running statistics), seeded;
parameters of a module without one (e.g. ProtoPNet's prototypes) are shuffled in place.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn


def layer_order(model: nn.Module, images: torch.Tensor) -> list[str]:
    """Names of the modules owning parameters (``""`` for the root), in the order one backward
    pass from the logits on ``images`` reaches their parameters (top first). Modules whose
    parameters the logits do not depend on are left out."""
    owners = {id(p): name for name, module in model.named_modules()
              for p in module.parameters(recurse=False)}
    seen: list[str] = []

    def reached(owner: str):
        def hook(grad):
            if owner not in seen:
                seen.append(owner)
        return hook

    was = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    handles = []
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            handles.append(p.register_hook(reached(owners[id(p)])))
        with torch.enable_grad():
            model(images[:2]).logits.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was)
    return seen


def layer_label(model: nn.Module, name: str) -> str:
    """``name``, or for the root module the names of its own parameters (``prototypes``)."""
    return name or ",".join(n for n, _ in model.named_parameters(recurse=False)) or "(root)"


def randomize_layer(model: nn.Module, name: str, seed: int) -> None:
    """Re-initialise module ``name`` of ``model`` in place (see the module docstring)."""
    module = model.get_submodule(name) if name else model
    devices = [p.device for p in module.parameters(recurse=False) if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            return
        for p in module.parameters(recurse=False):
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), device=p.device)])


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own minimum and maximum (a constant map -> 0)."""
    flat = maps.float().flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12) * (hi > lo)).view_as(maps)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, data_range: float = 1.0
         ) -> torch.Tensor:
    """Mean SSIM ``[B]`` of maps ``a`` and ``b`` ``[B, H, W]`` (Wang et al. 2004): a uniform
    ``window`` x ``window`` filter, sample covariances, K1 = 0.01, K2 = 0.03, averaged over the
    positions where the window lies inside the image -- the defaults of
    ``skimage.metrics.structural_similarity``, which it matches."""
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs maps of at least {window} px, got {tuple(a.shape[-2:])}")
    x, y = a.double()[:, None], b.double()[:, None]
    mean = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    n = window * window
    norm = n / (n - 1)  # sample covariance
    mx, my = mean(x), mean(y)
    vx, vy = norm * (mean(x * x) - mx * mx), norm * (mean(y * y) - my * my)
    cxy = norm * (mean(x * y) - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation ``[B]`` between the pixels of ``a[i]`` and ``b[i]``
    (``scipy.stats.spearmanr``; 0 when either map is constant)."""
    xs, ys = a.detach().flatten(1).double().cpu().numpy(), b.detach().flatten(1).double().cpu() \
        .numpy()
    out = []
    for x, y in zip(xs, ys):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            out.append(0.0)
        else:
            out.append(float(spearmanr(x, y).statistic))
    return torch.tensor(out)


def similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"spearman": [B], "ssim": [B]}`` between two batches of maps."""
    return {"spearman": rank_correlation(a, b), "ssim": ssim(minmax(a), minmax(b))}


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def cascade_steps(model: nn.Module, layers: list[str]) -> list[list[str]]:
    """``layers`` (top first) grouped into the cascade's steps: a normalisation layer is
    randomised together with the layer below it (the convolution it normalises), so that a
    step is a layer of the network as a reader counts them and the cascade costs fewer steps."""
    steps, group = [], []
    for name in layers:
        group.append(name)
        module = model.get_submodule(name) if name else model
        if not isinstance(module, NORM_LAYERS):
            steps.append(group)
            group = []
    if group:
        steps.append(group)
    return steps


def cascading_randomization(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                            explain_fn, trained_maps: dict[str, torch.Tensor], seed: int = 0
                            ) -> dict:
    """Cascading randomisation of a *copy* of ``model`` (the model is left as it is).

    ``explain_fn(model, images, target) -> {explainer: maps [B, H, W]}`` computes every
    explainer's maps; ``trained_maps`` are the trained model's. Returns ``{"layers": [step
    labels, top first], explainer: {"spearman": [per step: mean over images], "ssim": [...]}}``;
    entry ``i`` is the similarity after steps ``0..i`` are randomised (:func:`cascade_steps`;
    a step with a normalisation layer is labelled by its other layer, ``+norm``)."""
    steps = cascade_steps(model, layer_order(model, images))
    randomized = copy.deepcopy(model)
    out: dict = {"layers": [layer_label(model, group[-1]) + ("+norm" if len(group) > 1 else "")
                            for group in steps]}
    for name in trained_maps:
        out[name] = {"spearman": [], "ssim": []}
    for i, group in enumerate(steps):
        for j, layer in enumerate(group):
            randomize_layer(randomized, layer, seed + 1000 * i + j)
        maps = explain_fn(randomized, images, target)
        for name, trained in trained_maps.items():
            sim = similarity(trained, maps[name])
            for key, values in sim.items():
                out[name][key].append(float(values.mean()))
    return out
