"""Hard attention and the cells it reasons over: ``han`` and the ``rn`` baseline.

* ``han`` -- hard attention (Malinowski, Doersch, Santoro, Battaglia, "Learning Visual Question
  Answering by Bootstrapping Hard Attention", ECCV 2018): question-conditioned 1x1-conv cell
  embeddings (:class:`CellEmbedding`), a cell's presence score is its embedding's L2 norm, and
  only the top-k cells (default half) reach the reasoning module -- a Relation Network over the
  kept cells (with their coordinates and the question) or pooling. ``adaptive=True`` is AdaHAN.
* ``rn`` -- a Relation Network over *all* cells (Santoro et al., NeurIPS 2017): the cost hard
  attention is measured against (:func:`time_reasoning`).

Both subclass :class:`CellReasoner`: :meth:`~CellReasoner.cells` picks what the reasoning sees,
:meth:`~CellReasoner.reason` answers, so the reasoning step can be timed alone. The question
encoder, inputs and metrics they share with ``san`` and ``cnn_lstm`` live in
:mod:`protozoo.models.vqa`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..attention import (RelationModule, Selection, cell_norms, resolve_k, select_adaptive,
                         select_all, select_top_k)
from ..config import Phase, TrainConfig
from .description import (DESCRIPTION_CHANNELS, MASKS_NEEDED, DescribeTask, describe_phase,
                          object_centre_cells)
from ..errors import UserError
from ..outputs import VQAOutput
from ..registry import register_model
from .vqa import VQAModel, cells_with_coordinates, distinct_images, uniform_attention


@dataclass
class CellSet:
    """What a reasoning module sees: the cells that went on, the question, and where they were."""

    selection: Selection
    question: torch.Tensor  # [B, Q]
    grid: tuple[int, int]
    scores: torch.Tensor | None = None  # [B, N] presence, hard attention only
    variable: bool = False  # counts differ between images (AdaHAN): the module must mask
    every_cell: torch.Tensor | None = None  # [B, N, C] all cells, before any selection
    glimpse_logits: torch.Tensor | None = None  # [B, K] han's auxiliary answer (training only)
    words: torch.Tensor | None = None  # [B, L, W] the question's word embeddings (word reads)
    word_valid: torch.Tensor | None = None  # [B, L] bool: a word, not padding
    # filled by han's reason() with word reads: their auxiliary answer and each word's weights
    read_logits: torch.Tensor | None = None  # [B, K]
    word_attention: torch.Tensor | None = None  # [B, L, M] over the selection's rows

    def without_selection(self) -> CellSet:
        """The same cells with every one kept: what a Relation Network over all cells reads."""
        cells = self.every_cell if self.every_cell is not None else self.selection.cells
        return replace(self, selection=select_all(cells), variable=False, every_cell=cells)


class CellReasoner(VQAModel):
    """``han`` and ``rn``: :meth:`cells` picks what the reasoning sees, :meth:`reason` answers.

    The split lets :func:`time_reasoning` time the reasoning step alone."""

    reasoning = "relation"
    pool = "mean"

    def cells(self, image, question, question_length, image_index=None) -> CellSet:
        raise NotImplementedError

    def reason(self, cells: CellSet) -> torch.Tensor:
        sel = cells.selection
        if self.reasoning == "relation":
            return self.reasoner(sel.cells, cells.question, sel.valid if cells.variable else None)
        return self.reasoner(torch.cat([sel.pool(self.pool), cells.question], dim=1))

    def forward(self, image: torch.Tensor, question: torch.Tensor,
                question_length: torch.Tensor, image_index: torch.Tensor | None = None
                ) -> VQAOutput:
        cells = self.cells(image, question, question_length, image_index)
        return self._output(self.reason(cells), cells)

    def _output(self, logits: torch.Tensor, cells: CellSet) -> VQAOutput:
        raise NotImplementedError

    def reasoning_pairs(self, output: VQAOutput) -> torch.Tensor:
        """Pairs g evaluates per image: (kept cells)^2 (AdaHAN pads a batch to its largest count
        but masks the padding; only real pairs count)."""
        if self.reasoning != "relation":
            return super().reasoning_pairs(output)
        b, _, h, w = output.attention.shape
        if output.kept is None:
            return torch.full((b,), (h * w) ** 2, dtype=torch.long, device=output.logits.device)
        return output.kept.flatten(1).sum(1).long() ** 2

    def dataset_metrics(self, data, amp: str = "auto") -> dict[str, float]:
        """Adds the reasoning step's time on one test batch of 64 (inference, median of 10 calls):
        on the cells this model reasons over (``reasoning_step_ms``) and, same module and
        weights, on every cell (``reasoning_step_all_cells_ms``, a full Relation Network's
        step), and their ratio ``reasoning_speedup``."""
        from torch.utils.data import DataLoader

        from ..runtime import to_device

        out = super().dataset_metrics(data, amp)
        device = next(self.parameters()).device
        batch = to_device(next(iter(DataLoader(data.test, batch_size=64))), device)
        inputs = self.inputs(batch)
        kept = time_reasoning(self, *inputs)
        every = time_reasoning(self, *inputs, all_cells=True)
        out.update(reasoning_step_ms=1000 * kept, reasoning_step_all_cells_ms=1000 * every,
                   reasoning_speedup=every / kept)
        return out

    def _cost_metrics(self, output: VQAOutput) -> dict[str, torch.Tensor]:
        b, _, h, w = output.attention.shape
        kept = (output.kept.flatten(1).float().mean(1) if output.kept is not None
                else torch.ones(b, device=output.logits.device))
        return {"cells_kept_fraction": kept,
                "reasoning_pairs": self.reasoning_pairs(output).float()}


class CellEmbedding(nn.Module):
    """HAN's question-conditioned cell embeddings ``[B, D, h, w]``, whose L2 norm is a cell's
    presence (Malinowski et al. 2018).

    * ``fusion="sum"`` -- the paper's form: the question, projected to the feature channels, is
      added to every cell, then a 1x1 conv and ReLU: ``e = ReLU(W (v + P q) + b)``.
    * ``fusion="gate"`` (ours, the default) -- ``e = ReLU(W (v - m)) * 2 sigmoid(P q)``: ``m`` is
      the image's median cell (per channel), ``W`` has no bias, and the question scales every
      embedding channel in (0, 2). A cell that looks like most of the image (background) has
      presence 0 whatever the question, and the question chooses *which* of the remaining
      cells stand out.

    Why ours is the default: selection by norm is not differentiable, so the embedding's norm
    learns only from the cells already kept. In the paper's form nothing makes an object cell's
    norm larger than a background cell's: trained from scratch on sort-of-clevr (default top
    25%, 7 of 25 cells), the kept cells covered 10-24% of the cells that the answer's objects
    touch over the first 1300 steps, below a random 7 (28%). The gated form starts at 55% -- as
    many as keeping the 7 cells that differ most from white -- the bootstrap the paper gets from
    pretrained features, whose norms already mark objects. It does not stay there by itself:
    while the relation module has not learnt to use the cells, it drifted to 30% after 1400
    steps (measured with a 128-wide relation module, one thread); with HAN's ``unit_cells`` and
    ``film`` defaults it was at 49% after 3000 steps.
    """

    def __init__(self, channels: int, question_dim: int, embed_dim: int, fusion: str = "gate"):
        super().__init__()
        if fusion not in ("gate", "sum"):
            raise ValueError(f"fusion must be 'gate' or 'sum', got '{fusion}'")
        self.fusion = fusion
        self.question = nn.Linear(question_dim, channels if fusion == "sum" else embed_dim)
        self.conv = nn.Conv2d(channels, embed_dim, 1, bias=fusion == "sum")

    def forward(self, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        q = self.question(question)[:, :, None, None]
        if self.fusion == "sum":
            return F.relu(self.conv(features + q))
        typical = features.flatten(2).median(dim=2).values[:, :, None, None]
        return F.relu(self.conv(features - typical)) * (2 * torch.sigmoid(q))


class WordReads(nn.Module):
    """Every question word reads the kept cells by a key of its own (ours; ``han``'s
    ``word_reads``).

    Word ``l`` (embedding ``w_l``) spreads ``a_l = softmax_i(<Q w_l, K c_i> / sqrt(d))`` over the
    cells ``c_i`` -- the kept cells' backbone features and (x, y), which the question does not
    condition -- and the reads, each gated by its own word, are summed over the question's
    words (padding left out): ``read = sum_l sigmoid(G w_l) * sum_i a_li c_i``.

    Why: a relational question must bind its answer to the object it names, and the answer alone
    does not always ask for it -- on Sort-of-CLEVR, "how many objects have the same shape as X" is
    right 26 times in 32 when answered with the larger shape group's size (X is in it or the groups
    tie), without finding X. A read keyed by the question vector, or by a learnt choice among its
    words, follows the question's kind and left X for count questions (``docs/han-relational.md``).
    A word's read depends on that word alone, so the weights a colour word learns on "what shape is
    X" find X in a count question too. It is word-to-region attention in the spirit of Lu et al.'s
    co-attention (NeurIPS 2016), kept to one read per word.
    """

    def __init__(self, word_dim: int, cell_dim: int, key_dim: int = 32):
        super().__init__()
        self.query = nn.Linear(word_dim, key_dim)
        self.key = nn.Linear(cell_dim, key_dim)
        self.gate = nn.Linear(word_dim, cell_dim)

    def forward(self, words: torch.Tensor, word_valid: torch.Tensor, cells: torch.Tensor,
                cell_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``words`` ``[B, L, W]``, ``word_valid`` ``[B, L]`` bool, ``cells`` ``[B, M, C]``,
        ``cell_valid`` ``[B, M]`` bool (AdaHAN's padding rows) -> the read ``[B, C]`` and each
        word's weights ``[B, L, M]`` (0 for a padding word or cell)."""
        scores = self.query(words) @ self.key(cells).transpose(1, 2)
        scores = scores.float() / self.key.out_features ** 0.5
        if cell_valid is not None:
            scores = scores.masked_fill(~cell_valid.unsqueeze(1), float("-inf"))
        attention = torch.softmax(scores, dim=2) * word_valid.unsqueeze(-1)
        reads = attention.to(cells.dtype) @ cells  # [B, L, C]
        return (torch.sigmoid(self.gate(words)) * reads).sum(1), attention


@register_model("han")
class HAN(CellReasoner):
    # 45 epochs: ~40 minutes of epochs on one CPU thread in bf16 with the defaults of 2026-12-04
    # (about 20 on two threads with the previous 25% of cells; docs/vqa.md)
    builtin_epochs = 45
    keeps_cells = True  # the report outlines the kept cells and dims the others
    # on by default since 2026-12-04: a run saved before the arguments existed had neither
    absent_kwargs = {"split_film": False, "word_reads": False, "read_weight": 1.0}

    def __init__(self, backbone: str = "rn_cnn_rgb", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, class_names: list[str] | None = None,
                 vocab: list[str] | None = None, word_dim: int = 32, question_dim: int = 128,
                 embed_dim: int = 64, top_k: float | int = 0.5, adaptive: bool = False,
                 reasoning: str = "relation", pool: str = "mean", fusion: str = "gate",
                 unit_cells: bool = True, cell_features: bool = True,
                 g_dim: int = 128, g_layers: int = 3, f_dim: int = 128, dropout: float = 0.5,
                 film: bool = True, split_film: bool = True, word_reads: bool = True,
                 read_weight: float = 0.3, distance: bool = True, glimpse: float = 1.0,
                 pair_pool: str = "sum",
                 objectness: float = 0.0, describe_steps: int = 0):
        """Hard attention (Malinowski et al., ECCV 2018): keep the top-k cells by the norm of
        their question-conditioned embedding, reason over the kept cells only. Every departure
        from the paper is an argument; why each exists, and what it measured, is in
        ``docs/vqa.md`` and ``docs/han-relational.md``.

        Args:
            embed_dim: channels of the 1x1-conv cell embeddings (whose norm is the presence).
            fusion: how the question enters the embeddings, ``"gate"`` (ours, default) or
                ``"sum"`` (the paper's); see :class:`CellEmbedding`.
            top_k: cells kept, a fraction of the cells (default 50%, rounded up) or a count.
                On Sort-of-CLEVR at the paper's 9,800 scenes, 0.5 (13 of 25 cells) answered
                4-9 points more relational questions than 0.25 at 2.3x the time an epoch
                (``docs/han-relational.md``, "Half the cells"). A fraction grows with the
                grid (300 of CLEVR's 600 cells at its native size): on a large grid pass a
                count (e.g. 16).
            adaptive: AdaHAN -- keep the cells whose softmax over presence is >= 1/N instead.
            reasoning: ``"relation"`` (a Relation Network over the kept cells with their (x, y)
                and the question) or ``"pool"`` (``pool`` over the kept cells, then an MLP).
            unit_cells: the reasoning module gets each kept embedding's direction ``e / |e|``
                (ours; the paper passes ``e``), so it cannot quiet object cells by shrinking
                their norms below the background's, which would turn the selection to
                background.
            cell_features: a kept cell reaches the reasoning module as ``[e; v]``, its embedding
                and its backbone features (ours; the paper passes ``e``): through ``e`` alone a
                CNN trained from scratch did not learn shape.
            g_dim, g_layers, f_dim, dropout: the Relation Network. Santoro et al.'s is 256, 4,
                256, 0.5; the default 128, 3, 128, 0.5 is about 3x faster a step. The pooling
                MLP uses ``f_dim`` and ``dropout`` too.
            film: the relation module's pair term scaled by the question (ours; ``False`` is
                the paper's; see :class:`~protozoo.attention.RelationModule`).
            split_film: a FiLM gain for each of the pair's two objects instead of one for both
                (ours; needs ``film``): the question can then scale the units that read X
                differently from those that read the object X is compared with. Alone (no
                word reads, ``top_k=0.5``) it moved relational accuracy inside the run-to-run
                spread (``docs/han-relational.md``, "Binding the count on 13 cells"); the
                default measured with word reads keeps it.
            word_reads: every question word reads the kept cells by its own key
                (:class:`WordReads`; ours) and the read enters ``f`` beside the pooled pairs,
                with an auxiliary answer from the read (weight ``read_weight``), so that
                the answer can be bound to the object the question names. Needs
                ``reasoning="relation"`` and ``cell_features``. On Sort-of-CLEVR at the
                paper's scale it bound the count (0.80 -> 0.94-0.97: answers 1 and 2 found,
                three seeds) and cost "closest" (0.87-0.92 -> 0.74-0.86); relational 0.847-0.914
                against 0.868-0.891 without (``docs/han-relational.md``, "The read beside the
                pairs").
                ``VQAOutput.word_attention`` holds each word's weights over the cells.
            read_weight: weight of the word reads' auxiliary answer in the objective (ours;
                logged as ``word_reads``); 0 trains the read through the answer alone. At the
                paper's scale on Sort-of-CLEVR, 0.3 answered 0.990 / 0.902 and 0.996 / 0.903
                (non-relational / relational, seeds 1 and 0) against 0.987 / 0.847 and
                0.994 / 0.914 at 1 (``docs/han-relational.md``, "The read beside the pairs").
            distance: ``g`` also gets the distance between the two cells (ours).
            glimpse: weight of an auxiliary loss (ours; 0 trains as the paper does): a soft read
                of *every* cell, weighted by ``softmax(presence)``, answers the question through
                a small MLP (:meth:`presence_glimpse`), so the presence and the CNN get a
                gradient on every cell (top-k is not differentiable). The answer never reads
                it: the reasoning still sees the kept cells alone.
            pair_pool: how the relation module pools ``g`` over the pairs: ``"sum"`` (the
                paper's) or ``"sum+max"``.
            objectness: weight of an auxiliary loss (ours, off by default; needs the data's
                object masks): cross-entropy between ``softmax(presence)`` and a target spread
                over the cells that hold an object's centre (:func:`object_centre_cells`).
            describe_steps: steps of the ``describe`` phase (ours, off by default; needs the
                object masks): before the answer's training the CNN learns to describe, on each
                cell, whether it holds an object's centre and that object's colour, fill and
                offset (:mod:`protozoo.models.description`) -- the pretrained backbone the
                paper reads, learnt from the masks instead of ImageNet.

        The paper's HAN is ``fusion="sum", unit_cells=False, cell_features=False, film=False,
        split_film=False, word_reads=False, distance=False, glimpse=0, pair_pool="sum",
        g_dim=256, g_layers=4, f_dim=256``.
        """
        super().__init__()
        if reasoning not in ("relation", "pool"):
            raise ValueError(f"reasoning must be 'relation' or 'pool', got '{reasoning}'")
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got '{pool}'")
        resolve_k(top_k, 1 << 30)
        bb = self._init_vqa(backbone, pretrained, stage, num_classes, class_names, vocab,
                            word_dim, question_dim)
        self.top_k, self.adaptive, self.reasoning, self.pool = top_k, adaptive, reasoning, pool
        self.unit_cells, self.cell_features = unit_cells, cell_features
        # ReLU: presence = norm needs "absent" to be reachable; a cell with every unit off is.
        self.embed = CellEmbedding(bb.channels, question_dim, embed_dim, fusion)
        cell_dim = embed_dim + (bb.channels if cell_features else 0) + 2  # + (x, y)
        self.glimpse, self.objectness = glimpse, objectness
        if not read_weight >= 0:
            raise ValueError(f"read_weight must be >= 0, got {read_weight}")
        self.read_weight = float(read_weight)
        if int(describe_steps) != describe_steps or describe_steps < 0:
            raise ValueError(f"describe_steps must be a whole number >= 0, got {describe_steps}")
        self.describe_steps = int(describe_steps)
        if self.describe_steps:
            self.describe_head = nn.Sequential(
                nn.Conv2d(bb.channels, f_dim, 1), nn.ReLU(inplace=True),
                nn.Conv2d(f_dim, len(DESCRIPTION_CHANNELS), 1))
        if glimpse > 0:
            self.glimpse_head = nn.Sequential(
                nn.Linear(bb.channels + 2 + question_dim, f_dim), nn.ReLU(inplace=True),
                nn.Linear(f_dim, self.num_classes))
        self.reader = None
        if word_reads:
            if reasoning != "relation" or not cell_features:
                raise ValueError("word_reads=True (the default) reads the kept cells' backbone "
                                 "features into the relation module: it needs "
                                 "reasoning='relation' and cell_features=True; pass "
                                 "word_reads=false with other settings")
            located_dim = bb.channels + 2  # [v; x; y]
            self.reader = WordReads(word_dim, located_dim)
            pooled_dim = RelationModule.pooled_width(g_dim, pair_pool)  # f's input
            self.read_to_f = nn.Linear(located_dim, pooled_dim)  # at 0: a fresh model ignores it
            nn.init.zeros_(self.read_to_f.weight)
            nn.init.zeros_(self.read_to_f.bias)
            self.read_head = nn.Sequential(
                nn.Linear(located_dim + question_dim, f_dim), nn.ReLU(inplace=True),
                nn.Linear(f_dim, self.num_classes))
        if reasoning == "relation":
            self.reasoner = RelationModule(cell_dim, question_dim, self.num_classes, g_dim,
                                           g_layers, f_dim, dropout, film, distance, pair_pool,
                                           split_film)
        else:
            self.reasoner = nn.Sequential(
                nn.Linear(cell_dim + question_dim, f_dim), nn.ReLU(inplace=True),
                nn.Linear(f_dim, f_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(f_dim, self.num_classes))

    def cells(self, image, question, question_length, image_index=None) -> CellSet:
        """Question-conditioned 1x1-conv embeddings (:class:`CellEmbedding`) -> presence = L2
        norm -> keep the top-k (or AdaHAN's) cells. The selection is not differentiable (scores
        are detached): the kept cells' embeddings carry every gradient, as in the paper."""
        features = self.image_features(image, image_index, question)
        q = self.encode(question, question_length)
        embeddings = self.embed(features, q)
        presence = cell_norms(embeddings)
        scores = presence.detach()  # the selection is not differentiable
        located = cells_with_coordinates(features)  # [v; x; y] per cell, [B, N, C + 2]
        glimpse = self.presence_glimpse(located, presence, q) if self.glimpse > 0 else None
        directions = F.normalize(embeddings, dim=1) if self.unit_cells else embeddings
        cells = torch.cat([directions.flatten(2).transpose(1, 2),
                           located if self.cell_features else located[..., -2:]], dim=2)
        selection = (select_adaptive(cells, scores) if self.adaptive
                     else select_top_k(cells, scores, self.top_k))
        words = word_valid = None
        if self.reader is not None:
            words = self.question_encoder.embedding(question.long())
            lengths = torch.as_tensor(question_length, device=words.device).reshape(-1, 1)
            word_valid = torch.arange(words.shape[1], device=words.device) < lengths
        return CellSet(selection, q, tuple(embeddings.shape[-2:]), presence, self.adaptive,
                       cells, glimpse, words, word_valid)

    def reason(self, cells: CellSet) -> torch.Tensor:
        """The relation module over the kept cells; with ``word_reads``, the words' read
        (:class:`WordReads`) also enters ``f`` beside the pooled pairs through ``read_to_f``,
        and its own answer (``read_head``, a training signal) and weights are left on
        ``cells``."""
        if self.reader is None:
            return super().reason(cells)
        sel = cells.selection
        valid = sel.valid if cells.variable else None
        located = sel.cells[..., self.embed.conv.out_channels:]  # [v; x; y]: no question in it
        read, cells.word_attention = self.reader(cells.words, cells.word_valid, located, valid)
        cells.read_logits = self.read_head(torch.cat([read, cells.question], dim=1))
        return self.reasoner(sel.cells, cells.question, valid, self.read_to_f(read))

    def object_centres(self, batch: dict, grid: tuple[int, int]) -> torch.Tensor:
        """:func:`object_centre_cells` of the batch's ownership maps, computed once per distinct
        image; a one-line error when the data has none."""
        if "owner" not in batch:
            raise UserError(MASKS_NEEDED)
        owner = batch["owner"]
        distinct = distinct_images(batch, owner.device)
        if distinct is None:
            return object_centre_cells(owner, grid)
        first, index = distinct
        return object_centre_cells(owner[first], grid)[index]

    def presence_glimpse(self, located: torch.Tensor, presence: torch.Tensor,
                         question: torch.Tensor) -> torch.Tensor:
        """The auxiliary answer ``[B, K]`` from a soft read of *every* cell ``located`` (``[B, N,
        C + 2]``: backbone features and (x, y)), weighted by ``softmax(presence)`` (AdaHAN's
        distribution over the norms): ``glimpse_head([sum_i p_i [v_i; x_i; y_i]; q])``.
        Training signal only (see ``glimpse`` in :class:`HAN`)."""
        weights = torch.softmax(presence, dim=1)[:, :, None]
        read = (weights * located).sum(1)
        return self.glimpse_head(torch.cat([read, question], dim=1))

    def _output(self, logits: torch.Tensor, cells: CellSet) -> VQAOutput:
        h, w = cells.grid
        kept = cells.selection.kept
        attention = kept.float() / kept.sum(1, keepdim=True).float()
        b = len(kept)
        words = None
        if cells.word_attention is not None:
            words = cells.selection.on_grid(cells.word_attention).view(b, -1, h, w)
        return VQAOutput(logits=logits, stride=self.stride, attention=attention.view(b, 1, h, w),
                         scores=cells.scores.view(b, h, w), kept=kept.view(b, h, w),
                         glimpse_logits=cells.glimpse_logits, read_logits=cells.read_logits,
                         word_attention=words)

    def intrinsic_map(self, output: VQAOutput, target: torch.Tensor) -> torch.Tensor:
        """The kept cells ``[B, h, w]``: 1 on a cell the reasoning saw, 0 elsewhere (whatever
        answer ``target`` names)."""
        return output.kept.float()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` and ``head``, and ``describe`` (the describe head, trained only by the
        ``describe`` phase) when ``describe_steps`` > 0."""
        groups = super().param_groups()
        if not self.describe_steps:
            return groups
        describe = list(self.describe_head.parameters())
        ids = {id(p) for p in describe}
        return {"backbone": groups["backbone"], "describe": describe,
                "head": [p for p in groups["head"] if id(p) not in ids]}

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        """:meth:`VQAModel.phases`, after the ``describe`` step phase when ``describe_steps`` > 0
        (:func:`protozoo.models.description.describe_phase`); the describe head stays frozen in
        the answer's phases."""
        answer = super().phases(cfg)
        if not self.describe_steps:
            return answer
        answer = [replace(p, lrs={g: v for g, v in p.lrs.items() if g != "describe"})
                  for p in answer]
        return [describe_phase(self.describe_steps), *answer]

    def tasks(self) -> dict:
        return {"describe": DescribeTask()} if self.describe_steps else {}

    def objective(self, output: VQAOutput, batch: dict, **weights: float) -> dict:
        """Cross-entropy of the answer, plus ``glimpse`` x the glimpse's cross-entropy (logged
        as ``glimpse``) when the model has one, plus the word reads' cross-entropy (logged as
        ``word_reads``) times ``read_weight`` with ``word_reads``, plus ``objectness`` x its
        loss. Data without the objects' masks is a one-line error when ``objectness`` or
        ``describe_steps`` needs them (so ``train.py``'s dry run catches it before the run
        folder is written)."""
        if self.describe_steps and "owner" not in batch:
            raise UserError(MASKS_NEEDED)
        terms = super().objective(output, batch, **weights)
        if output.glimpse_logits is not None:
            aux = losses.cross_entropy(output.glimpse_logits, batch["label"])
            terms["glimpse"] = aux
            terms["loss"] = terms["loss"] + self.glimpse * aux
        if output.read_logits is not None:
            aux = losses.cross_entropy(output.read_logits, batch["label"])
            terms["word_reads"] = aux
            terms["loss"] = terms["loss"] + self.read_weight * aux
        if self.objectness > 0:
            target = self.object_centres(batch, tuple(output.scores.shape[-2:]))
            target = target.to(output.scores.device)
            aux = losses.cross_entropy(output.scores.flatten(1),
                                       target / target.sum(1, keepdim=True).clamp(min=1))
            terms["objectness"] = aux
            terms["loss"] = terms["loss"] + self.objectness * aux
        return terms


@register_model("rn")
class RelationNetwork(CellReasoner):
    builtin_epochs = 1  # 625 pairs per question: one epoch is already ~20 CPU minutes
    # Santoro et al. (2017) train on minibatches of 64, as does the open re-implementation. han's
    # model on every cell (625 pairs) left the answer prior within 3 epochs at 64 and crept for 20
    # at 320 (docs/han-relational.md, "Batches of 64 on every cell"); an epoch costs about the
    # same. This family, without han's cell embeddings and auxiliary reads, stayed at the prior
    # for 4 epochs at 64 on the built-in 3,600 scenes (128 x 3, film, distance; measured).
    default_batch_size = 64

    def __init__(self, backbone: str = "rn_cnn_rgb", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, class_names: list[str] | None = None,
                 vocab: list[str] | None = None, word_dim: int = 32, question_dim: int = 128,
                 g_dim: int = 256, g_layers: int = 4, f_dim: int = 256, dropout: float = 0.5,
                 film: bool = False, split_film: bool = False, distance: bool = False):
        """Santoro et al.'s RN: every CNN cell with its (x, y) is an object; g over all N^2
        pairs with the question, summed, then f. Args as ``han``'s Relation Network; the
        defaults are the paper's (``film`` and ``distance`` off, 256 wide x 4)."""
        super().__init__()
        bb = self._init_vqa(backbone, pretrained, stage, num_classes, class_names, vocab,
                            word_dim, question_dim)
        self.reasoner = RelationModule(bb.channels + 2, question_dim, self.num_classes, g_dim,
                                       g_layers, f_dim, dropout, film, distance,
                                       split_film=split_film)

    def cells(self, image, question, question_length, image_index=None) -> CellSet:
        features = self.image_features(image, image_index, question)
        q = self.encode(question, question_length)
        cells = cells_with_coordinates(features)
        return CellSet(select_all(cells), q, tuple(features.shape[-2:]), every_cell=cells)

    def _output(self, logits: torch.Tensor, cells: CellSet) -> VQAOutput:
        h, w = cells.grid
        return VQAOutput(logits=logits, stride=self.stride,
                         attention=uniform_attention(len(logits), h, w, logits))


def time_reasoning(model: CellReasoner, image: torch.Tensor, question: torch.Tensor,
                   question_length: torch.Tensor, image_index: torch.Tensor | None = None,
                   repeats: int = 10, all_cells: bool = False) -> float:
    """Median seconds of one call of the reasoning step alone (inference, no gradients) on
    one batch, over ``repeats`` timed calls after warm-up
    (:func:`protozoo.models.probes.time_call`).

    The cells are computed once; only ``model.reason`` is timed. ``all_cells=True`` times the
    same module (same widths, same weights) on every cell of the grid instead of the kept ones:
    the full Relation Network's step, which hard attention is measured against."""
    from .probes import time_call

    if not isinstance(model, CellReasoner):
        raise UserError(f"time_reasoning needs a 'han' or 'rn' model, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cells = model.cells(image, question, question_length, image_index)
            if all_cells:
                cells = cells.without_selection()
            return time_call(lambda: model.reason(cells), repeats=repeats)
    finally:
        model.train(was_training)
