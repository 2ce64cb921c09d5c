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


class _FeatureImages(torch.utils.data.Dataset):
    """'Images' that are their own 2-channel 4x4 feature maps: background (0, 0) everywhere
    but one part cell per image, (1, 0) in class 0 and (0, 1) in class 1, at a different cell
    in every image."""

    def __init__(self, per_class: int = 6):
        self.labels = [0] * per_class + [1] * per_class
        self.images = torch.zeros(len(self.labels), 2, 4, 4)
        self.part_cells = []
        for n, label in enumerate(self.labels):
            r, c = divmod((5 * n) % 16, 4)
            self.images[n, label, r, c] = 1.0
            self.part_cells.append((r, c))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class _Passthrough(torch.nn.Module):
    def __init__(self, geometry):
        super().__init__()
        self.geometry = geometry

    def forward(self, x):
        return x


def _feature_model(prototypes):
    """A ProtoPNet whose features are its input (:class:`_FeatureImages`), with these
    prototypes, half of each class in order."""
    prototypes = torch.tensor(prototypes)
    model = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=2,
                                  prototypes_per_class=len(prototypes) // 2,
                                  prototype_dim=2).eval()
    model.backbone = _Passthrough(model.backbone.geometry)
    model.add_on = torch.nn.Identity()
    model.metadata["image_size"] = 4
    with torch.no_grad():
        model.prototypes.copy_(prototypes)
    return model


def test_push_moves_a_class_agnostic_projection_to_a_class_specific_patch():
    from protozoo.models.protopnet.push import compute_push
    data = _FeatureImages()
    # class 0's prototype sits on the background; class 1's on its part
    model = _feature_model([[0.01, 0.0], [0.0, 0.9]])
    nearest = compute_push(model, data, batch_size=4, class_specific=False)
    # the nearest own-class patch of prototype 0 is background, which every image has
    assert nearest.vectors[0].tolist() == [0.0, 0.0]
    assert nearest.provenance[0]["projection"] == "nearest"

    result = compute_push(model, data, batch_size=4)
    assert result.moved.tolist() == [True, False]
    record = result.provenance[0]
    assert record["projection"] == "class-specific"
    assert record["nearest_patch_specificity"] == 0.5  # every image alike
    assert data.labels[record["image_index"]] == 0
    assert tuple(record["cell"]) == data.part_cells[record["image_index"]]
    assert result.vectors[0].tolist() == [1.0, 0.0]  # it *is* the part patch
    assert record["source_similarity"] == pytest.approx(float(result.similarity_maps[0].max()))
    # moved by the squared distance from the old vector to the new patch
    assert float(result.distances[0]) == pytest.approx(0.99 ** 2)
    # prototype 1 was already specific: its nearest patch, untouched
    assert result.provenance[1]["projection"] == "nearest"
    assert result.vectors[1].tolist() == [0.0, 1.0]
    assert result.provenance[1]["nearest_patch_specificity"] == 1.0


def test_class_specific_patches_come_from_distinct_images():
    from protozoo.models.protopnet.push import compute_push
    data = _FeatureImages()
    # both of class 0's prototypes on the background
    model = _feature_model([[0.01, 0.0], [0.0, 0.01], [0.0, 0.9], [0.0, 0.8]])
    result = compute_push(model, data, batch_size=4)
    assert result.moved.tolist() == [True, True, False, False]
    images = [r["image_index"] for r in result.provenance]
    assert images[0] != images[1] and images[2] != images[3]
    assert result.vectors[:2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # without the rule both stay on background patches
    nearest = compute_push(model, data, batch_size=4, class_specific=False)
    assert nearest.vectors[:2].abs().sum() == 0
