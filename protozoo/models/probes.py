"""Behavioural probes of VQA models, beyond accuracy.

* :func:`consistency` -- in the spirit of Mouselinos et al., "Measuring CLEVRness: Black-box
  Testing of Visual Reasoning Models" (ICLR 2022): perturb each test scene in a way that provably
  keeps the answer (move or recolour objects the question does not depend on; the new answer is
  recomputed from the scene description, :func:`protozoo.data.sort_of_clevr.perturbations`) and
  count how often the model's answer stays the same. A model that reads the right objects is
  unmoved; one that leans on scene statistics is not.
* :func:`time_call` -- the median time of a call; the reasoning step of hard attention against
  a Relation Network on all cells is timed by :func:`protozoo.models.hard_attention.time_reasoning`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..runtime import iterate


def predictions(model, dataset, batch_size: int, device, amp: str = "auto") -> np.ndarray:
    return torch.cat([out.logits.argmax(1).cpu() for _, out in
                      iterate(model, dataset, batch_size, device, amp)]).numpy()


def can_perturb(dataset) -> bool:
    """Whether ``dataset``'s scenes can be changed and re-rendered (a Sort-of-CLEVR split with its
    scenes file and question programs; a real CLEVR download cannot)."""
    try:
        return len(dataset) > 0 and dataset.scene(0) is not None and \
            dataset.program(0) is not None and "image_size" in dataset.scene(0)
    except (AttributeError, IndexError, KeyError, TypeError):
        return False


def consistency(model, test_dataset, batch_size: int = 128, device=None, limit: int = 2000,
                seed: int = 0, amp: str = "auto") -> dict[str, float]:
    """``consistency`` (share of answers unchanged under answer-preserving perturbations) and
    ``perturbed_accuracy`` (accuracy on the perturbed scenes), over a seeded ``limit`` of the test
    questions (one perturbation each)."""
    from torch.utils.data import Subset

    from ..data.sort_of_clevr import perturbed_dataset

    device = device if device is not None else next(model.parameters()).device
    perturbed = perturbed_dataset(test_dataset, seed=seed, per_question=1, limit=limit)
    sources = perturbed.source_indices
    before = predictions(model, Subset(test_dataset, sources.tolist()), batch_size, device, amp)
    after = predictions(model, perturbed, batch_size, device, amp)
    labels = np.asarray(perturbed.labels)
    return {"consistency": float((before == after).mean()),
            "perturbed_accuracy": float((after == labels).mean()),
            "perturbed_questions": int(len(perturbed))}


def time_call(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (synchronising CUDA around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return float(np.median(times))
