"""NIWT zero-shot head: Neuron-Importance-aware Weight Transfer (Selvaraju et al., "Choose Your
Neuron: Incorporating Domain Knowledge through Neuron-Importance", ECCV 2018).

A head on a trained zoo classifier (the *base*) that adds classifiers for unseen classes known
only by their attributes, in three steps (the action ``niwt``, run by ``train.py --model niwt
--base RUN``; see :mod:`protozoo.models.zeroshot` for the computations and the official code
they follow, and :mod:`protozoo.models.niwt_fit` for how each is fitted):

1. **neuron importances** of the seen training images: Grad-CAM's channel weights, the gradient of
   the image's class score (pre-softmax) with respect to the chosen layer's activations, *summed*
   over space as in the official ``alpha_extraction.py`` (Grad-CAM averages; the factor h*w does
   not change any cosine below);
2. a **linear map attributes -> importances**, cosine loss, selected on held-out seen classes;
3. **unseen-class weights** in the base's final linear layer whose induced importances match the
   importances predicted from the class's attributes, optimised on seen-class images (which carry
   no unseen label).

Where the paper and the official code leave a choice open, or the official choice does not carry
over to other networks, we decide as follows (each measured on a development split of
synthetic-attributes, generator seed 1, never on the reported test split):

* **lambda** is selected from ``lambda_grid`` on held-out seen classes (the map fitted without
  them predicts their importances, weights are transferred to them, and the pseudo generalised
  zero-shot H over the held-out images of all seen classes scores each lambda); the official
  code fixes it per dataset in a config file. The cosine loss fixes only the *direction* of a new
  weight vector, so lambda sets its scale against the seen classes -- the operating point of
  generalised zero-shot classification.
* **unseen biases** are calibrated on seen images
  (:func:`protozoo.models.zeroshot.calibrated_biases`): the official code's new bias receives no
  gradient from the importance loss and stays at zero, which leaves the offset ``w . f`` of every
  new class to chance (dev split: GZSL H 0.11 with the mean seen bias, 0.61 calibrated).
  ``unseen_bias="zero"`` restores the official behaviour.
* the attribute map is refitted on all seen classes for the selected number of steps, and the
  unseen-weight optimisation uses full batches of a fixed sample of seen images (see
  :mod:`protozoo.models.zeroshot`).

The chosen layer must have non-linear layers above it. At the map that feeds global average
pooling and the linear classifier (a CAM net's ``extra`` output, or its ``backbone`` when
``extra_conv=0``), the summed importance of class k *is* the class weight vector w_k for every
image, so NIWT collapses to regressing classifier weights: :meth:`NIWT.check_layer` detects this
(importances identical across images) and warns with :class:`DegenerateLayerWarning`. The tested
set-up is the CAM net with ``extra_conv`` (3x3 conv + ReLU above the backbone) and NIWT at
``layer="backbone"``; any base whose last ``nn.Linear`` produces the seen-class logits works.

The extended model classifies over seen + unseen classes (seen first), saves and loads like any
zoo model, and explains a prediction (:meth:`NIWT.explain`): the neurons most important for the
class, each named by the attributes its importance correlates with most over the seen training
images, with each neuron's Grad-CAM map ``relu(alpha_c * A_c)`` (the paper describes these
explanations; the official code does not include them).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import zeroshot as zs
from ..config import Phase, TrainConfig
from ..errors import UserError
from ..outputs import ModelOutput
from ..registry import create_model, register_model, saved_kwargs
from .base import ZooModel


class DegenerateLayerWarning(UserWarning):
    """NIWT's layer feeds global average pooling + the linear classifier directly."""


@dataclass
class NIWTOutput(ModelOutput):
    """``logits`` over seen + unseen classes (seen first)."""

    features: torch.Tensor  # [B, C, h, w], activations of the chosen layer (the neurons)
    penultimate: torch.Tensor  # [B, D], what the final linear layer reads


@dataclass
class Explanation:
    """Why images were given their classes: the top-k neurons of each image's class."""

    classes: torch.Tensor  # [B], the explained class of each image (predicted by default)
    neurons: torch.Tensor  # [B, k], channel indices of the chosen layer, most important first
    importances: torch.Tensor  # [B, k], their importance (gradient summed over space)
    maps: torch.Tensor  # [B, k, h, w], relu(importance * activation): where each neuron fired
    names: list[list[list[tuple[str, float]]]]  # [B][k] -> (attribute, correlation), best first


@register_model("niwt")
class NIWT(ZooModel):
    report_writer = "protozoo.render.niwt_report:write_niwt_report"
    base_run = ("the --out folder of a train.py run of its seen-class classifier (e.g. --model "
                "cam --model-arg extra_conv=64 --dataset synthetic-attributes)")
    # what a run on the base's data needs: its data settings and backbone, unless flags say else
    INHERITED_KEYS = ("dataset", "data_dir", "cache_dir", "image_size", "num_classes",
                      "num_train", "num_test", "val_fraction", "backbone")

    def __init__(self, base_model: str = "cam", base_kwargs: dict | None = None,
                 unseen_classes: list[str] | None = None,
                 attribute_names: list[str] | None = None, layer: str = "backbone",
                 class_names: list[str] | None = None, reg_lambda: float | None = None,
                 lambda_grid: tuple = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1), lr: float = 1e-2,
                 max_steps: int = 3000, patience: int = 40, min_improvement: float = 0.01,
                 num_images: int = 128, map_steps: int = 400, map_lr: float = 1e-2,
                 val_class_fraction: float = 0.2, unseen_bias: str = "calibrated",
                 top_attributes: int = 2, pretrained=False):
        """
        Args:
            base_model, base_kwargs: the seen classifier (its registered name and constructor
                arguments; ``train.py --base RUN`` fills them in and copies its weights).
            unseen_classes: names of the classes to add; attribute_names: the attributes.
            layer: module name in the base whose output holds the neurons (default the
                backbone's feature map).
            reg_lambda, lr, max_steps, patience, min_improvement: unseen-weight optimisation
                (``lambda * ||w - mean||^2``; Adam; the 1%/40-step early-stopping rule).
                ``reg_lambda=None`` selects lambda from ``lambda_grid`` on held-out seen classes
                (:func:`protozoo.models.niwt_fit.select_lambda`).
            num_images: seen training images used as inputs for that optimisation.
            map_steps, map_lr: attribute -> importance map training (Adam, full batch), with
                ``val_class_fraction`` of the seen classes held out to select its step count.
            unseen_bias: "calibrated" (default; :func:`protozoo.models.zeroshot.calibrated_biases`),
                "zero" (the official code: the new layer's bias stays at its initial zero) or
                "mean" (the mean seen bias).
            top_attributes: attributes named per neuron in explanations.
            pretrained: unused (as for every zoo model, rebuilding passes False): the weights
                come from the base run or the checkpoint.
        """
        super().__init__()
        kwargs = {k: v for k, v in (base_kwargs or {}).items() if k != "pretrained"}
        self.base = create_model(base_model, **saved_kwargs(base_model, kwargs))
        unseen = list(unseen_classes or [])
        if not unseen or not attribute_names:
            raise UserError("model 'niwt' needs unseen_classes and attribute_names; build it "
                            "with train.py --model niwt --base RUN on a zero-shot dataset")
        self.num_seen = len(self.base.class_names)
        self.class_names = list(self.base.class_names) + unseen
        self.num_classes = len(self.class_names)
        if class_names is not None and list(class_names) != self.class_names:
            raise ValueError("class_names must be the base's classes followed by unseen_classes")
        self.attribute_names = list(attribute_names)
        self.metadata: dict = {}
        self.layer, self.hp = layer, dict(
            reg_lambda=reg_lambda, lambda_grid=[float(v) for v in lambda_grid], lr=lr,
            max_steps=max_steps, patience=patience,
            min_improvement=min_improvement, num_images=num_images, map_steps=map_steps,
            map_lr=map_lr, val_class_fraction=val_class_fraction, unseen_bias=unseen_bias,
            top_attributes=top_attributes)
        if unseen_bias not in ("calibrated", "zero", "mean"):
            raise UserError(f"unseen_bias='{unseen_bias}' is not one of calibrated, zero, mean")
        self.head_name = _find_head(self.base, self.num_seen, base_model)
        channels = self._layer_channels()
        head = self.base.get_submodule(self.head_name)
        self.unseen_weight = nn.Parameter(torch.zeros(len(unseen), head.in_features))
        self.unseen_bias = nn.Parameter(torch.zeros(len(unseen)))
        self.attribute_map = nn.Linear(len(self.attribute_names), channels)
        self.register_buffer("class_attributes",
                             torch.zeros(self.num_classes, len(self.attribute_names)))
        self.register_buffer("neuron_attribute_corr",
                             torch.zeros(channels, len(self.attribute_names)))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # ---------------------------------------------------------------- structure
    @property
    def backbone(self):
        return self.base.backbone

    @property
    def seen_classes(self) -> list[str]:
        return self.class_names[: self.num_seen]

    @property
    def unseen_classes(self) -> list[str]:
        return self.class_names[self.num_seen:]

    @property
    def data_class_names(self) -> list[str]:
        """The classes its data trains on (the seen ones); evaluation checks the data by them."""
        return self.seen_classes

    def _layer_module(self) -> nn.Module:
        names = [n for n, _ in self.base.named_modules() if n]
        if self.layer not in names:
            import difflib

            close = difflib.get_close_matches(self.layer, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"choose a module name of the base, e.g. {', '.join(names[:4])}"
            raise UserError(f"unknown layer '{self.layer}' for NIWT on base "
                            f"'{self.base.model_name}': {hint}")
        return self.base.get_submodule(self.layer)

    def _layer_channels(self) -> int:
        size = max(64, 4 * self.base.stride)
        with torch.no_grad(), self._inference(), self._capture() as cap:
            self.base(torch.zeros(1, 3, size, size))
        return int(cap["activations"].shape[1])

    @contextmanager
    def _capture(self, grad_from_layer: bool = False):
        """Hooks that record the chosen layer's output and the final linear layer's input.

        With ``grad_from_layer`` the layer's output is replaced by a detached copy that requires
        grad, so gradients flow to it (and only through the layers above it)."""
        store: dict = {}

        def layer_hook(module, inputs, output):
            if not torch.is_tensor(output) or output.ndim != 4:
                raise UserError(f"layer '{self.layer}' does not output a feature map "
                                "[B, C, h, w]; choose a convolutional layer of the base")
            if grad_from_layer:
                output = output.detach().requires_grad_(True)
            store["activations"] = output
            return output

        def head_hook(module, inputs):
            store["penultimate"] = inputs[0]

        handles = [self._layer_module().register_forward_hook(layer_hook),
                   self.base.get_submodule(self.head_name).register_forward_pre_hook(head_hook)]
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _inference(self):
        """Eval mode for the duration (importances are defined at inference: with batch-norm in
        training mode the images of a batch would change each other's gradients)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- forward
    def _run(self, x: torch.Tensor, grad_from_layer: bool = False):
        with self._capture(grad_from_layer) as cap:
            seen_logits = self.base(x).logits
        feats = cap["penultimate"]
        unseen_logits = feats @ self.unseen_weight.T.to(feats.dtype) + self.unseen_bias
        return torch.cat([seen_logits, unseen_logits.to(seen_logits.dtype)], 1), cap

    def forward(self, x: torch.Tensor) -> NIWTOutput:
        logits, cap = self._run(x)
        return NIWTOutput(logits=logits, stride=self.stride, features=cap["activations"],
                          penultimate=cap["penultimate"])

    # ---------------------------------------------------------------- importances
    def importances(self, x: torch.Tensor, classes: torch.Tensor | None = None):
        """(importances [B, C] of each image's class, activations [B, C, h, w], logits [B, K],
        final-layer input [B, D]).

        Grad-CAM channel weights summed over space: ``d logit[class] / d A`` for all images of the
        batch in one backward pass (in eval mode, images do not interact). ``classes`` default to
        the predicted ones; unseen classes use the unseen weights."""
        with torch.enable_grad(), self._inference():
            logits, cap = self._run(x, grad_from_layer=True)
            if classes is None:
                classes = logits.argmax(1)
            chosen = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            (grad,) = torch.autograd.grad(chosen, cap["activations"])
        return (grad.sum((2, 3)).detach(), cap["activations"].detach(), logits.detach(),
                cap["penultimate"].detach())

    def importance_jacobians(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, C]: the space-summed Jacobian of the final layer's input with respect to the
        chosen layer, so that any class weight vector w induces importances ``w @ J`` (see
        :func:`protozoo.models.zeroshot.induced_importances`). One batched backward pass per image
        batch (vmap over the D output directions)."""
        with torch.enable_grad(), self._inference():
            _, cap = self._run(x, grad_from_layer=True)
            feats, acts = cap["penultimate"], cap["activations"]
            eye = torch.eye(feats.shape[1], device=feats.device, dtype=feats.dtype)
            directions = eye[:, None, :].expand(-1, feats.shape[0], -1)
            (grads,) = torch.autograd.grad(feats, acts, grad_outputs=directions,
                                           is_grads_batched=True)
        return grads.sum((3, 4)).permute(1, 0, 2).detach()

    def check_layer(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> bool:
        """Warn (and return True) when the chosen layer is degenerate for NIWT: its importances are
        the same for every image (the layer feeds GAP + the linear classifier directly, so the
        importance of class k equals the class weight vector w_k)."""
        if classes is None:
            classes = torch.arange(len(images)) % 2
        alphas = self.importances(images, classes.to(images.device))[0]
        if not zs.importances_are_constant(alphas, classes.to(alphas.device)):
            return False
        warnings.warn(self.degenerate_message(), DegenerateLayerWarning, stacklevel=2)
        return True

    degenerate_warning = DegenerateLayerWarning

    def degenerate_message(self) -> str:
        return (f"NIWT layer '{self.layer}' feeds global average pooling and the linear "
                "classifier directly: its importance of class k is the class weight vector w_k "
                "for every image, so NIWT reduces to regressing classifier weights; choose a "
                "layer with non-linear layers above it (e.g. layer='backbone' on a CAM base "
                "trained with --model-arg extra_conv=64)")

    # ---------------------------------------------------------------- building from a run
    @classmethod
    def inherited_config(cls, run_config: dict, checkpoint_config: dict) -> dict:
        """The base run's data settings and backbone, so ``--base RUN`` alone picks the same
        data; the checkpoint's own backbone decides the input normalisation."""
        values = {k: run_config[k] for k in cls.INHERITED_KEYS if run_config.get(k) is not None}
        backbone = checkpoint_config.get("kwargs", {}).get("backbone")
        if backbone:
            values["backbone"] = backbone
        return values

    @classmethod
    def from_config(cls, cfg: TrainConfig, data, base: ZooModel | None = None) -> NIWT:
        """The head on ``base`` (the seen classifier of run ``cfg.model_args["base"]``, with its
        weights) for the data's unseen classes and attributes, with the other
        ``cfg.model_args``."""
        args = dict(cfg.model_args)
        base_dir = args.pop("base", None)
        split = getattr(data, "zero_shot", None)
        if split is None:
            raise UserError(f"dataset '{cfg.dataset}' has no unseen classes: NIWT needs a "
                            "zero-shot dataset (synthetic-attributes or cub-zsl)")
        if base is None:
            raise UserError(f"model 'niwt' extends a trained run: pass --base RUN_DIR, "
                            f"{cls.base_run}")
        if isinstance(base, NIWT):
            raise UserError(f"--base '{base_dir}' is a NIWT run; pass the run of its seen "
                            "classifier")
        if list(base.class_names) != split.seen_classes:
            raise UserError(f"--base '{base_dir}' was trained on {len(base.class_names)} other "
                            f"classes (e.g. '{base.class_names[0]}') than the seen classes of "
                            f"'{cfg.dataset}' ({split.num_seen}, e.g. "
                            f"'{split.seen_classes[0]}'): train the base on the same --dataset")
        size = base.metadata.get("image_size")
        if size is not None and data.image_size != size:
            raise UserError(f"--base '{base_dir}' was trained on {size} px images but the data is "
                            f"{data.image_size} px: drop --image-size (it is inherited from the "
                            "base)")
        try:
            model = create_model("niwt", base_model=base.model_name, base_kwargs=base.config(),
                                 unseen_classes=split.unseen_classes,
                                 attribute_names=split.attribute_names, **args)
        except TypeError as exc:
            raise UserError(f"model 'niwt' does not take these arguments ({exc}); check "
                            "--model-arg names against its docstring") from None
        model.base.load_state_dict(base.state_dict())
        model.metadata["base_run"] = str(base_dir)
        return model

    # ---------------------------------------------------------------- training (an action)
    def phases(self, cfg: TrainConfig) -> list[Phase]:
        """One action, no epochs: NIWT fits its head from importances, it does not run SGD over
        images (its closed-form and full-batch fits: :mod:`protozoo.models.niwt_fit`)."""
        return [Phase("niwt", action="niwt")]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"unseen": [self.unseen_weight, self.unseen_bias]}

    def actions(self) -> dict[str, Callable]:
        return {"niwt": lambda ctx: self.fit(ctx.data, ctx.dist.device, ctx.cfg.batch_size,
                                             ctx.cfg.seed)}

    def fit(self, data, device="cpu", batch_size: int = 64, seed: int = 0) -> dict:
        """Run NIWT's three steps on a zero-shot data bundle; returns what it logs."""
        from .niwt_fit import fit_niwt

        return fit_niwt(self, data, torch.device(device), batch_size, seed)

    # ---------------------------------------------------------------- explanations
    def neuron_names(self, top: int | None = None) -> list[list[tuple[str, float]]]:
        """Per neuron of the layer, the attributes its importance correlates with most
        (positively), best first, with the correlation."""
        top = top or self.hp["top_attributes"]
        corr = self.neuron_attribute_corr.detach().cpu()
        values, index = corr.topk(min(top, corr.shape[1]), dim=1)
        return [[(self.attribute_names[int(i)], float(v)) for v, i in zip(vs, ids) if v > 0]
                for vs, ids in zip(values, index)]

    def explain(self, x: torch.Tensor, classes: torch.Tensor | None = None,
                top_k: int = 3) -> Explanation:
        """The top-k neurons for each image's class (predicted unless ``classes`` is given),
        their importances, Grad-CAM maps and attribute names."""
        self._require_fitted()
        alphas, acts, logits, _ = self.importances(x, classes)
        if classes is None:
            classes = logits.argmax(1)
        values, neurons = alphas.topk(min(top_k, alphas.shape[1]), dim=1)
        picked = acts.gather(1, neurons[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
        maps = torch.relu(values[:, :, None, None] * picked)
        names = self.neuron_names()
        return Explanation(classes.cpu(), neurons.cpu(), values.cpu(), maps.cpu(),
                           [[names[int(n)] for n in row] for row in neurons.cpu()])

    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise UserError("this NIWT head has not been fitted: run train.py --model niwt "
                            "--base RUN (or model.fit(data)) first")

    # ---------------------------------------------------------------- evaluation
    def dataset_metrics(self, data, amp: str = "auto") -> dict[str, float]:
        """GZSL metrics of NIWT and both baselines, and how often explanations name attributes
        the class has (see :func:`protozoo.models.niwt_fit.zero_shot_metrics`). They always run
        in full precision (``amp`` is not used): the fitted heads are compared on fp32 features."""
        from .niwt_fit import zero_shot_metrics

        if getattr(data, "zero_shot", None) is None:
            return {}
        self._require_fitted()
        return zero_shot_metrics(self, data)


def _find_head(base: nn.Module, num_seen: int, name: str) -> str:
    """Name of the base's last ``nn.Linear`` that outputs the seen-class logits."""
    heads = [n for n, m in base.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == num_seen]
    if not heads:
        raise UserError(f"base model '{name}' has no linear layer producing its {num_seen} class "
                        "scores; NIWT needs a classifier whose last layer is nn.Linear (e.g. cam)")
    return heads[-1]
