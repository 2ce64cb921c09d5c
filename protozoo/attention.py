"""Reusable attention pieces for the VQA family (:mod:`protozoo.models.vqa`,
:mod:`protozoo.models.hard_attention`).

* :class:`TopKPool` and :func:`select_top_k` -- keep the k cells with the largest score M(X) and
  aggregate them (max / mean) or hand them on; Malinowski et al. 2018's hard attention is top-k by
  the L2 norm of a cell's feature vector.
* :func:`adaptive_kept` / :func:`select_adaptive` -- AdaHAN (same paper): keep the cells whose
  softmax over the presence scores is at least 1/N, a different number in every image.
* :class:`AttentionHop` -- one hop of Stacked Attention Networks (Yang et al. 2016).
* :class:`RelationModule` -- a Relation Network (Santoro et al. 2017) over sets of objects, with a
  validity mask for the variable-size sets AdaHAN produces.

Selections are *packed*: the kept cells of every image go into one dense ``[B, M, C]`` tensor
(``M`` = the largest count in the batch) with a ``valid`` mask, so everything downstream is
batched, without Python loops over images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("norm", "channel")
AGGREGATES = ("max", "mean", "none")
PAIR_POOLS = ("sum", "sum+max")


def resolve_k(k: int | float, n: int) -> int:
    """How many of ``n`` cells to keep: an int is a count (capped at n); a float in (0, 1] is a
    fraction, rounded *up* so at least that share is kept (25% of 5x5 = 6.25 -> 7 cells, 25% of
    14x14 = 49 cells)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k must be a cell count (int >= 1) or a fraction in (0, 1], got {k!r}")
    if isinstance(k, int):
        if k < 1:
            raise ValueError(f"k must be at least 1 cell, got {k}")
        return min(k, n)
    if not 0 < k <= 1:
        raise ValueError(f"a fractional k must lie in (0, 1], got {k}; give an int for a count")
    return max(1, math.ceil(k * n - 1e-6))  # the epsilon absorbs 0.1 * 30 = 3.0000000000000004


def cell_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every cell's feature vector: ``[B, C, h, w]`` -> ``[B, h*w]``."""
    return x.flatten(2).norm(dim=1)


def cell_coordinates(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[h*w, 2]`` (x, y) of every cell centre in [-1, 1], row-major like ``flatten``.

    Santoro et al. append these to each CNN cell so that a set-based module (which is blind to
    order) can still reason about "left", "top" and "closest"."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


@dataclass
class Selection:
    """Kept cells packed densely, highest score first (the result of top-k or AdaHAN)."""

    cells: torch.Tensor  # [B, M, C] features of the kept cells (padding rows where not valid)
    index: torch.Tensor  # [B, M] flat cell index (row * w + col) of each packed row
    valid: torch.Tensor  # [B, M] bool; all True for top-k, False on AdaHAN's padding rows
    kept: torch.Tensor  # [B, N] bool: which cells of the grid were kept

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` number of kept cells per image."""
        return self.valid.sum(1)

    def on_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[B, ..., M]``, one per packed row, placed on the grid's cells: ``[B, ...,
        N]``, 0 on the cells not kept (padding rows add 0, so they must carry 0)."""
        index = self.index.view(self.index.shape[0], *[1] * (values.ndim - 2), -1)
        grid = values.new_zeros(values.shape[:-1] + self.kept.shape[-1:])
        return grid.scatter_add_(-1, index.expand_as(values), values)

    def pool(self, how: str = "mean") -> torch.Tensor:
        """Max or mean over the valid kept cells only: ``[B, C]``."""
        mask = self.valid.unsqueeze(-1)
        if how == "max":
            return self.cells.masked_fill(~mask, float("-inf")).amax(1)
        if how == "mean":
            total = (self.cells * mask).sum(1)
            return total / self.counts.unsqueeze(-1).to(total.dtype)
        raise ValueError(f"pool must be 'max' or 'mean', got '{how}'")


def _gather(cells: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, M]`` of ``cells`` ``[B, N, C]``; only those rows get gradients."""
    return cells.gather(1, index.unsqueeze(-1).expand(-1, -1, cells.shape[-1]))


def select_all(cells: torch.Tensor) -> Selection:
    """Every cell of ``cells`` ``[B, N, C]`` goes on (a Relation Network over all cells)."""
    b, n = cells.shape[:2]
    index = torch.arange(n, device=cells.device).expand(b, n)
    everything = torch.ones(b, n, dtype=torch.bool, device=cells.device)
    return Selection(cells, index, everything, everything)


def select_top_k(cells: torch.Tensor, scores: torch.Tensor, k: int | float) -> Selection:
    """Keep the ``k`` cells of ``cells`` ``[B, N, C]`` with the largest ``scores`` ``[B, N]``.

    The selection (``topk`` indices) is not differentiable; gradients reach the kept cells only,
    through the gather."""
    b, n = scores.shape
    index = scores.topk(resolve_k(k, n), dim=1).indices
    kept = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(1, index, True)
    valid = torch.ones_like(index, dtype=torch.bool)
    return Selection(_gather(cells, index), index, valid, kept)


def adaptive_kept(scores: torch.Tensor) -> torch.Tensor:
    """AdaHAN (Malinowski et al. 2018): keep cell i iff ``softmax(scores)_i >= 1/N``.

    Evaluated as ``exp(s_i - max) >= mean_j exp(s_j - max)`` (the same inequality times
    ``sum_j exp(s_j - max) / N``) so equal scores keep every cell exactly, without rounding. The
    best cell is always kept (the largest probability is at least the mean, 1/N)."""
    shifted = (scores.float() - scores.float().amax(1, keepdim=True)).exp()
    return shifted >= shifted.mean(1, keepdim=True)


def select_adaptive(cells: torch.Tensor, scores: torch.Tensor) -> Selection:
    """AdaHAN's selection, packed: ``M`` = the largest count in the batch, kept cells first (by
    score), ``valid`` False on the padding rows that fill the images with fewer kept cells.

    Reading ``M`` costs one device sync (a tensor shape cannot depend on device data otherwise).
    """
    kept = adaptive_kept(scores)
    m = int(kept.sum(1).max())
    ranked = scores.float().masked_fill(~kept, float("-inf"))
    index = ranked.topk(m, dim=1).indices
    valid = kept.gather(1, index)
    # padding rows are zeros, not the non-kept cells they point at: nothing unkept flows on
    packed = _gather(cells, index).masked_fill(~valid.unsqueeze(-1), 0)
    return Selection(packed, index, valid, kept)


class TopKPool(nn.Module):
    """Top-k pooling: select the k cells with the largest score M(X) and aggregate them.

    Args:
        k: cells kept, an int count or a fraction of the cells (see :func:`resolve_k`).
        score: ``"norm"`` -- one score per cell, the L2 norm of its feature vector (Malinowski et
            al.'s presence); ``"channel"`` -- every channel scores (and keeps) its own k cells.
        aggregate: ``"max"`` or ``"mean"`` over the kept cells -> ``[B, C]``; ``"none"`` returns
            the :class:`Selection` (kept cells + indices) for a downstream module.

    Limits (tested): ``k=1, score="channel"`` is global max pooling; ``k=N, aggregate="mean"``
    is global average pooling. Gradients flow only through the kept cells.
    """

    def __init__(self, k: int | float = 1, score: str = "norm", aggregate: str = "max"):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got '{score}'")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got '{aggregate}'")
        if score == "channel" and aggregate == "none":
            raise ValueError("per-channel scores keep different cells in every channel, so there "
                             "is no one set of cells to return; use aggregate='max' or 'mean'")
        resolve_k(k, 1 << 30)  # validate now, not at the first forward
        self.k, self.score, self.aggregate = k, score, aggregate

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None):
        """``x`` ``[B, C, h, w]``; optional ``scores`` ``[B, h, w]`` replace the default M(X)."""
        flat = x.flatten(2)  # [B, C, N]
        if self.score == "channel" and scores is None:
            top = flat.topk(resolve_k(self.k, flat.shape[-1]), dim=2).values
            return top.amax(2) if self.aggregate == "max" else top.mean(2)
        scores = cell_norms(x) if scores is None else scores.flatten(1)
        selection = select_top_k(flat.transpose(1, 2), scores.detach(), self.k)
        return selection if self.aggregate == "none" else selection.pool(self.aggregate)

    def extra_repr(self) -> str:
        return f"k={self.k}, score={self.score}, aggregate={self.aggregate}"


def tanh_score_cap(n: int) -> float:
    """The largest attention weight one of ``n`` cells can get when scores lie in [-1, 1]:
    ``e / (e + (n - 1) / e)`` (one cell at +1, all others at -1); 3.65% for 196 cells."""
    return math.e / (math.e + (n - 1) / math.e)


class AttentionHop(nn.Module):
    """One attention layer of Stacked Attention Networks (Yang et al., CVPR 2016, eqs. 15-17, 19):

        h   = tanh(W_I v_I (+) (W_Q u + b_Q))     (+): the question term added to every cell
        p   = softmax(W_P h + b_P)                over the N cells
        v~  = sum_i p_i v_i
        u  <- v~ + u

    ``W_I`` has no bias, as in the paper (the official code gives each branch its own bias and
    tanh). ``score_tanh=False`` (default) follows the paper's formula. ``score_tanh=True`` follows
    the official Theano code, which passes ``W_P h + b_P`` through one more tanh before the
    softmax: scores in [-1, 1] cap any single cell at ``e / (e + (N-1)/e)`` of the mass -- about
    3.7% on a 14x14 map -- so the attention can never be sharp (:func:`tanh_score_cap`).
    """

    def __init__(self, dim: int, att_dim: int, score_tanh: bool = False):
        super().__init__()
        self.image = nn.Linear(dim, att_dim, bias=False)  # W_I
        self.query = nn.Linear(dim, att_dim)  # W_Q, b_Q
        self.score = nn.Linear(att_dim, 1)  # W_P, b_P
        self.score_tanh = score_tanh

    def forward(self, v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v`` ``[B, N, d]`` cell vectors, ``u`` ``[B, d]`` query -> (new query ``[B, d]``,
        attention ``[B, N]``)."""
        h = torch.tanh(self.image(v) + self.query(u).unsqueeze(1))
        s = self.score(h).squeeze(-1)
        if self.score_tanh:
            s = torch.tanh(s)
        p = torch.softmax(s.float(), dim=1)
        v_tilde = torch.einsum("bn,bnd->bd", p.to(v.dtype), v)
        return v_tilde + u, p


def _mlp(dims: list[int], final_relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if final_relu or i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return layers


class RelationModule(nn.Module):
    """Relation Network (Santoro et al., NeurIPS 2017): ``f( sum_{i,j} g(o_i, o_j, q) )``.

    ``g`` is an MLP (paper: 4 layers of 256, ReLU) applied to every ordered pair of objects --
    all N^2, i = j included, as in the paper's code -- each concatenated with the question; ``f``
    an MLP (paper: 256, 256, dropout 0.5, output).

    Batched without loops or an ``[B, N, N, 2D+Q]`` concatenation: the first layer of ``g`` is
    linear, so ``W [o_i; o_j; q] = W_1 o_i + W_2 o_j + W_3 q`` is computed per object and
    broadcast over pairs. ``valid`` ``[B, N]`` masks padding objects (AdaHAN): a pair counts only
    if both objects are valid, so the result equals the module run on the valid objects alone.

    ``film=True`` (not in the paper) also scales the pair term by the question, FiLM-style (Perez et
    al. 2018): ``W_1 o_i + W_2 o_j`` is multiplied by ``1 + F q`` before ``W_3 q + b`` is added.
    ``F`` starts at zero, so a fresh module computes the paper's function. ``split_film=True`` gives
    the pair's two objects a gain each, ``(W_1 o_i)(1 + F_1 q) + (W_2 o_j)(1 + F_2 q)``, so that the
    question can pick which units read the first object (X) and which the second. ``film`` exists
    because the paper's ``g`` must learn "this question word <-> this object" as a conjunction of
    ReLUs, which an LSTM question makes slow: on sort-of-clevr's six objects given exactly (no CNN),
    measured on one CPU thread, the paper's form stayed below 0.66 of the non-relational questions
    for 2,800 steps, and with ``film`` answered 0.955 after 1,900.

    ``pair_pool="sum+max"`` (not in the paper) hands ``f`` the elementwise max of ``g`` over the
    pairs next to the sum. The sum counts (how many objects share a shape) but makes an argmin
    hard to read off -- "the shape of the object closest to X" needs every pair's distance
    compared with every other's; a max picks one pair, so ``g`` only has to score each pair by
    closeness (duplicated objects, an object over two cells, change the sum and not the max).

    ``distance=True`` (not in the paper either) gives ``g`` the Euclidean distance between the
    pair's positions -- the objects' last two features, the (x, y) Santoro et al. append -- as one
    more input: ``g(o_i, o_j, q, |p_i - p_j|)``, a weight per unit of ``g``'s first layer, drawn
    from N(0, 0.5^2). The paper's ``g`` must build the distance from the coordinates through its
    ReLUs, and "closest"/"furthest" questions wait for it: on the objects given exactly, with
    ``film`` and ``g`` 128 wide x 3, relational test accuracy 0.825 after 4,000 steps without the
    distance and 0.993 after 3,600 with it (one CPU thread, measured).
    """

    def __init__(self, object_dim: int, question_dim: int, num_outputs: int, g_dim: int = 256,
                 g_layers: int = 4, f_dim: int = 256, dropout: float = 0.5, film: bool = False,
                 distance: bool = False, pair_pool: str = "sum", split_film: bool = False):
        super().__init__()
        if g_layers < 1:
            raise ValueError(f"g_layers must be at least 1, got {g_layers}")
        if split_film and not film:
            raise ValueError("split_film=True splits film's gain in two: it needs film=True "
                             "(or pass split_film=false)")
        if pair_pool not in PAIR_POOLS:
            raise ValueError(f"pair_pool must be one of {PAIR_POOLS}, got '{pair_pool}'")
        self.pair_pool = pair_pool
        self.split_film = split_film
        self.object_dim, self.question_dim = object_dim, question_dim
        self.g_first = nn.Linear(2 * object_dim + question_dim, g_dim)
        self.film = None
        if film:
            self.film = nn.Linear(question_dim, g_dim * (2 if split_film else 1))
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.distance = nn.Parameter(0.5 * torch.randn(g_dim)) if distance else None
        self.g_rest = nn.Sequential(nn.ReLU(),  # not in place: its input is a view of ``pre``
                                    *_mlp([g_dim] * g_layers, final_relu=True))
        self.pooled_dim = self.pooled_width(g_dim, pair_pool)
        self.f = nn.Sequential(*_mlp([self.pooled_dim, f_dim, f_dim], final_relu=True),
                               nn.Dropout(dropout), nn.Linear(f_dim, num_outputs))

    def relations(self, objects: torch.Tensor, question: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_{i,j} g(o_i, o_j, q)`` over the valid pairs: ``[B, g_dim]`` (``[B, 2 g_dim]``,
        the sum and the max, with ``pair_pool="sum+max"``)."""
        d = self.object_dim
        w = self.g_first.weight
        first = objects @ w[:, :d].t()  # [B, N, H], o_i's share (first in the pair)
        second = objects @ w[:, d:2 * d].t()  # o_j's share
        common = F.linear(question, w[:, 2 * d:], self.g_first.bias)  # [B, H]
        # Everything that is per object (the FiLM gain, the question's term) is applied before
        # the broadcast over pairs, so the [B, N, N, H] tensor is touched by one add (and one
        # fused multiply-add for the distance): (a_i + b_j) * s + c = (a_i s + c) + (b_j s).
        # Same function; forward + backward of han's module (320 questions x 7 cells, g 128 x 3,
        # film and distance) on 2 CPU threads: 42 -> 37 ms (measured).
        if self.film is not None:
            gain = (1 + self.film(question)).unsqueeze(1)  # [B, 1, H], or [B, 1, 2H] split
            gain_first, gain_second = gain.chunk(2, dim=-1) if self.split_film else (gain, gain)
            first, second = first * gain_first, second * gain_second
        first = first + common.unsqueeze(1)
        pre = first.unsqueeze(2) + second.unsqueeze(1)  # [B, N, N, H]
        if self.distance is not None:
            xy = objects[..., -2:]
            gap = (xy.unsqueeze(2) - xy.unsqueeze(1)).norm(dim=-1, keepdim=True)  # [B, N, N, 1]
            pre = torch.addcmul(pre, gap, self.distance)
        # g on a 2-D [pairs, H] matrix: on the 4-D tensor every Linear's output is a view, and
        # in-place ReLUs on views cost a CopySlices each in the backward (measured: han's
        # training step on 2 CPU threads, 0.101 s with them, 0.088 s without)
        g = self.g_rest(pre.flatten(0, 2)).view(pre.shape[:3] + (-1,))
        if valid is not None:
            pairs = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(-1)
            g = g * pairs.to(g.dtype)  # g >= 0 (it ends in a ReLU): 0 is neutral for max too
        total = g.sum(dim=(1, 2))
        if self.pair_pool == "sum":
            return total
        return torch.cat([total, g.amax(dim=(1, 2))], dim=1)

    def forward(self, objects: torch.Tensor, question: torch.Tensor,
                valid: torch.Tensor | None = None, extra: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``objects`` ``[B, N, D]``, ``question`` ``[B, Q]``, ``valid`` ``[B, N]`` bool ->
        ``[B, num_outputs]``. ``extra``, when given, is added to the pooled relations before
        ``f``: ``f(sum_{i,j} g(o_i, o_j, q) + extra)``, ``[B, pooled_dim]`` (e.g. ``han``'s word
        reads, something the answer needs beside the pairs)."""
        pooled = self.relations(objects, question, valid)
        return self.f(pooled if extra is None else pooled + extra)

    @staticmethod
    def pooled_width(g_dim: int, pair_pool: str) -> int:
        """Width of the pooled relations ``f`` reads: ``g_dim``, twice that for ``"sum+max"``."""
        return g_dim * (2 if pair_pool == "sum+max" else 1)

    @staticmethod
    def pair_counts(valid: torch.Tensor) -> torch.Tensor:
        """``[B]`` pairs ``g`` evaluates per image that count: (valid objects)^2."""
        return valid.sum(1).long() ** 2


__all__ = ["TopKPool", "Selection", "select_all", "select_top_k", "select_adaptive", "adaptive_kept",
           "resolve_k", "cell_norms", "cell_coordinates", "AttentionHop", "tanh_score_cap",
           "RelationModule"]
