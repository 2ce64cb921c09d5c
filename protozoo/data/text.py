"""Question tokenisation: a word vocabulary built from the training questions.

Why a plain word list: a VQA model stores its vocabulary in its constructor kwargs (checkpoints
keep only JSON there), so the whole vocabulary is a ``list[str]`` whose position is the token id.
Ids 0 and 1 are reserved: ``<pad>`` (questions are padded at the end to one length per dataset)
and ``<unk>`` (an explicit unknown token, used only when asked for: by default an unknown word is
an error that names the word, because silently mapping it would hide a vocabulary mismatch).

Tokenising lower-cases the text and splits punctuation off as separate tokens, so "object?" and
"object" share the word "object" (CLEVR questions end with "?" and use ";" inside).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from protozoo.errors import DataError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
UNKNOWN_MODES = ("error", "unk")

_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, with every punctuation mark as its own token."""
    if not isinstance(text, str):
        raise DataError(f"a question must be text, got {type(text).__name__} ({text!r})")
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Token id <-> word. ``words[0] == "<pad>"``, ``words[1] == "<unk>"``, the rest sorted.

    Build one with :meth:`build` from the training questions; rebuild a stored one (a model's
    ``vocab`` kwarg, a JSON list) with ``Vocabulary(words)``.
    """

    def __init__(self, words: Iterable[str]):
        words = list(words)
        if len(words) < 2 or words[0] != PAD or words[1] != UNK:
            raise DataError(f"a vocabulary must start with '{PAD}', '{UNK}' (got "
                            f"{words[:2]!r}): build it with Vocabulary.build(questions)")
        if not all(isinstance(w, str) and w for w in words):
            raise DataError("every vocabulary entry must be a non-empty string: rebuild it with "
                            "Vocabulary.build(questions)")
        if len(set(words)) != len(words):
            raise DataError("the vocabulary lists a word twice: rebuild it with "
                            "Vocabulary.build(questions)")
        self.words = words
        self._ids = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocabulary:
        """Every word of ``texts`` once, sorted (so the ids do not depend on question order)."""
        seen = set()
        for text in set(texts):  # questions repeat: tokenise each distinct text once
            seen.update(tokenize(text))
        seen.discard(PAD)
        seen.discard(UNK)
        return cls([PAD, UNK, *sorted(seen)])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def to_json(self) -> list[str]:
        """The JSON form: the word list (a copy)."""
        return list(self.words)

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Token ids of ``text`` (no padding).

        ``unknown="error"`` raises a DataError naming the first unknown word; ``"unk"`` maps
        unknown words to ``UNK_ID``. An empty question is always an error (a model needs at
        least one token).
        """
        if unknown not in UNKNOWN_MODES:
            raise DataError(f"unknown={unknown!r} is not valid: use 'error' or 'unk'")
        tokens = tokenize(text)
        if not tokens:
            raise DataError(f"question {text!r} has no words: give a non-empty question")
        ids = [self._ids.get(t, UNK_ID) for t in tokens]
        if unknown == "error" and UNK_ID in ids:
            word = tokens[ids.index(UNK_ID)]
            raise DataError(f"unknown word '{word}' in question {text!r}: it does not occur in "
                            "the training questions; rephrase the question with known words, "
                            "or encode with unknown='unk' to map it to the unknown token")
        return ids

    def decode(self, ids) -> str:
        """Words of ``ids`` joined by spaces; padding is dropped."""
        words = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= i < len(self.words):
                raise DataError(f"token id {i} is outside the vocabulary (0..{len(self) - 1})")
            if i != PAD_ID:
                words.append(self.words[i])
        return " ".join(words)

    def encode_many(self, texts: list[str], unknown: str = "error", length: int | None = None):
        """(ids int32 [N, L] padded with PAD_ID, lengths int64 [N], number of unknown tokens).

        ``length`` defaults to the longest question; a longer question is an error (it would be
        cut, changing its meaning).
        """
        cache: dict[str, list[int]] = {}  # datasets repeat questions (Sort-of-CLEVR: 36 texts)
        encoded = []
        for text in texts:
            ids = cache.get(text)
            if ids is None:
                ids = cache[text] = self.encode(text, unknown)
            encoded.append(ids)
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        width = int(lengths.max(initial=1)) if length is None else int(length)
        if lengths.size and lengths.max() > width:
            long = int(lengths.argmax())
            raise DataError(f"question {texts[long]!r} has {lengths[long]} tokens, more than the "
                            f"padded length {width}: raise the length")
        ids = np.full((len(encoded), width), PAD_ID, dtype=np.int32)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = e
        return ids, lengths, int(sum(e.count(UNK_ID) for e in encoded))
