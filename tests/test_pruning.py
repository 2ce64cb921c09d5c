"""ProtoPNet pruning by hand: Chen et al.'s k-nearest rule with ties shared instead of broken by
dataset order, class specificity (AUC), and a class never losing all its prototypes."""
from __future__ import annotations

import pytest
import torch

import protozoo
from protozoo.models.protopnet.prune import assess_prototypes, class_specificity, expected_own_among_nearest


def test_chen_rule_counts_own_class_images_among_the_k_nearest():
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    own = torch.tensor([[True, False, True, True, False, False, True, True]])
    # the 6 nearest are images 0-5: three of them own-class
    assert float(expected_own_among_nearest(d, own, k=6)) == 3.0
    assert float(expected_own_among_nearest(d, own, k=2)) == 1.0


def test_ties_share_the_places_instead_of_dataset_order():
    # a border prototype: every image matches it alike; the first images (one class, as a
    # class-sorted folder lists them) would win every tie if ties were broken by order
    d = torch.full((1, 10), 1e-5)
    own = torch.tensor([[True, True, True, True, False, False, False, False, False, False]])
    torch.testing.assert_close(expected_own_among_nearest(d, own, k=6),
                               torch.tensor([6 * 4 / 10], dtype=torch.float64))
    # two images clearly nearer (own, other), then a four-way tie for the last four places
    d = torch.tensor([[0.01, 0.02, 0.5, 0.5, 0.5, 0.5, 0.9]])
    own = torch.tensor([[True, False, True, True, False, False, True]])
    torch.testing.assert_close(expected_own_among_nearest(d, own, k=6),
                               torch.tensor([1 + 4 * 2 / 4], dtype=torch.float64))


def test_class_specificity_is_the_auc_of_own_class_against_the_rest():
    own = torch.tensor([[True, True, False, False]] * 3)
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4],   # own images nearest: 1
                      [0.3, 0.4, 0.1, 0.2],   # other images nearest: 0
                      [0.1, 0.3, 0.2, 0.4]])  # 3 of 4 pairs right: 0.75
    torch.testing.assert_close(class_specificity(d, own),
                               torch.tensor([1.0, 0.0, 0.75], dtype=torch.float64))
    flat = torch.full((1, 4), 0.5)  # matches every image alike: 0.5
    assert float(class_specificity(flat, own[:1])) == 0.5


class _Push(torch.utils.data.Dataset):
    """Four images, two per class; each image one solid colour."""

    labels = [0, 0, 1, 1]

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(4, 3, 16, 16, generator=g)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def test_a_class_keeps_its_most_specific_prototype():
    torch.manual_seed(0)
    model = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=2,
                                  prototypes_per_class=2, prototype_dim=8).eval()
    verdict = assess_prototypes(model, _Push(), k=2, tau=3)  # tau > k: the rule fails them all
    assert verdict["prune"].tolist().count(False) == 2  # one survivor per class
    for c in (0, 1):
        mine = (model.prototype_class == c).nonzero().flatten()
        kept = mine[~verdict["prune"][mine]]
        assert len(kept) == 1
        assert float(verdict["specificity"][kept]) == float(verdict["specificity"][mine].max())
