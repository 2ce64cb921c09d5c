"""Object descriptions per cell, and ``han``'s ``describe`` phase: pretraining its CNN so that
each cell holding an object's centre describes that object.

Why it exists. Malinowski et al.'s hard attention (ECCV 2018) reads cells of a *pretrained*
backbone, whose norms and features already mark objects; on Sort-of-CLEVR from scratch the cells
are not objects -- an ~11 px object spreads over ~2.5 of the 15 px cells, and the relation
module over the kept cells counts cells, not objects (``docs/han-relational.md``). The
``describe`` phase gives ``han`` the pretrained backbone the paper assumes, learnt from the
data's ownership maps (the objects' masks) before any question: for ``describe_steps`` steps of
:data:`DESCRIBE_BATCH` distinct training images it trains the CNN and a small head (1x1 conv,
ReLU, 1x1 conv) to say, on every cell, whether it holds an object's centre and, on such a cell,
the object's colour, how much of its bounding box it fills (the shape) and where in the cell its
centre lies (:func:`object_descriptions`). The answer's training then starts from that CNN.

The phase is a step phase of the engine (:func:`describe_phase`, :class:`DescribeTask`), so it
has the engine's mixed precision, DDP, checkpoints and resume like the answer's epochs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..config import Phase
from ..errors import UserError
from .base import StepTask

DESCRIBE_BATCH = 64  # distinct images a step
DESCRIBE_LR = 1e-3  # Adam, cosine decay over the steps
DESCRIBE_LOG_EVERY = 100  # steps a log record (and a checkpoint) averages
DESCRIBE_VAL_IMAGES = 1000  # validation images the logged figures are measured on
DESCRIBE_VAL_BATCH = 250
DESCRIPTION_CHANNELS = ("centre", "red", "green", "blue", "fill", "offset_x", "offset_y")
MASKS_NEEDED = ("objectness and describe_steps need the objects' masks (the data's masks/ "
                "folder, as sort-of-clevr has); train with objectness=0 and describe_steps=0")


def _object_centres(owner: torch.Tensor, grid: tuple[int, int],
                    colour: torch.Tensor | None = None):
    """Per ownership value 1..k-1 of ``owner`` ``[B, H, W]``, in one scatter pass: the pixel
    count ``[B, k-1]``, the centre (the mean of its pixels) in cells ``(gy, gx)`` and the cell
    index holding it (``h*w`` for an absent value: a spare column), and the mean of ``colour``
    ``[B, C, H*W]`` over its pixels ``[B, C, k-1]`` when given."""
    b, height, width = owner.shape
    h, w = grid
    device = owner.device
    flat = owner.reshape(b, -1).long()
    k = int(flat.max()) + 1 if flat.numel() else 1
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32),
                            indexing="ij")
    ys, xs = ys.reshape(1, -1), xs.reshape(1, -1)
    values = torch.stack([torch.ones_like(ys), ys, xs], dim=1).expand(b, -1, -1)  # no copy
    if colour is not None:
        values = torch.cat([values, colour], dim=1)
    sums = torch.zeros(b, values.shape[1], k, device=device)
    sums.scatter_add_(2, flat[:, None].expand(-1, values.shape[1], -1), values)
    count = sums[:, 0, 1:]
    mean = sums[:, 1:, 1:] / count.clamp(min=1)[:, None]  # [B, 2 + C, k - 1]: y, x, colour
    gy = (mean[:, 0] + 0.5) * h / height
    gx = (mean[:, 1] + 0.5) * w / width
    cell = gy.long().clamp(0, h - 1) * w + gx.long().clamp(0, w - 1)
    cell = torch.where(count > 0, cell, torch.full_like(cell, h * w))
    return flat, (ys, xs), count, gy, gx, cell, mean[:, 2:]


def object_descriptions(owner: torch.Tensor, image: torch.Tensor | None,
                        grid: tuple[int, int]) -> torch.Tensor:
    """What each cell of the ``grid`` should say about the objects, from ownership maps
    ``owner`` ``[B, H, W]`` (0 background, k+1 object k) and the images ``[B, 3, H, W]`` they
    belong to (the image split evenly into the grid): ``[B, 7, h*w]``, channels
    :data:`DESCRIPTION_CHANNELS` --

    * ``centre``: 1 on a cell holding an object's centre (the mean of its pixels), else 0
      (:func:`object_centre_cells`);
    * on such a cell, that object's mean colour in ``image`` (3 channels, the image's units), the
      share of its bounding box it fills (1 for a square, about pi/4 for a disc) and its centre's
      offset from the cell's centre in cells, (x, y) in [-0.5, 0.5); 0 on the other cells.

    Where two centres share a cell, the object with the larger ownership value describes it.
    ``image=None`` leaves the colours 0."""
    b, height, width = owner.shape
    h, w = grid
    colour = (image.reshape(b, image.shape[1], -1).float() if image is not None
              else torch.zeros(b, 3, height * width, device=owner.device))
    flat, (ys, xs), count, gy, gx, cell, colour = _object_centres(owner, grid, colour)
    k = count.shape[1] + 1

    def extent(coords, reduce):  # [B, k - 1] per object: min or max of a pixel coordinate
        start = float(max(height, width)) if reduce == "amin" else -1.0
        out = torch.full((b, k), start, device=owner.device)
        return out.scatter_reduce_(1, flat, coords.expand(b, -1), reduce)[:, 1:]

    box = ((extent(ys, "amax") - extent(ys, "amin") + 1)
           * (extent(xs, "amax") - extent(xs, "amin") + 1))
    fill = count / box.clamp(min=1)
    offset_x, offset_y = gx - gx.floor() - 0.5, gy - gy.floor() - 0.5
    per_object = torch.cat([colour, fill[:, None], offset_x[:, None], offset_y[:, None]],
                           dim=1)  # [B, 6, k - 1]
    # the object each cell describes: the largest ownership value centred there (-1: none)
    objects = torch.arange(k - 1, device=owner.device).expand(b, -1)
    winner = torch.full((b, h * w + 1), -1, device=owner.device, dtype=torch.long)
    winner = winner.scatter_reduce_(1, cell, objects, "amax")[:, :h * w]
    has = winner >= 0
    described = per_object.gather(2, winner.clamp(min=0)[:, None].expand(-1, 6, -1))
    return torch.cat([has[:, None].float(), described * has[:, None]], dim=1)


def object_centre_cells(owner: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h*w]`` float: 1 on the cells holding an object's centre (the mean of its pixels),
    from ownership maps ``owner`` ``[B, H, W]`` (0 background, k+1 object k), the image split
    evenly into the grid (:func:`object_descriptions`' ``centre``)."""
    b = owner.shape[0]
    h, w = grid
    cell = _object_centres(owner, grid)[5]
    target = torch.zeros(b, h * w + 1, device=owner.device)
    return target.scatter_(1, cell, 1.0)[:, :h * w]


def describe_terms(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The description loss (``describe``) and its parts, for the describe head's ``predicted``
    ``[B, 7, h, w]`` against :func:`object_descriptions`' ``target`` ``[B, 7, h*w]``: a binary
    cross-entropy of ``centre`` on every cell; on the cells holding an object's centre, the
    squared error of the colour, a binary cross-entropy of the fill (a soft target) and the
    squared error of the offset, predicted as ``tanh / 2`` and weighted 10 (its targets lie
    within half a cell). Also ``describe_centre_accuracy``, the share of cells whose centre
    logit has the right sign (not a loss term)."""
    predicted = predicted.flatten(2).float()
    target = target.to(predicted.device)
    on = target[:, 0] > 0
    p, t = predicted.transpose(1, 2)[on], target.transpose(1, 2)[on]  # [M, 7]
    terms = {"describe_centre": F.binary_cross_entropy_with_logits(predicted[:, 0],
                                                                   target[:, 0])}
    if len(p):
        terms.update(describe_colour=F.mse_loss(p[:, 1:4], t[:, 1:4]),
                     describe_fill=F.binary_cross_entropy_with_logits(p[:, 4], t[:, 4]),
                     describe_offset=F.mse_loss(torch.tanh(p[:, 5:]) / 2, t[:, 5:]))
    else:  # no object in the batch: nothing to describe (0, still in the graph)
        zero = predicted.sum() * 0
        terms.update(describe_colour=zero, describe_fill=zero, describe_offset=zero)
    terms["describe"] = (terms["describe_centre"] + terms["describe_colour"]
                         + terms["describe_fill"] + 10 * terms["describe_offset"])
    terms["describe_centre_accuracy"] = ((predicted[:, 0] > 0) == on).float().mean()
    return terms


def _distinct_images(dataset) -> Subset:
    """One item (its first question) per image of a VQA ``dataset``."""
    _, first = np.unique(np.asarray(dataset.image_indices), return_index=True)
    return Subset(dataset, np.sort(first).tolist())


class DescribeTask(StepTask):
    """The ``describe`` task: the CNN and the describe head on :func:`describe_terms` (the
    loss is their sum ``describe``), on one item per training image (its first question), and
    validated on up to :data:`DESCRIBE_VAL_IMAGES` validation images."""

    eval_batch_size = DESCRIBE_VAL_BATCH

    def train_set(self, data) -> Subset:
        if not getattr(data.train, "has_masks", False):
            raise UserError(MASKS_NEEDED)
        return _distinct_images(data.train)

    def val_set(self, data) -> Subset:
        val = _distinct_images(data.val)
        return Subset(val, list(range(min(len(val), DESCRIBE_VAL_IMAGES))))

    def terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        image = batch["image"]
        predicted = model.describe_head(model.backbone(image))
        target = object_descriptions(batch["owner"], image, tuple(predicted.shape[-2:]))
        terms = describe_terms(predicted, target)
        return {"loss": terms["describe"], **terms}


def describe_phase(steps: int) -> Phase:
    """The step phase that runs :class:`DescribeTask` for ``steps`` steps of
    :data:`DESCRIBE_BATCH` distinct training images (drawn with replacement, seeded by
    ``--seed``; Adam at :data:`DESCRIBE_LR` for the CNN and the describe head, cosine decay over
    the steps), logging the mean terms of every :data:`DESCRIBE_LOG_EVERY` steps (``train/...``)
    and, at the end, on the validation images (``val/...``)."""
    return Phase("describe", steps=steps, task="describe", batch_size=DESCRIBE_BATCH,
                 lrs={"backbone": DESCRIBE_LR, "describe": DESCRIBE_LR}, schedule="cosine",
                 log_every=DESCRIBE_LOG_EVERY)
