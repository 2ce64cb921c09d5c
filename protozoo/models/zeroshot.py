"""Zero-shot learning computations: NIWT's optimisation steps, its baselines and the GZSL metrics.

Pure functions on tensors and arrays (no model, no data loading), so each can be tested against
hand-computed values. :mod:`protozoo.models.niwt` wires them to a network and
:mod:`protozoo.models.niwt_fit` runs them; its docstring lists which are closed-form and which
full-batch optimisation fits (none is an SGD phase of the engine).

NIWT (Selvaraju et al., "Choose Your Neuron: Incorporating Domain Knowledge through
Neuron-Importance", ECCV 2018) and its official code (github.com/ramprs/neuron-importance-zsl):

* :func:`fit_attribute_map` -- the linear map from a class's attributes to the importances of its
  images (``mod2alpha.py``: linear, cosine-distance loss on per-image importances, Adam, the epoch
  with the lowest loss on held-out *seen* classes is kept);
* :func:`optimise_unseen_weights` -- unseen-class weights whose induced importances match the
  predicted ones (``alpha2w.py``: Gaussian initialisation around the mean seen weight vector
  with the seen weights' per-dimension spread, cosine distance + lambda * ||w - mean||^2, Adam,
  stop when the loss has not improved by 1% for 40 steps -- :class:`EarlyStopping`).

Baselines (evaluated in the same run): :func:`direct_regression_weights` (attributes -> classifier
weights by closed-form ridge regression) and :func:`dap_scores` (Lampert et al.'s Direct Attribute
Prediction: per-attribute probabilistic classifiers, a class scores by the likelihood of its
attribute signature). Metrics: :func:`gzsl_metrics` (Xian et al.'s protocol, as in the official
code: mean per-class accuracy, seen and unseen test images each classified over all classes, their
harmonic mean, and unseen-only accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- metrics

def mean_per_class_accuracy(preds, labels) -> float:
    """Mean over the classes present in ``labels`` of each class's accuracy (scikit-learn's
    balanced accuracy; predictions of classes absent from ``labels``, e.g. unseen classes for
    seen images, count as errors); NaN without labels."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    preds, labels = np.asarray(preds), np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, preds))


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def gzsl_metrics(seen_scores, seen_labels, unseen_scores, unseen_labels,
                 num_seen: int) -> dict[str, float]:
    """``gzsl_seen``/``gzsl_unseen``: mean per-class accuracy of seen/unseen test images classified
    over *all* classes; ``gzsl_h``: their harmonic mean; ``zsl_unseen``: unseen test images
    classified over the unseen classes only. Scores are ``[N, K]`` over all classes (seen first);
    labels index the same K classes."""
    seen_scores, unseen_scores = np.asarray(seen_scores), np.asarray(unseen_scores)
    seen_acc = mean_per_class_accuracy(seen_scores.argmax(1), seen_labels)
    unseen_acc = mean_per_class_accuracy(unseen_scores.argmax(1), unseen_labels)
    zsl = mean_per_class_accuracy(unseen_scores[:, num_seen:].argmax(1) + num_seen, unseen_labels)
    return {"gzsl_seen": seen_acc, "gzsl_unseen": unseen_acc,
            "gzsl_h": harmonic_mean(seen_acc, unseen_acc), "zsl_unseen": zsl}


def validation_classes(num_classes: int, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded (fit, held-out) partition of ``range(num_classes)``; at least one class in each."""
    count = int(np.clip(round(fraction * num_classes), 1, num_classes - 1))
    held = sorted(np.random.default_rng(seed).permutation(num_classes)[:count].tolist())
    return [k for k in range(num_classes) if k not in held], held


# ----------------------------------------------------------------------------- NIWT steps

def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dimension (0 for parallel, 2 for opposite vectors)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)


class EarlyStopping:
    """The official NIWT stopping rule: stop once the loss has gone ``patience`` consecutive steps
    without improving by more than ``min_improvement`` (relative) on the reference loss; the
    reference is the first loss and moves to every loss that improves on it by that much
    (``alpha2w.py``: ``zsl_loss_estop_window=40``, ``eps_perc=0.01``)."""

    def __init__(self, patience: int = 40, min_improvement: float = 0.01):
        self.patience, self.min_improvement = int(patience), float(min_improvement)
        self.reference: float | None = None
        self.stale = 0

    def step(self, loss: float) -> bool:
        """Record one step's loss; True when optimisation should stop."""
        loss = float(loss)
        if self.reference is None or 1.0 - loss / self.reference > self.min_improvement:
            self.reference, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def importances_are_constant(importances: torch.Tensor, classes: torch.Tensor,
                             tol: float = 1e-4) -> bool:
    """True when every class's importances are the same for all its images (relative spread
    below ``tol``): the signature of a layer that feeds GAP + a linear layer directly, where the
    summed importance of class k is exactly its weight vector w_k."""
    checked = False
    for k in classes.unique():
        group = importances[classes == k]
        if len(group) < 2:
            continue
        spread = (group - group.mean(0)).abs().max()
        if spread > tol * group.abs().max().clamp_min(1e-12):
            return False
        checked = True
    return checked


@dataclass
class AttributeMap:
    """``importance = weight @ attributes + bias``; ``weight`` is [C, M]."""

    weight: torch.Tensor
    bias: torch.Tensor
    steps: int = 0
    val_loss: float = float("nan")
    held_out: "AttributeMap | None" = None  # the map fitted without the held-out classes

    def __call__(self, attributes: torch.Tensor) -> torch.Tensor:
        return attributes @ self.weight.T + self.bias


def _train_map(attrs, targets, steps, lr, weight_decay, seed, val=None):
    """Full-batch Adam on the mean cosine distance. Returns (weight, bias, val losses); with
    ``val``, the weights are those of the step with the lowest validation loss."""
    gen = torch.Generator().manual_seed(seed)
    m, c = attrs.shape[1], targets.shape[1]
    weight = (torch.randn(c, m, generator=gen, dtype=attrs.dtype) * 0.01).to(attrs.device)
    weight.requires_grad_()
    bias = torch.zeros(c, dtype=attrs.dtype, device=attrs.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    val_losses, best = [], None
    for _ in range(steps):
        loss = cosine_distance(attrs @ weight.T + bias, targets).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if val is not None:
            with torch.no_grad():
                val_losses.append(float(cosine_distance(val[0] @ weight.T + bias, val[1]).mean()))
            if val_losses[-1] <= min(val_losses):
                best = (weight.detach().clone(), bias.detach().clone())
    if best is None:
        best = (weight.detach(), bias.detach())
    return best[0], best[1], val_losses


def fit_attribute_map(attributes: torch.Tensor, importances: torch.Tensor, classes: torch.Tensor,
                      val_classes: list[int], max_steps: int = 300, lr: float = 1e-2,
                      weight_decay: float = 0.0, seed: int = 0) -> AttributeMap:
    """Learn the linear map attributes -> importances (NIWT step 2) with a cosine loss.

    ``attributes`` [N, M] is each training image's class attribute vector, ``importances`` [N, C]
    its observed importances, ``classes`` [N] its class. The map is trained on the images of the
    classes not in ``val_classes``; the step count with the lowest cosine loss on the held-out
    classes' images is selected (as the official code keeps its best validation epoch), and the
    map is then refitted on all seen classes for that many steps (our choice: with few seen
    classes, the held-out ones are too valuable to leave out of the final map). The map of the
    selected step *without* the held-out classes is kept as ``held_out`` (it tunes the next step).
    """
    held = torch.isin(classes, torch.as_tensor(val_classes, device=classes.device))
    if held.all() or not held.any():
        raise ValueError("val_classes must hold out some, but not all, of the classes")
    w_fit, b_fit, val_losses = _train_map(attributes[~held], importances[~held], max_steps, lr,
                                          weight_decay, seed,
                                          val=(attributes[held], importances[held]))
    best = int(np.argmin(val_losses)) + 1
    weight, bias, _ = _train_map(attributes, importances, best, lr, weight_decay, seed)
    return AttributeMap(weight, bias, best, float(val_losses[best - 1]),
                        AttributeMap(w_fit, b_fit, best, float(val_losses[best - 1])))


@dataclass
class UnseenWeights:
    weight: torch.Tensor  # [U, D]
    steps: int
    loss: float
    cosine: float  # mean cosine similarity of induced and target importances at the end
    history: list[float]


def induced_importances(weight: torch.Tensor, jacobians: torch.Tensor) -> torch.Tensor:
    """Importances that class weights ``weight`` [U, D] induce on images whose importance
    Jacobians are ``jacobians`` [N, D, C]: ``[U, N, C]`` with ``out[u, n] = weight[u] @ J[n]``.

    Exact, not an approximation: a new class's score is ``w . f(x)`` with ``f`` the features the
    final layer reads, so its gradient with respect to the chosen layer, summed over space, is
    ``J(x)^T w`` with ``J(x)`` the (space-summed) Jacobian of ``f`` -- which does not depend on w.
    """
    return torch.einsum("ud,ndc->unc", weight, jacobians)


def optimise_unseen_weights(jacobians: torch.Tensor, targets: torch.Tensor, seen_weights:
                            torch.Tensor, reg_lambda: float = 1e-2, lr: float = 1e-2,
                            max_steps: int = 3000, patience: int = 40,
                            min_improvement: float = 0.01, seed: int = 0) -> UnseenWeights:
    """NIWT step 3: weights of unseen classes whose induced importances match ``targets`` [U, C].

    Initialised from ``N(mean, std)`` of the seen class weights ``seen_weights`` [S, D], per
    dimension (official ``seen_centered`` initialisation). Loss per class: the mean over the input
    images of ``1 - cos(induced, target)`` plus ``reg_lambda * ||w - mean||^2``; the total is the
    mean over classes (the official code sums the regulariser over classes with a factor 1/2;
    averaging keeps lambda's meaning independent of the number of unseen classes). Adam, all
    images every step (the official code draws mini-batches; full batches make the loss curve,
    and so the early-stopping rule, deterministic), stopped by :class:`EarlyStopping`.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mean, std = seen_weights.mean(0), seen_weights.std(0, unbiased=False)
    noise = torch.randn(targets.shape[0], seen_weights.shape[1], generator=gen)
    weight = (mean + std * noise.to(mean)).clone().requires_grad_()
    opt = torch.optim.Adam([weight], lr=lr)
    stopper = EarlyStopping(patience, min_improvement)
    history: list[float] = []
    for _ in range(max_steps):
        induced = induced_importances(weight, jacobians)
        cos_term = cosine_distance(induced, targets[:, None, :]).mean(1)  # [U]
        loss = (cos_term + reg_lambda * (weight - mean).pow(2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if stopper.step(history[-1]):
            break
    with torch.no_grad():
        cosine = float(1 - cosine_distance(induced_importances(weight, jacobians),
                                           targets[:, None, :]).mean())
    return UnseenWeights(weight.detach(), len(history), history[-1], cosine, history)


def calibrated_biases(new_weights: np.ndarray, seen_weights: np.ndarray, features: np.ndarray,
                      labels: np.ndarray) -> np.ndarray:
    """Biases [U] for new classes' weights ``new_weights`` [U, D], from seen images alone.

    Each new class's mean score over the seen images ``features`` [N, D] (none of which belongs
    to it) is set to the mean score a seen class gives the images of *other* seen classes
    (``seen_weights`` [S, D+1], bias last; ``labels`` index them). NIWT's loss constrains the
    direction of a new weight vector through its importances but not the offset ``w . f`` it
    adds to every image; this puts new and seen classes on the same footing for images that are
    not theirs, which is what generalised zero-shot classification compares.
    """
    scores = features @ seen_weights[:, :-1].T + seen_weights[:, -1]
    present = np.unique(labels)
    level = np.mean([scores[labels != k, k].mean() for k in present])
    return level - (features @ new_weights.T).mean(0)


def validation_gzsl_h(features: np.ndarray, labels: np.ndarray, seen_weights: np.ndarray,
                      new_weights: np.ndarray, val_classes: list[int]) -> float:
    """Harmonic mean of a pseudo generalised zero-shot test on held-out *seen* classes.

    ``seen_weights`` [S, D+1] (bias last) are the classifier's weights; the held-out classes'
    rows are replaced by ``new_weights`` [V, D+1] (predicted without them), and the images
    ``features`` [N, D] of the other classes and of the held-out ones are classified over all S
    classes. Used to tune NIWT's lambda and the regression baseline's ridge strength alike: it
    scores both the ranking and the *scale* of new weights against the seen ones, which a
    held-out-only accuracy would not.
    """
    weights = np.array(seen_weights, dtype=np.float64, copy=True)
    weights[val_classes] = new_weights
    preds = (features @ weights[:, :-1].T + weights[:, -1]).argmax(1)
    held = np.isin(labels, val_classes)
    return harmonic_mean(mean_per_class_accuracy(preds[~held], labels[~held]),
                         mean_per_class_accuracy(preds[held], labels[held]))


def attribute_correlations(importances: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [C, M] between each neuron's importance and each attribute over images
    (0 where either is constant): how strongly a neuron matters for images that have an attribute.
    """
    x = importances - importances.mean(0)
    y = attributes - attributes.mean(0)
    cov = x.T @ y / max(len(x), 1)
    scale = x.pow(2).mean(0).sqrt()[:, None] * y.pow(2).mean(0).sqrt()[None, :]
    return torch.where(scale > 0, cov / scale.clamp_min(1e-12), torch.zeros_like(cov))


# ----------------------------------------------------------------------------- baselines

def direct_regression_weights(seen_attributes: np.ndarray, seen_weights: np.ndarray,
                              unseen_attributes: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge regression (closed form, with intercept) from class attributes to class weights
    (bias as the last column): the baseline NIWT must beat, fitted on the seen classes."""
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky")
    return model.fit(seen_attributes, seen_weights).predict(unseen_attributes)


def select_ridge_alpha(seen_attributes, seen_weights, features, labels, val_classes,
                       candidates=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> tuple[float, float]:
    """(ridge strength, its validation H): weights fitted without ``val_classes`` and scored by
    :func:`validation_gzsl_h` on ``features`` [N, D] / ``labels`` (seen indices)."""
    val = np.asarray(val_classes)
    fit = np.setdiff1d(np.arange(len(seen_attributes)), val)
    scored = []
    for alpha in candidates:
        pred = direct_regression_weights(seen_attributes[fit], seen_weights[fit],
                                         seen_attributes[val], alpha)
        scored.append((validation_gzsl_h(features, labels, seen_weights, pred, val), alpha))
    best_h, best_alpha = max(scored, key=lambda t: (t[0], -t[1]))
    return best_alpha, best_h


def binarize_attributes(class_attributes: np.ndarray) -> np.ndarray:
    """Binary attribute signatures: each attribute thresholded at its mean over the classes
    (as Lampert et al. binarise continuous class-attribute matrices); binary input is unchanged."""
    return (class_attributes > class_attributes.mean(0, keepdims=True)).astype(np.int64)


def dap_scores(train_features: np.ndarray, train_labels: np.ndarray, class_attributes: np.ndarray,
               num_seen: int, test_features: np.ndarray, C: float = 1.0) -> np.ndarray:
    """DAP (Lampert et al., CVPR 2009 / TPAMI 2014) log-scores [N_test, K] for all K classes.

    One logistic regression per attribute on the seen training images (standardised features);
    ``log p(k | x) = sum_m log p(a_m = s_km | x) - log p(a_m = s_km) + const``, with ``s`` the
    binary signatures and ``p(a_m)`` the attribute's frequency over the seen classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    signatures = binarize_attributes(class_attributes)
    scaler = StandardScaler().fit(train_features)
    x_train, x_test = scaler.transform(train_features), scaler.transform(test_features)
    eps = 1e-3
    prior = np.clip(signatures[:num_seen].mean(0), eps, 1 - eps)
    scores = np.zeros((len(test_features), len(class_attributes)))
    for m in range(signatures.shape[1]):
        targets = signatures[train_labels, m]
        if targets.min() == targets.max():  # constant among the seen images: nothing to learn
            p = np.full(len(x_test), float(targets[0]))
        else:
            clf = LogisticRegression(C=C, max_iter=1000).fit(x_train, targets)
            p = clf.predict_proba(x_test)[:, 1]
        p = np.clip(p, eps, 1 - eps)[:, None]
        s = signatures[:, m][None, :]
        scores += np.where(s == 1, np.log(p) - np.log(prior[m]),
                           np.log(1 - p) - np.log(1 - prior[m]))
    return scores
