"""protozoo's pointing game and relevance mass agree with Quantus's ``PointingGame`` and
``RelevanceMassAccuracy`` (Hedström et al., JMLR 2023; checked against quantus 0.6) on the maps of
real explainers, wherever the two definitions coincide. Where they differ, by design:

* **tied peaks** -- protozoo scores the *share* of the maximal pixels on the part (so a uniform
  map scores exactly the part's share, its chance level, and ties never depend on pixel order),
  and counts pixels within 1e-5 of the map's largest magnitude as tied; Quantus scores a hit
  when *any* exactly-maximal pixel lies on the part (and refuses a uniform map).
* **negative values** -- protozoo's relevance mass is the share of the map's *positive* mass on
  the part (in [0, 1]); Quantus divides the signed sum on the part by the signed total (with
  ``abs=False``), which leaves [0, 1] for signed maps.

Both are run without Quantus's normalisation or absolute value (``normalise=False``,
``abs=False``), so both see the same maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protozoo
from protozoo.explain import explain
from protozoo.metrics import pointing, relevance_mass

quantus = pytest.importorskip("quantus")

S = 32


def _quantus(metric, maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    n = len(maps)
    scores = metric(abs=False, normalise=False, disable_warnings=True)(
        model=None, x_batch=np.zeros((n, 3, S, S), np.float32), y_batch=np.zeros(n, np.int64),
        a_batch=maps[:, None].numpy().astype(np.float64),
        s_batch=masks[:, None].numpy().astype(np.float32), channel_first=True)
    return np.asarray(scores, dtype=np.float64)


def _masks(n: int) -> torch.Tensor:
    """A part (a 6x6 square) at a different place in every image."""
    masks = torch.zeros(n, S, S)
    for i in range(n):
        r, c = 3 + (5 * i) % 20, 4 + (7 * i) % 20
        masks[i, r:r + 6, c:c + 6] = 1
    return masks


@pytest.fixture(scope="module")
def maps():
    """Non-negative maps with a single peak: gradient and Guided Backprop maps of a small CAM
    network, random maps, and maps peaked on the part."""
    pytest.importorskip("captum")
    torch.manual_seed(0)
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=3).eval()
    x = torch.randn(6, 3, S, S, generator=torch.Generator().manual_seed(0))
    masks = _masks(6)
    peaked = torch.rand(6, S, S, generator=torch.Generator().manual_seed(1)) * 0.1
    peaked[masks > 0] += torch.linspace(0.2, 0.9, int(masks.sum()))
    out = torch.cat([explain(model, x, "gradient"), explain(model, x, "guided_backprop"),
                     torch.rand(6, S, S, generator=torch.Generator().manual_seed(2)), peaked])
    return out.double(), masks.repeat(4, 1, 1).double()


def test_pointing_agrees_with_quantus_on_maps_with_one_peak(maps):
    m, masks = maps
    ours = pointing(m, masks).numpy()
    assert set(np.unique(ours)) <= {0.0, 1.0}  # single peaks: hit or miss
    np.testing.assert_array_equal(ours, _quantus(quantus.PointingGame, m, masks))
    assert 0 < ours.mean() < 1  # both hits and misses were compared


def test_relevance_mass_agrees_with_quantus_on_non_negative_maps(maps):
    m, masks = maps
    np.testing.assert_allclose(relevance_mass(m, masks).numpy(),
                               _quantus(quantus.RelevanceMassAccuracy, m, masks), rtol=1e-6)


def test_the_stated_differences():
    masks = _masks(1).double()
    # two tied peaks, one on the part: protozoo scores the share on the part, Quantus a hit
    # (Quantus refuses a uniform map, which protozoo scores at its chance level)
    tied = torch.zeros(1, S, S, dtype=torch.float64)
    on = masks[0].nonzero()[0]
    tied[0, on[0], on[1]] = tied[0, S - 1, S - 1] = 1.0
    assert float(pointing(tied, masks)) == 0.5
    assert _quantus(quantus.PointingGame, tied, masks)[0] == 1.0
    # a signed map: protozoo's share of the positive mass stays in [0, 1], Quantus's ratio not
    signed = torch.zeros(1, S, S, dtype=torch.float64)
    signed[masks > 0] = 1.0
    signed[0, 0, :] = -2.0
    assert float(relevance_mass(signed, masks)) == 1.0
    assert _quantus(quantus.RelevanceMassAccuracy, signed, masks)[0] == pytest.approx(
        36 / (36 - 2 * S))
