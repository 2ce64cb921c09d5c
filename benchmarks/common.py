"""Shared pieces of the benchmark scripts: the run header, device sync, and the official
three-convolution distance used as a reference."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import protozoo
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import protozoo


def header(title: str, device: torch.device) -> None:
    print(f"== {title}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                name = next(line.split(":", 1)[1].strip() for line in handle
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        cuda = "no CUDA"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"device: {device} ({name}); torch {torch.__version__} ({cuda}); "
          f"protozoo {protozoo.__version__}; python {platform.python_version()}")
    print(f"threads: torch {torch.get_num_threads()} / cpu_count {os.cpu_count()}; "
          f"load average (1/5/15 min): {load}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def three_conv_distances(features: torch.Tensor, prototypes: torch.Tensor,
                         ones: torch.Tensor) -> torch.Tensor:
    """The official ProtoPNet ``_l2_convolution``: ``relu(||x||^2 - 2 x.p + ||p||^2)``.

    ``x.p`` is a 1x1 convolution with the prototypes as the kernel; ``||x||^2`` is a 1x1
    convolution of ``x**2`` with a ones-kernel of shape ``[P, D, 1, 1]`` (one output channel per
    prototype, as the official code); the result is clamped with ReLU. Written like the official
    code, it runs in whatever precision autocast gives the convolutions.

    features ``[B, D, h, w]``, prototypes ``[P, D]``, ones ``[P, D, 1, 1]`` -> ``[B, P, h, w]``.
    """
    p = prototypes.view(prototypes.shape[0], prototypes.shape[1], 1, 1)
    x2_patch_sum = F.conv2d(features ** 2, ones)
    p2 = (p ** 2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
    xp = F.conv2d(features, p)
    return F.relu(x2_patch_sum + (-2 * xp + p2))
