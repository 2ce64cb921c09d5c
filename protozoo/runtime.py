"""Where and how code runs: devices, processes, mixed precision, and batched inference.

A leaf of the package (DESIGN.md, "Layering"): the training loop (:mod:`protozoo.engine`), the
evaluation, checkpoint loading and the families' own algorithms (push, probes, NIWT's fit) all
run models through these helpers, so none of them needs to import the engine.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import UserError


@dataclass
class DistInfo:
    """This process's place in a (possibly one-process) run and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when there is a GPU, else CPU) or a device name; one-line errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA GPU is available; use --device cpu")
    return device


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return DistInfo(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return DistInfo(rank, world, device)


def autocast_for(device: torch.device, amp: str):
    """The autocast context for ``--amp``: auto = bf16 (or fp16) on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext(), None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("bf16", "fp16"):
        raise UserError(f"unknown --amp '{amp}'; use auto, off, bf16 or fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), dtype


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- inference helpers

def shard(dataset: Dataset, dist: DistInfo) -> Dataset:
    """This process's share of ``dataset`` (disjoint, no padding, so sums are exact)."""
    if not dist.enabled:
        return dataset
    return Subset(dataset, list(range(dist.rank, len(dataset), dist.world)))


def iterate(model, dataset: Dataset, batch_size: int, device: torch.device,
            amp: str = "auto", workers: int = 0):
    """Yield ``(batch, output)`` for ``dataset`` in order, in eval mode without gradients."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    autocast, _ = autocast_for(device, amp)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                with autocast:
                    output = model(*model.inputs(batch))
                yield batch, output
    finally:
        model.train(was_training)


def all_reduce_sums(sums: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, float]:
    """Scalar ``sums`` added over all processes (float64), as plain floats."""
    keys = sorted(sums)
    if not keys:
        return {}
    packed = torch.stack([sums[k].detach().double().reshape(()) for k in keys])
    if dist.enabled:
        packed = packed.to(dist.device)
        torch_dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))
