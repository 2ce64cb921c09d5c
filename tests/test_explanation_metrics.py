"""Explanation metrics are honest: maps that carry no information (a whole-image box, a uniform
map, a random map) score at their chance level, a map peaked on the part scores 1 and one peaked
off it 0 -- on masks of two different shapes (a small blob and a thin bar)."""
from __future__ import annotations

import pytest
import torch

from protozoo.maps import upsample
from protozoo.metrics import (
    cam_metrics, map_scores, part_share, peak_pixels, pointing, region_chance, region_fractions,
    region_on_part, region_side, relevance_mass,
)

S = 32


def _masks() -> torch.Tensor:
    """Two parts: an 6x6 square and a 2x20 bar, ``[2, S, S]``."""
    masks = torch.zeros(2, S, S)
    masks[0, 10:16, 20:26] = 1
    masks[1, 5:7, 4:24] = 1
    return masks


def _peaked(rows, cols) -> torch.Tensor:
    """Maps with a single bump at ``(rows[b], cols[b])`` on a low, noisy floor."""
    g = torch.Generator().manual_seed(0)
    maps = 0.1 * torch.rand(len(rows), S, S, generator=g)
    for b, (r, c) in enumerate(zip(rows, cols)):
        maps[b, r, c] = 5.0
    return maps


def test_chance_levels_by_hand():
    masks = _masks()
    torch.testing.assert_close(part_share(masks), torch.tensor([36 / 1024, 40 / 1024]))
    # 3x3 regions: a pixel's region covers (rows on the part) x (cols on the part) / 9; summed
    # over all pixels every part pixel is counted 9 times, so the mean is the part's share again
    # except where regions leave the image (none here: both parts are 2+ px from the border)
    torch.testing.assert_close(region_chance(masks, 3), part_share(masks))
    frac = region_fractions(masks, 3)
    assert float(frac[0, 12, 22]) == 1.0 and float(frac[0, 10, 20]) == pytest.approx(4 / 9)
    assert float(frac[1, 5, 10]) == pytest.approx(6 / 9)  # the bar is only 2 rows high


def test_region_side_is_odd_and_scales_with_the_image():
    assert [region_side(s) for s in (16, 32, 64, 224)] == [3, 3, 5, 15]
    with pytest.raises(ValueError, match="odd"):
        region_fractions(_masks(), 4)


@pytest.mark.parametrize("name", ["whole-image box", "uniform", "constant zero"])
def test_maps_that_say_nothing_score_exactly_chance(name):
    masks = _masks()
    value = {"whole-image box": 1.0, "uniform": 0.37, "constant zero": 0.0}[name]
    maps = torch.full((2, S, S), value)
    scores = map_scores(maps, masks, 5)
    for metric in ("pointing", "region_on_part", "relevance_mass"):
        torch.testing.assert_close(scores[metric], scores[metric + "_chance"])
    assert bool(peak_pixels(maps).all())  # every pixel ties for the peak


def test_a_bicubically_upsampled_uniform_map_still_scores_chance():
    masks = _masks()
    up = upsample(torch.full((2, 1, 8, 8), 9.21), (S, S), "bicubic")[:, 0]
    torch.testing.assert_close(pointing(up, masks), part_share(masks))


def test_random_maps_score_chance_on_average():
    g = torch.Generator().manual_seed(1)
    masks = _masks().repeat(200, 1, 1)
    maps = torch.rand(len(masks), S, S, generator=g)
    share = float(part_share(masks).mean())
    assert float(pointing(maps, masks).mean()) == pytest.approx(share, abs=0.02)
    assert float(region_on_part(maps, masks, 5).mean()) == pytest.approx(
        float(region_chance(masks, 5).mean()), abs=0.02)
    assert float(relevance_mass(maps, masks).mean()) == pytest.approx(share, abs=0.003)


def test_a_peak_on_the_part_scores_one_and_off_the_part_zero():
    masks = _masks()
    on = _peaked([12, 5], [22, 10])
    off = _peaked([28, 28], [2, 30])
    torch.testing.assert_close(pointing(on, masks), torch.ones(2))
    torch.testing.assert_close(pointing(off, masks), torch.zeros(2))
    torch.testing.assert_close(region_on_part(off, masks, 3), torch.zeros(2))
    # the 3x3 region around (12, 22) lies wholly on the square; the bar is 2 rows high, so a
    # region there can only hold 6 of its 9 pixels on the part
    torch.testing.assert_close(region_on_part(on, masks, 3), torch.tensor([1.0, 6 / 9]))


def test_relevance_mass_by_hand():
    masks = _masks()[:1]
    maps = torch.zeros(1, S, S)
    maps[0, 12, 22] = 3.0  # on the part
    maps[0, 0, 0] = 1.0  # off the part
    maps[0, 31, 31] = -5.0  # negative evidence is not mass
    torch.testing.assert_close(relevance_mass(maps, masks), torch.tensor([0.75]))


def test_tied_peaks_share_the_score():
    masks = _masks()[:1]
    maps = torch.zeros(1, S, S)
    maps[0, 12, 22] = 1.0  # on the part
    maps[0, 30, 30] = 1.0  # an equal peak off it
    torch.testing.assert_close(pointing(maps, masks), torch.tensor([0.5]))


def test_cam_metrics_controls_and_chance_keys():
    masks = _masks()[:, None]
    boxes = torch.tensor([[8, 2, 28, 20], [2, 2, 26, 10]])
    labels = torch.tensor([0, 1])
    uniform = torch.ones(2, 2, 4, 4)  # 8 px cells, upsampled to 32 px
    out = cam_metrics(uniform, labels, labels, (S, S), masks, boxes)
    for metric in ("pointing", "region_on_part", "relevance_mass", "cam_iou",
                   "localization_accuracy"):
        torch.testing.assert_close(out[metric], out[metric + "_chance"])
    peaked = torch.zeros(2, 2, 32, 32)  # cells of 1 px: the true class peaks on its part
    peaked[0, 0, 12, 22] = 1.0
    peaked[1, 1, 5, 10] = 1.0
    out = cam_metrics(peaked, labels, labels, (S, S), masks, boxes)
    torch.testing.assert_close(out["pointing"], torch.ones(2))
    torch.testing.assert_close(out["relevance_mass"], torch.ones(2))
