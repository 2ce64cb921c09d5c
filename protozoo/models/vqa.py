"""Attention VQA: where the model looked, checkable against the objects the answer depends on.

* ``san`` -- Stacked Attention Networks (Yang et al., "Stacked Attention Networks for Image
  Question Answering", CVPR 2016): CNN map -> cell vectors ``v_I = tanh(W f + b)``, LSTM
  question ``u``, K soft attention hops (:class:`~protozoo.attention.AttentionHop`, default 2),
  answer from the final ``u``. Every hop's attention map is in the output.
* ``cnn_lstm`` -- the no-attention baseline (Santoro et al.'s CNN+MLP with an LSTM question).
* ``han`` (hard attention, Malinowski et al. 2018) and the ``rn`` baseline (a Relation Network
  over all cells, Santoro et al. 2017) live in :mod:`protozoo.models.hard_attention`; they share
  :class:`VQAModel` with the two above.

All take ``(image, question, question_length)`` (:meth:`VQAModel.inputs`) and return a
:class:`~protozoo.outputs.VQAOutput`. The vocabulary is a constructor argument, so a checkpoint
carries it and a loaded model can tokenise new questions (:meth:`VQAModel.encode_question`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..attention import AttentionHop, cell_coordinates
from ..config import Phase, TrainConfig
from ..errors import UserError
from ..outputs import VQAOutput
from ..registry import register_model
from .base import ZooModel

BUILTIN_DATASETS = ("sort-of-clevr",)
PAD_ID = 0  # protozoo.data.text.PAD_ID: questions are padded with 0 at the end
QUESTION_TYPES = {0: "accuracy_non_relational", 1: "accuracy_relational"}


class QuestionEncoder(nn.Module):
    """Word embedding + one-layer LSTM; the question is the LSTM's final hidden state, layer-
    normalised.

    The sequence is packed by ``question_length``: the padding after the last word never enters
    the state, so the encoding does not depend on how far a question was padded.

    The LayerNorm is ours (SAN and the RN paper use the raw state). A freshly initialised LSTM's
    state is small (|h| ~ 0.1 per unit) next to image features in [-1, 1], so the question
    barely moves the attention or the relation module, and its gradient stays small: measured on
    sort-of-clevr with the objects given exactly (no CNN), SAN still answered 0.63 of the
    non-relational test questions after 6 epochs without it, and 0.94 after 2.6 epochs with it.
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(word_dim, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, question: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embedding(question), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)  # PyTorch restores the batch order of h_n
        return self.norm(hidden[-1])


def _check_vocab(vocab, family: str) -> list[str]:
    if vocab is None:
        raise UserError(f"VQA model '{family}' needs vocab=[...] (token id -> word): pass the "
                        "training vocabulary, DataBundle.vocab")
    from ..data.text import Vocabulary  # validates: "<pad>", "<unk>" first, no duplicates

    return Vocabulary(vocab).to_json()


def cells_with_coordinates(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C + 2]``: every cell's features with its (x, y) in [-1, 1]."""
    b, _, h, w = features.shape
    coords = cell_coordinates(h, w, features.device, features.dtype)
    return torch.cat([features.flatten(2).transpose(1, 2), coords.expand(b, -1, -1)], dim=2)


def distinct_images(batch: dict, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, index)`` on ``device`` when the batch says which image each question is about
    (``batch["image_id"]``): ``first[u]`` is the first question about distinct image ``u`` and
    ``index[q]`` the distinct image of question ``q``, so that ``batch[key][first][index]``
    equals ``batch[key]`` for any per-image ``key``. ``None`` without ``image_id``."""
    ids = batch.get("image_id")
    if ids is None:
        return None
    unique, index = torch.unique(torch.as_tensor(ids), return_inverse=True)
    first = torch.full((len(unique),), len(index), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, index, torch.arange(len(index), device=index.device), "amin")
    return first.to(device), index.to(device)


# ----------------------------------------------------------------------------- metrics

def cell_coverage(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of every cell of the ``grid`` covered by ``masks`` ``[B, 1, H, W]`` -> ``[B, h,
    w]``.

    The cells are the image split evenly into ``h x w`` tiles (``adaptive_avg_pool2d``: 15 px
    tiles for 75 px on a 5x5 grid) -- the cells the models' (x, y) (:func:`cell_coordinates`)
    and the cell colour of ``rn_cnn_rgb`` describe and the report draws, so a metric scores the
    same pixels the overlay shows."""
    return F.adaptive_avg_pool2d(masks.float(), grid)[:, 0]


def attention_metrics(attention: torch.Tensor, coverage: torch.Tensor,
                      tie_break: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image scores of one attention map ``[B, h, w]`` against the cell ``coverage``.

    * ``attention_mass_on_objects`` -- sum over cells of attention x covered fraction;
    * ``pointing_game`` -- is the attention's argmax cell covered (coverage > 0)? Ties (hard
      attention's kept cells, a uniform map) are first broken by ``tie_break`` (HAN's presence
      scores), and any tie left counts the covered share of the tied cells: the expected score of
      picking one of them at random;
    * each beside its ``_chance`` level, what the uniform map 1/N scores: the mean coverage
      (``attention_mass_on_objects_chance``) and the share of covered cells
      (``pointing_game_chance``: every cell tied, so the covered share of them).
    """
    att, cov = attention.flatten(1).float(), coverage.flatten(1)
    top = att >= att.amax(1, keepdim=True)
    if tie_break is not None:
        ranked = tie_break.flatten(1).float().masked_fill(~top, float("-inf"))
        top = ranked >= ranked.amax(1, keepdim=True)
    hits = (top & (cov > 0)).sum(1).float() / top.sum(1).float()
    return {"attention_mass_on_objects": (att * cov).sum(1),
            "attention_mass_on_objects_chance": cov.mean(1),
            "pointing_game": hits,
            "pointing_game_chance": (cov > 0).float().mean(1)}


# ----------------------------------------------------------------------------- shared base

class VQAModel(ZooModel):
    """What the four VQA families share: the question encoder, the vocabulary, the inputs, the
    metrics and the default schedule."""

    # Adam (the engine's optimiser; SAN's paper used SGD). Off the built-in data: the RN paper's
    # constant 2.5e-4. On sort-of-clevr a run is meant to fit a 2-core CPU: 1e-3 with a cosine
    # decay (3e-3 was not faster for SAN, measured), batches of 320 questions (~16 scenes, one
    # CNN pass each) and ``builtin_epochs`` per family sized to ~10 one-thread minutes over the
    # default 4000 scenes (72k training questions, 225 batches an epoch).
    # What limits accuracy there (measured, see the README): not the reasoning, the perception.
    # Given each object exactly (one-hot colour and shape in its cell, no CNN), SAN answers 0.94
    # of the non-relational test questions after 2.6 epochs; given each 15 px cell's mean colour
    # (no learnt features), 0.89 after 11; from pixels through a CNN trained from scratch
    # (rn_cnn, wider, stride 8, max-pooled, frozen or slower) it stays near 0.6 for 5-12 epochs.
    default_batch_size = 320  # about 16 scenes x their 20 questions, one CNN pass per scene
    task = "vqa"
    test_item = "question"
    ground_truth_metrics = {"masks": ("attention_mass_on_objects", "pointing_game")}
    # question: long [L] token ids (0 pads), question_length: int (protozoo.data.contract)
    sample_fields = ("image", "label", "question", "question_length")
    explains_images = False  # an answer needs a question: an image alone has nothing to explain
    report_writer = "protozoo.render.vqa_report:write_vqa_report"
    keeps_cells = False  # hard attention: its report shows the cells kept, not attention maps
    paper_lr = 2.5e-4
    builtin_lr = 1e-3
    builtin_epochs = 6
    paper_epochs = 50
    # Sort-of-CLEVR at the paper's scale (Santoro et al. 2017: 9,800 training scenes, ``--num-train
    # 9800``): 20 epochs, the open re-implementation's count, for every family. For ``han`` that
    # is about the optimiser steps of its 45 epochs on the default 4,000 scenes (docs/vqa.md).
    paper_scale_scenes = 9800
    paper_scale_epochs = 20

    def _init_vqa(self, backbone, pretrained, stage, num_classes, class_names, vocab,
                  word_dim: int, question_dim: int):
        bb = self._init_backbone(backbone, pretrained, stage, num_classes, class_names)
        self.vocab = _check_vocab(vocab, type(self).__name__)
        self.question_encoder = QuestionEncoder(len(self.vocab), word_dim, question_dim)
        return bb

    def data_args(self) -> dict:
        """Questions are encoded with the model's own words (test words it never saw become
        ``<unk>``), not with a vocabulary rebuilt from the data."""
        return {"vocab": self.vocab}

    # ---------------------------------------------------------------- questions
    def inputs(self, batch: dict) -> tuple:
        """``(image, question, question_length, image_index)``. When the batch says which image
        each question is about (``batch["image_id"]``, from the VQA datasets), every image is kept
        once and ``image_index`` maps the questions to it: a scene's questions then share one CNN
        pass (the training sampler groups questions by scene, see
        :class:`~protozoo.engine.GroupedSampler`)."""
        image = batch["image"]
        distinct = distinct_images(batch, image.device)
        if distinct is None:
            return image, batch["question"], batch["question_length"], None
        first, index = distinct
        return image[first], batch["question"], batch["question_length"], index

    def image_features(self, image: torch.Tensor, image_index: torch.Tensor | None,
                       question: torch.Tensor):
        """The backbone's map of every question's image ``[B, C, h, w]``: each distinct image
        runs through the CNN once, then ``image_index`` gathers it for its questions. One-line
        errors: the backbone checks the images themselves (so a missing batch dimension is
        named before any count), then the images are checked against the questions
        (:meth:`encode` checks a malformed ``question``)."""
        features = self.backbone(image)
        if torch.is_tensor(question) and question.ndim == 2:
            self._check_image_index(len(image), image_index, len(question))
        return features if image_index is None else features[image_index]

    @staticmethod
    def _check_image_index(images: int, image_index, questions: int) -> None:
        if image_index is None:
            if images != questions:
                raise UserError(f"{images} images for {questions} questions: give one image per "
                                "question, or the distinct images with image_index [questions] "
                                "naming each question's image")
            return
        index = torch.as_tensor(image_index)
        if index.shape != (questions,) or index.dtype.is_floating_point \
                or index.dtype == torch.bool:
            raise UserError(f"image_index must be {questions} integers (one per question), got "
                            f"{index.dtype} of shape {tuple(index.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(index)) if questions else (0, 0)
        if lo < 0 or hi >= images:
            raise UserError(f"image_index {lo if lo < 0 else hi} names no image: there are "
                            f"{images}, so it must lie in [0, {images - 1}]")

    def encode_question(self, texts: str | list[str], unknown: str = "error"):
        """Token ids ``[N, L]`` (int64, padded with 0) and lengths ``[N]`` of ``texts`` (a list
        of questions, or one question) in this model's vocabulary; ``unknown="unk"`` maps
        unknown words to ``<unk>`` instead of raising."""
        from ..data.text import Vocabulary

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, lengths, _ = Vocabulary(self.vocab).encode_many(texts, unknown)
        return torch.from_numpy(ids).long(), torch.from_numpy(lengths).long()

    def encode(self, question: torch.Tensor, question_length: torch.Tensor) -> torch.Tensor:
        """The question vector ``[B, question_dim]``, after checking the ids and lengths."""
        if not torch.is_tensor(question):
            raise UserError(f"question must be token ids [B, L], got {type(question).__name__}; "
                            "encode text with ids, lengths = model.encode_question(texts)")
        if question.ndim != 2:
            raise UserError(f"question must be token ids [B, L], got shape {tuple(question.shape)}"
                            "; encode text with model.encode_question(texts)")
        lengths = torch.as_tensor(question_length).long().cpu().reshape(-1)
        if len(lengths) != len(question):
            raise UserError(f"{len(lengths)} question lengths for {len(question)} questions; "
                            "give one length per question")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > question.shape[1]:
            raise UserError(f"question lengths must lie in [1, {question.shape[1]}], got {lo}..{hi}"
                            "; an empty question cannot be answered, and a length counts the "
                            "real tokens before the padding")
        first, last = (int(v) for v in torch.aminmax(question))
        if first < 0 or last >= len(self.vocab):
            bad = first if first < 0 else last
            raise UserError(f"token id {bad} is outside this model's vocabulary of "
                            f"{len(self.vocab)} words; encode questions with the model's own "
                            "vocabulary: model.encode_question(texts)")
        # Templated questions repeat within a batch: run the LSTM once per distinct question.
        unique, inverse = torch.unique(question.long(), dim=0, return_inverse=True)
        first = torch.full((len(unique),), len(inverse), dtype=torch.long)
        first.scatter_reduce_(0, inverse.cpu(), torch.arange(len(inverse)), "amin")
        return self.question_encoder(unique, lengths[first])[inverse]

    # ---------------------------------------------------------------- training and evaluation
    backbone_lr_scale = 0.1  # the CNN learns 10x slower than the head (README: measured)

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        """One Adam phase over everything. Built-in data (sort-of-clevr): ``builtin_lr`` with a
        cosine decay for ``builtin_epochs`` (``paper_scale_epochs`` when ``--num-train`` asks for
        the paper's 9,800 scenes or more); other data (CLEVR): the RN paper's constant 2.5e-4.
        ``--lr`` sets the head's rate; the backbone always gets ``backbone_lr_scale`` of it (ours,
        not the papers'): a CNN from scratch that moves as fast as the head keeps changing the
        features the attention is learning to read (SAN with ``rn_cnn_rgb``, measured: non-
        relational test accuracy 0.95 after 10 epochs at 0.1x, 0.56 after 4 at 1x)."""
        builtin = cfg.dataset in BUILTIN_DATASETS
        lr = cfg.lr if cfg.lr is not None else (self.builtin_lr if builtin else self.paper_lr)
        if cfg.epochs is not None:
            epochs = cfg.epochs
        elif not builtin:
            epochs = self.paper_epochs
        elif (cfg.num_train or 0) >= self.paper_scale_scenes:
            epochs = self.paper_scale_epochs
        else:
            epochs = self.builtin_epochs
        lrs = {g: lr * (self.backbone_lr_scale if g == "backbone" else 1.0)
               for g in self.param_groups()}
        return [Phase("train", epochs, lrs, weight_decay=cfg.weight_decay,
                      schedule="cosine" if builtin else "constant")]

    def reasoning_pairs(self, output: VQAOutput) -> torch.Tensor:
        """``[B]`` object pairs the relation module evaluated per image (0: no relation module)."""
        return torch.zeros(len(output.logits), dtype=torch.long, device=output.logits.device)

    def explanation_metrics(self, output: VQAOutput, batch: dict) -> dict[str, torch.Tensor]:
        """Accuracy per question type and per question kind (``accuracy_kind_<kind>``, e.g.
        ``accuracy_kind_closest``; kinds as the data's programs name them, see
        :func:`protozoo.data.clevr.question_kind`), each over that subset only; the last hop's
        attention against the answer's objects (``batch["mask"]``, when the data has masks);
        and the reasoning cost (``cells_kept_fraction``, ``reasoning_pairs``) where there is a
        relation module."""
        out: dict[str, torch.Tensor] = {}
        correct = (output.logits.argmax(1) == batch["label"]).float()
        qtype = batch.get("question_type")
        if qtype is not None:
            for value, name in QUESTION_TYPES.items():
                subset = qtype == value
                if bool(subset.any()):  # an empty subset would count 0 of 0 images
                    out[name] = correct[subset]
        kinds = batch.get("question_kind") or []
        for kind in sorted(set(kinds) - {""}):
            subset = torch.tensor([k == kind for k in kinds], device=correct.device)
            out[f"accuracy_kind_{kind}"] = correct[subset]
        if "mask" in batch:
            attention = output.attention[:, -1]
            coverage = cell_coverage(batch["mask"], tuple(attention.shape[-2:]))
            out.update(attention_metrics(attention, coverage, output.scores))
        out.update(self._cost_metrics(output))
        return out

    def _cost_metrics(self, output: VQAOutput) -> dict[str, torch.Tensor]:
        return {}

    consistency_questions = 1000  # test questions perturbed for the behavioural test

    def dataset_metrics(self, data, amp: str = "auto") -> dict[str, float]:
        """The behavioural test (:func:`protozoo.models.probes.consistency`, at precision
        ``amp``) on data whose scenes can be re-rendered (Sort-of-CLEVR): ``consistency``,
        ``perturbed_accuracy``."""
        from .probes import can_perturb, consistency

        if not can_perturb(data.test):
            return {}
        device = next(self.parameters()).device
        return consistency(self, data.test, device=device, limit=self.consistency_questions,
                           amp=amp)


def uniform_attention(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` of 1/N: the baselines weigh every cell alike."""
    return torch.full((b, 1, h, w), 1.0 / (h * w), device=like.device, dtype=torch.float32)


# ----------------------------------------------------------------------------- SAN

@register_model("san")
class SAN(VQAModel):
    builtin_epochs = 15  # ~0.13 s a batch of 320 (one thread): ~40 s an epoch

    def __init__(self, backbone: str = "rn_cnn_rgb", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, class_names: list[str] | None = None,
                 vocab: list[str] | None = None, word_dim: int = 32, question_dim: int = 128,
                 hops: int = 2, att_dim: int = 64, score_tanh: bool = False,
                 coordinates: bool = True, answer_dim: int = 256):
        """
        Args:
            question_dim: d, the LSTM state and the cell vectors (``u = v~ + u`` needs one size).
            hops: attention layers K (paper: 2; more did not help them).
            att_dim: k, the width of the attention MLP.
            score_tanh: bound the scores with tanh before the softmax like the official code
                (caps a cell near 3.7% on 196 cells); default False follows the paper.
            coordinates: append each cell's (x, y) to its features before ``v_I = tanh(W f + b)``
                (Santoro et al.'s trick, not in SAN): the weighted sum ``v~`` otherwise forgets
                *where* the attended cell was, and "is X on the left?" needs it.
            answer_dim: hidden units of the answer MLP on ``u`` (the paper: one softmax layer).
        """
        super().__init__()
        if hops < 1:
            raise ValueError(f"hops must be at least 1, got {hops}")
        bb = self._init_vqa(backbone, pretrained, stage, num_classes, class_names, vocab,
                            word_dim, question_dim)
        self.coordinates = coordinates
        self.image_proj = nn.Linear(bb.channels + (2 if coordinates else 0), question_dim)
        self.hops = nn.ModuleList(AttentionHop(question_dim, att_dim, score_tanh)
                                  for _ in range(hops))
        self.answer = nn.Sequential(nn.Linear(question_dim, answer_dim), nn.ReLU(inplace=True),
                                    nn.Linear(answer_dim, self.num_classes))

    def forward(self, image: torch.Tensor, question: torch.Tensor,
                question_length: torch.Tensor, image_index: torch.Tensor | None = None
                ) -> VQAOutput:
        features = self.image_features(image, image_index, question)
        b, _, h, w = features.shape
        cells = (cells_with_coordinates(features) if self.coordinates
                 else features.flatten(2).transpose(1, 2))
        v = torch.tanh(self.image_proj(cells))  # v_I, [B, N, d]
        u = self.encode(question, question_length)
        maps = []
        for hop in self.hops:
            u, p = hop(v, u)
            maps.append(p)
        attention = torch.stack(maps, 1).view(b, len(self.hops), h, w)
        return VQAOutput(logits=self.answer(u), stride=self.stride, attention=attention)

    def intrinsic_map(self, output: VQAOutput, target: torch.Tensor) -> torch.Tensor:
        """The last hop's attention ``[B, h, w]`` (the same whatever answer ``target`` names)."""
        return output.attention[:, -1]


# ----------------------------------------------------------------------------- CNN + LSTM

@register_model("cnn_lstm")
class CNNLSTM(VQAModel):
    builtin_epochs = 20  # ~0.09 s a batch of 320 (one thread): ~30 s an epoch

    def __init__(self, backbone: str = "rn_cnn_rgb", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, class_names: list[str] | None = None,
                 vocab: list[str] | None = None, word_dim: int = 32, question_dim: int = 128,
                 grid: int = 5, hidden_dim: int = 256, dropout: float = 0.5):
        """
        Args:
            grid: the map is average-pooled to ``grid x grid`` cells and flattened (a 5x5 map,
                rn_cnn at 75 px, passes unchanged), so the MLP's size does not depend on the
                image size while the flattened cells still say where things are.
            hidden_dim, dropout: the MLP on [image; question] (Santoro's CNN+MLP: 256, 0.5).
        """
        super().__init__()
        bb = self._init_vqa(backbone, pretrained, stage, num_classes, class_names, vocab,
                            word_dim, question_dim)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.mlp = nn.Sequential(
            nn.Linear(bb.channels * grid * grid + question_dim, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden_dim, self.num_classes))

    def forward(self, image: torch.Tensor, question: torch.Tensor,
                question_length: torch.Tensor, image_index: torch.Tensor | None = None
                ) -> VQAOutput:
        features = self.image_features(image, image_index, question)
        b, _, h, w = features.shape
        q = self.encode(question, question_length)
        logits = self.mlp(torch.cat([self.pool(features).flatten(1), q], dim=1))
        return VQAOutput(logits=logits, stride=self.stride,
                         attention=uniform_attention(b, h, w, features))
