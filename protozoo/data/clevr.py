"""VQA data in CLEVR's layout: our Sort-of-CLEVR and the real CLEVR v1.0 download, one loader.

Layout (Johnson et al., CLEVR, CVPR 2017)::

    root/images/<split>/<image_filename>
    root/questions/<PREFIX>_<split>_questions.json   {"questions": [{"image_filename",
                                                       "question", "answer", ...}, ...]}
    root/scenes/<PREFIX>_<split>_scenes.json         optional
    root/masks/<split>/<image_filename stem>.png     optional (ours): 0 background, k+1 object k

Splits: ``train`` is the training split; the evaluation split is ``val`` when there is one
(real CLEVR: its ``test`` questions carry no answers), else ``test`` (our generator).

Optional fields we read when present: ``question_type`` ("non-relational"/"relational"; else -1),
``relevant_objects`` (object indices the answer depends on; with ``masks/`` they give each
question's ``mask``) and ``program`` (kept as it is, e.g. for perturbations; it also names the
question's kind, :func:`question_kind`, by which evaluation breaks accuracy down).

Why a question table over an image store: many questions share one image (20 per Sort-of-CLEVR
scene, about 10 per CLEVR image), so the pixels are decoded once (:class:`ImageStore`, lazily
beyond its memory limit) and every question row points at its image.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protozoo.data.base import (ImageStore, StoreView, _as_vector, native_size,
                                 parallel_map)
from protozoo.data.text import Vocabulary
from protozoo.errors import DataError

QUESTION_TYPES = ("non-relational", "relational")
UNKNOWN_TYPE = -1
_HINT = "the folder must be in CLEVR's layout (images/<split>/, questions/*_<split>_questions.json)"


# -- reading the files ------------------------------------------------------------------------
def questions_file(root: Path, split: str) -> Path | None:
    found = sorted((root / "questions").glob(f"*_{split}_questions.json"))
    if len(found) > 1:
        raise DataError(f"several question files for split '{split}' in '{root / 'questions'}' "
                        f"({', '.join(p.name for p in found)}): keep one")
    return found[0] if found else None


def evaluation_split(root) -> str:
    """'val' when the folder has val questions (real CLEVR), else 'test'."""
    return "val" if questions_file(Path(root), "val") is not None else "test"


def _load_json(path: Path, key: str) -> list:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"'{path}' not found: {_HINT}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read '{path}' ({str(err).splitlines()[0]}): fix or re-export "
                        "the JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"'{path}' must hold a JSON object with a '{key}' list (CLEVR's format)")
    return data[key]


def read_questions(root, split: str) -> tuple[Path, list[dict]]:
    """(file, entries) of one split, each entry checked for the fields every loader needs."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found: {_HINT}")
    path = questions_file(root, split)
    if path is None:
        also = (" (or _val_questions.json: real CLEVR's val split is scored as the test split)"
                if split == "test" else "")
        raise DataError(f"no questions for split '{split}': expected "
                        f"'{root / 'questions'}/<name>_{split}_questions.json'{also}; {_HINT}")
    entries = _load_json(path, "questions")
    if not entries:
        raise DataError(f"'{path}' has no questions: regenerate or re-download it")
    for n, e in enumerate(entries):
        _check_entry(e, n, path)
    return path, entries


def _check_entry(e, n: int, path: Path) -> None:
    if not isinstance(e, dict):
        raise DataError(f"question {n} in '{path}' is not a JSON object: fix the file")
    for key in ("image_filename", "question", "answer"):
        if type(e.get(key)) is not str:
            what = "has no answer (CLEVR's test split is unanswered: evaluate on val)" \
                if key == "answer" and key not in e else f"lacks a text '{key}'"
            raise DataError(f"question {n} in '{path}' {what}; fix the file")
    kind = e.get("question_type")
    if kind is not None and kind not in QUESTION_TYPES:
        raise DataError(f"question {n} in '{path}' has question_type {kind!r}: use one of "
                        f"{', '.join(QUESTION_TYPES)}")
    rel = e.get("relevant_objects")
    if rel is not None and not (type(rel) is list and all(
            type(v) is int and 0 <= v < 254 for v in rel)):
        raise DataError(f"question {n} in '{path}' has relevant_objects {rel!r}: give a list "
                        "of object indices (0..253)")


# CLEVR's question types as Johnson et al. (CVPR 2017, Fig. 3) report accuracy by them, from the
# program's last function
_CLEVR_KINDS = {"count": "count", "exist": "exist", "equal_integer": "compare_integer",
                "less_than": "compare_integer", "greater_than": "compare_integer",
                **{f"query_{a}": "query_attribute" for a in ("size", "color", "material", "shape")},
                **{f"equal_{a}": "compare_attribute"
                   for a in ("size", "color", "material", "shape")}}


def question_kind(program) -> str:
    """The kind of question a stored ``program`` asks ("" when it names none): a Sort-of-CLEVR
    program's ``subtype`` ("shape", "closest", "count", ...), or for a CLEVR functional program
    (a list of ``{"function": ...}`` nodes; ``"type"`` in some releases) its question type by
    the last function: count, exist, compare_integer, query_attribute, compare_attribute."""
    if isinstance(program, dict):
        kind = program.get("subtype")
        return kind if isinstance(kind, str) else ""
    if isinstance(program, list) and program and isinstance(program[-1], dict):
        last = program[-1].get("function", program[-1].get("type"))
        if isinstance(last, str):
            return _CLEVR_KINDS.get(last, last)
    return ""


def training_answers(entries: list[dict]) -> list[str]:
    return sorted({str(e["answer"]) for e in entries})


# -- the dataset ------------------------------------------------------------------------------
@dataclass
class QuestionTable:
    """One row per question; ``image`` indexes the image store."""

    image: np.ndarray  # int64 [Q]
    tokens: np.ndarray  # int32 [Q, L], padded with PAD_ID
    lengths: np.ndarray  # int64 [Q]
    labels: np.ndarray  # int64 [Q], index into the answers
    types: np.ndarray  # int64 [Q], 0/1 or -1
    texts: list  # question text
    programs: list  # structured form as stored (or None)
    relevant: list  # tuple of object indices (or None)


def make_table(entries: list[dict], image_of: list[int], answers: list[str], vocab: Vocabulary,
               unknown: str, length: int | None, source: str) -> tuple[QuestionTable, int]:
    """Encode questions and answers; returns the table and the number of unknown tokens."""
    index = {a: i for i, a in enumerate(answers)}
    labels = np.empty(len(entries), dtype=np.int64)
    for n, e in enumerate(entries):
        a = str(e["answer"])
        if a not in index:
            raise DataError(f"answer '{a}' of question {n} in {source} never occurs in the "
                            "training questions: a model cannot predict it; add training "
                            "questions with it or drop the question")
        labels[n] = index[a]
    texts = [str(e["question"]) for e in entries]
    tokens, lengths, unknown_count = vocab.encode_many(texts, unknown, length)
    types = np.array([QUESTION_TYPES.index(e["question_type"]) if e.get("question_type")
                      else UNKNOWN_TYPE for e in entries], dtype=np.int64)
    relevant = [None if e.get("relevant_objects") is None else tuple(e["relevant_objects"])
                for e in entries]
    table = QuestionTable(np.asarray(image_of, dtype=np.int64), tokens, lengths, labels, types,
                          texts, [e.get("program") for e in entries], relevant)
    return table, unknown_count


def _mask_lookup(relevant: list, owners: np.ndarray) -> np.ndarray:
    """uint8 [Q, V]: row q maps an ownership value (0 background, k+1 object k) to 1 when
    object k is one the answer depends on, so a question's mask is one numpy gather
    (torch's advanced indexing costs milliseconds per item here; numpy's microseconds)."""
    counts = np.array([len(r) for r in relevant], dtype=np.int64)
    cols = np.fromiter((k + 1 for r in relevant for k in r), dtype=np.int64, count=counts.sum())
    width = int(max(owners.max(initial=0), cols.max(initial=0))) + 1
    lut = np.zeros((len(relevant), width), dtype=np.uint8)
    lut[np.repeat(np.arange(len(relevant)), counts), cols] = 1
    return lut


class VQADataset(StoreView):
    """Questions over images: an :class:`ImageStore` of the images plus a :class:`QuestionTable`.

    Item: ``image`` float32 [3, S, S] normalised, ``label`` (answer index into
    ``class_names``), ``index``, ``path`` (image file), ``question`` int64 [L] padded with
    ``PAD_ID``, ``question_length``,
    ``question_type`` (0 non-relational, 1 relational, -1 unknown), ``question_kind``
    (:func:`question_kind`, "" for none) and, when the data has ownership masks and relevant
    objects, ``mask`` float32 [1, S, S] (union of the relevant objects' masks) and ``owner``
    uint8 [S, S] (the image's ownership map: 0 background, k+1 object k). Views
    (:meth:`subset`) share the store and the table.
    """

    def __init__(self, store: ImageStore, table: QuestionTable, answers, vocab: Vocabulary, *,
                 owners: np.ndarray | None = None, mean=(0.5,) * 3, std=(0.5,) * 3,
                 scenes_file=None, image_names=None):
        self._store, self._table = store, table
        self.class_names = [str(a) for a in answers]
        self.vocab = vocab
        self._owners = owners
        self._lut = None if owners is None else _mask_lookup(table.relevant, owners)
        self.mean = tuple(float(v) for v in _as_vector(mean, "mean").flatten())
        self.std = tuple(float(v) for v in _as_vector(std, "std").flatten())
        std_vec = _as_vector(std, "std")
        self._scale = 1.0 / (255.0 * std_vec)
        self._shift = -_as_vector(mean, "mean") / std_vec
        self.augment = False
        self._positions = np.arange(len(table.labels), dtype=np.int64)
        self._scenes = {"file": None if scenes_file is None else Path(scenes_file), "by": None}
        self.image_names = list(image_names) if image_names is not None else \
            [Path(p).name for p in store.paths]

    # -- metadata -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._positions.size)

    @property
    def labels(self) -> list[int]:
        return self._table.labels[self._positions].tolist()

    @property
    def paths(self) -> list[str]:
        return [self._store.paths[j] for j in self._table.image[self._positions]]

    @property
    def image_indices(self) -> np.ndarray:
        """Store position of each question's image (questions of one image share it)."""
        return self._table.image[self._positions].copy()

    @property
    def groups(self) -> np.ndarray:
        """The training sampler's groups (:mod:`protozoo.data.base`): the questions about one
        image are batched together, so the image runs through the CNN once per batch."""
        return self.image_indices

    @property
    def question_texts(self) -> list[str]:
        return [self._table.texts[q] for q in self._positions]

    @property
    def question_types(self) -> list[int]:
        return self._table.types[self._positions].tolist()

    @property
    def has_masks(self) -> bool:
        return self._owners is not None

    @property
    def has_boxes(self) -> bool:
        return False

    def subset(self, indices, augment: bool | None = None) -> VQADataset:
        """A view of some questions (indices relative to this view); same store and table."""
        if augment:
            raise DataError("augmentation is not supported for VQA data: a flip changes the "
                            "answers about left and right; train without --augment")
        view = copy.copy(self)
        view._positions = self._positions[np.asarray(indices, dtype=np.int64).reshape(-1)]
        return view

    def question_text(self, i: int) -> str:
        return self._table.texts[int(self._positions[i])]

    def program(self, i: int):
        return self._table.programs[int(self._positions[i])]

    def relevant_objects(self, i: int):
        return self._table.relevant[int(self._positions[i])]

    def scene(self, i: int) -> dict | None:
        """The scene description of question i's image from the scenes file (read on first
        use: real CLEVR's are large and training never needs them), or None without one."""
        if self._scenes["file"] is None:
            return None
        if self._scenes["by"] is None:
            scenes = _load_json(self._scenes["file"], "scenes")
            self._scenes["by"] = {s.get("image_filename"): s for s in scenes
                                  if isinstance(s, dict)}
        name = self.image_names[int(self._table.image[self._positions[i]])]
        if name not in self._scenes["by"]:
            raise DataError(f"no scene for image '{name}' in '{self._scenes['file']}': "
                            "regenerate the scenes file or remove it")
        return self._scenes["by"][name]

    # -- items ----------------------------------------------------------------------------
    def raw_image(self, i: int) -> np.ndarray:
        """The question's image, resized, un-normalised: uint8 [S, S, 3] (for reports)."""
        image, _, _ = self._store.get(int(self._table.image[self._positions[i]]))
        return image.permute(1, 2, 0).numpy().copy()

    def __getitem__(self, i: int) -> dict:
        q = int(self._positions[i])  # IndexError past the end keeps plain iteration working
        j = int(self._table.image[q])
        image, _, _ = self._store.get(j)
        item = {
            "image": image.float().mul_(self._scale).add_(self._shift),
            "label": int(self._table.labels[q]),
            "index": int(i) if i >= 0 else int(i) + len(self),
            "path": self._store.paths[j],
            "image_id": j,  # lets a batch run each image through the CNN once
            "question": torch.from_numpy(self._table.tokens[q]).long(),
            "question_length": int(self._table.lengths[q]),
            "question_type": int(self._table.types[q]),
            "question_kind": question_kind(self._table.programs[q]),
        }
        if self._owners is not None:
            item["mask"] = torch.from_numpy(self._lut[q][self._owners[j]][None]).float()
            item["owner"] = torch.from_numpy(self._owners[j])  # uint8 [S, S]: 0 or k+1
        return item


def scene_split(dataset: VQADataset, fraction: float, seed: int):
    """(kept, held) question indices, holding out ``fraction`` of the *images* with all their
    questions, so no image is in both parts. Seeded and sorted."""
    images = dataset.image_indices
    unique = np.unique(images)
    if unique.size < 2:
        raise DataError("the training split has one image: a validation split needs at least 2")
    count = int(np.clip(round(fraction * unique.size), 1, unique.size - 1))
    held_images = np.random.default_rng(seed).permutation(unique)[:count]
    held = np.isin(images, held_images)
    return np.flatnonzero(~held), np.flatnonzero(held)


# -- loading one split ------------------------------------------------------------------------
@dataclass
class SplitFiles:
    """What one split's files say, before any image is decoded."""

    split: str
    questions_path: Path
    entries: list  # question entries whose image is kept
    image_names: list  # kept images, sorted
    image_of: list  # per entry, position in image_names


def scan_split(root, split: str, num_images=None, seed: int = 0, read=None) -> SplitFiles:
    """Keep a seeded subset of ``num_images`` images of a split, with all their questions;
    every kept image file must exist. ``read`` is :func:`read_questions`'s result when the
    caller already has it (real CLEVR's training file takes seconds to parse)."""
    root = Path(root)
    path, entries = read_questions(root, split) if read is None else read
    names = sorted({str(e["image_filename"]) for e in entries})
    if num_images is not None and int(num_images) < len(names):
        if int(num_images) < 1:
            raise DataError(f"asked for {num_images} images: use a positive number or leave "
                            "it unset")
        keep = np.random.default_rng(seed).permutation(len(names))[: int(num_images)]
        names = [names[k] for k in np.sort(keep)]
    position = {n: k for k, n in enumerate(names)}
    kept = [e for e in entries if str(e["image_filename"]) in position]
    folder = root / "images" / split
    exists = set(p.name for p in folder.iterdir()) if folder.is_dir() else set()
    for n, e in enumerate(entries):
        name = str(e["image_filename"])
        if name in position and name not in exists:
            raise DataError(f"image '{folder / name}' of question {n} in '{path}' not found: "
                            "restore the image or remove its questions")
    return SplitFiles(split, path, kept, names, [position[str(e["image_filename"])] for e in kept])


def _owner_map(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise DataError(f"mask '{path}' must be a one-channel ownership map (0 "
                                "background, k+1 object k): regenerate it")
            gray = im if im.mode == "L" else im.convert("L")
            return np.asarray(gray.resize((image_size, image_size), Image.NEAREST)).copy()
    except FileNotFoundError:
        raise DataError(f"mask '{path}' not found: restore it or remove the masks folder") \
            from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read mask '{path}' ({err}): regenerate it") from None


def _owners(root: Path, files: SplitFiles, image_size: int) -> np.ndarray | None:
    """Ownership maps [N, S, S] when the split has masks and every question names its objects."""
    folder = root / "masks" / files.split
    if not folder.is_dir():
        return None
    missing = [n for n, e in enumerate(files.entries) if e.get("relevant_objects") is None]
    if missing:
        raise DataError(f"'{files.questions_path}' question {missing[0]} has no "
                        "relevant_objects but the split has masks: add them or remove "
                        f"'{folder}'")
    paths = [(folder / n).with_suffix(".png") for n in files.image_names]
    return np.stack(list(parallel_map(lambda p: _owner_map(p, image_size), paths)))


def scenes_file(root: Path, split: str) -> Path | None:
    found = sorted((root / "scenes").glob(f"*_{split}_scenes.json"))
    return found[0] if found else None


def load_split(root, files: SplitFiles, image_size: int, answers, vocab: Vocabulary, *,
               unknown: str, length: int | None, mean=(0.5,) * 3, std=(0.5,) * 3,
               preload="auto") -> tuple[VQADataset, int]:
    """Decode a scanned split's images (once each) and encode its questions."""
    root = Path(root)
    table, unknown_count = make_table(files.entries, files.image_of, answers, vocab, unknown,
                                      length, f"'{files.questions_path}'")
    paths = [root / "images" / files.split / n for n in files.image_names]
    store = ImageStore(paths, np.zeros(len(paths), dtype=np.int64), image_size, preload=preload,
                       source=f"'{root / 'images' / files.split}'")
    owners = _owners(root, files, image_size)
    ds = VQADataset(store, table, answers, vocab, owners=owners, mean=mean, std=std,
                    scenes_file=scenes_file(root, files.split), image_names=files.image_names)
    return ds, unknown_count


def load_vqa(root, *, image_size: int | None, mean=(0.5,) * 3, std=(0.5,) * 3, seed: int = 0,
             num_train=None, num_test=None, vocab=None, answers=None, preload="auto"):
    """(train, test, facts) for a folder in CLEVR's layout, ``facts`` being the values of the
    optional :class:`~protozoo.data.DataBundle` fields it sets; see the module doc.

    ``num_train``/``num_test`` keep a seeded subset of that many *images* with all their
    questions. The answers (``answers`` unless given) are every answer of the training questions
    file, sorted, and the vocabulary is built from all its questions, so both stay the same
    whatever subset is kept; pass ``vocab`` (a word list, e.g. a loaded model's) to encode with
    it instead. Test questions map unknown words to ``<unk>``, counted in
    ``unknown_words``. ``image_size`` None keeps the images' own size when they all share one
    square size, and is a one-line error otherwise (real CLEVR's 480x320 images need one;
    Santoro et al.'s Relation Network used 128).
    """
    root = Path(root)
    read = read_questions(root, "train")
    all_train = read[1]
    train_files = scan_split(root, "train", num_train, seed, read)
    answers = training_answers(all_train) if answers is None else list(answers)
    built = vocab is None
    vocab = Vocabulary.build(str(e["question"]) for e in all_train) if built \
        else Vocabulary(vocab)
    test_files = scan_split(root, evaluation_split(root), num_test, seed)
    if image_size is None:  # the images' own size, when they share one (no silent resizing)
        image_size = native_size([root / "images" / f.split / n for f in (train_files, test_files)
                                  for n in f.image_names], f"'{root / 'images'}'")
    common = dict(answers=answers, vocab=vocab, length=None, mean=mean, std=std,
                  preload=preload)
    train, unknown_train = load_split(root, train_files, image_size,
                                      unknown="error" if built else "unk", **common)
    test, unknown_test = load_split(root, test_files, image_size, unknown="unk", **common)
    length = max(train._table.tokens.shape[1], test._table.tokens.shape[1])
    for ds in (train, test):  # one padded length for the whole bundle
        pad = length - ds._table.tokens.shape[1]
        ds._table.tokens = np.pad(ds._table.tokens, ((0, 0), (0, pad)))
    facts = {"root": str(root), "vocab": vocab.to_json(),
              "model_kwargs": {"vocab": vocab.to_json()}, "question_types": list(QUESTION_TYPES),
              "max_question_length": length, "test_split": test_files.split,
              "unknown_words": {"train": unknown_train, "test": unknown_test}}
    return train, test, facts


# -- build_data's loader (Sort-of-CLEVR's, which generates then reads, is in sort_of_clevr) -----
CLEVR_HINT = "--data-dir must be the extracted CLEVR_v1.0 folder (images/, questions/)"


def check_answers(num_classes, answers, name: str) -> None:
    if num_classes is not None and int(num_classes) != len(answers):
        raise DataError(f"num_classes={num_classes} but dataset '{name}' has {len(answers)} "
                        "answers: leave num_classes unset")


def clevr_loader(a: dict):
    """``build_data``'s loader for a CLEVR-layout folder (real CLEVR v1.0: val is the test
    split). ``num_train``/``num_test`` keep a seeded subset of that many images."""
    if a.get("data_dir") is None:
        raise DataError(f"dataset 'clevr' needs a data folder: {CLEVR_HINT}")
    root = Path(a["data_dir"]).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found: {CLEVR_HINT}")
    train, test, facts = load_vqa(root, image_size=a["image_size"], mean=a["mean"],
                                   std=a["std"], seed=a["seed"], num_train=a.get("num_train"),
                                   num_test=a.get("num_test"), vocab=a.get("vocab"))
    check_answers(a.get("num_classes"), train.class_names, "clevr")
    return train, test, facts
