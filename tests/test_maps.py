"""Boxes from maps: the batched percentile box agrees with the per-map numpy definition."""
import numpy as np
import torch

from protozoo.maps import percentile_box, percentile_boxes


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
