"""Boxes from maps: the batched percentile box agrees with the per-map numpy definition."""
import numpy as np
import torch

from protozoo.maps import peak_region_box, percentile_box, percentile_boxes


def test_percentile_boxes_match_numpy_percentile_rule():
    torch.manual_seed(0)
    maps = torch.nn.functional.interpolate(torch.rand(12, 1, 8, 8), size=(64, 64),
                                           mode="bilinear")[:, 0]
    maps = torch.cat([maps, torch.randn(5, 64, 64), torch.zeros(1, 64, 64)])
    expected = [list(percentile_box(m.numpy(), 95.0)) for m in maps]
    assert percentile_boxes(maps, 95.0).tolist() == expected


def test_percentile_box_by_hand():
    heat = np.zeros((10, 10))
    heat[2:4, 5:8] = 1.0  # 6 of 100 pixels: above the 95th percentile, nothing else is
    assert percentile_box(heat, 95.0) == (5, 2, 8, 4)
    assert percentile_boxes(torch.tensor(heat)[None], 95.0).tolist() == [[5, 2, 8, 4]]


def test_peak_region_box_keeps_only_the_region_around_the_peak():
    heat = np.random.default_rng(0).uniform(0.0, 0.1, (20, 20))  # 400 px: 20 above the 95th
    heat[2:5, 3:7] = 1.0  # the peak's region, 12 pixels
    heat[3, 4] = 2.0
    heat[15:17, 13:16] = 0.9  # a second region above the percentile, 6 pixels
    heat[9, 9] = heat[12, 1] = 0.8  # and two lone pixels
    assert percentile_box(heat, 95.0) == (1, 2, 16, 17)  # Chen et al.: spans all of them
    assert peak_region_box(heat, 95.0) == (3, 2, 7, 5)
    heat[9, 9] = 0.0
    heat[5, 7] = 0.95  # touching diagonally: 8-connected, part of the peak's region
    assert peak_region_box(heat, 95.0) == (3, 2, 8, 6)
    assert peak_region_box(np.ones((6, 8)), 95.0) == (0, 0, 8, 6)  # constant: the whole image
