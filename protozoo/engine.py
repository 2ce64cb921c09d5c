"""The one training loop: phases, mixed precision, DDP, checkpoints every epoch, resume, logs.

Every family trains through :class:`Trainer`. A model supplies its phases (``model.phases(cfg)``,
data from :class:`protozoo.config.Phase`), its loss terms (``model.objective``) and its actions
(``model.actions()``, e.g. a prototype push between phases); the loop itself knows no family
and no dataset: it asks the model, and a training set that defines ``groups`` is batched by
group (:func:`training_sampler`).

Files written in the run directory (by one process only under ``torchrun``):
``train_config.json`` (resolved config), ``log.jsonl`` (one record per epoch or action),
``curves.png`` (at most every :data:`CURVES_EVERY_S` seconds, and at the end),
``model.safetensors`` + ``config.json`` (the model, every epoch) and ``train_state.pt``
(optimiser, counters and model state in one atomic file, for ``--resume``).
A run killed mid-epoch resumes from its last completed epoch; the sampler order and augmentation of
every epoch are seeded from ``(seed, epoch)`` so a resumed run repeats the epochs it lost exactly.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint
from .config import Phase, TrainConfig
from .errors import UserError
from .fileio import atomic_path, atomic_write_text
# re-exported: the device and inference helpers lived here before protozoo.runtime
from .runtime import (DistInfo, all_reduce_sums, autocast_for, iterate,  # noqa: F401
                      resolve_device, setup_distributed, shard, to_device)

STATE = "train_state.pt"
LOG = "log.jsonl"
# curves.png is redrawn at most this often (and when the run ends): drawing it takes about a
# second on a CPU, which on a short run of small epochs was half the training time
CURVES_EVERY_S = 30.0

# ----------------------------------------------------------------------------- epoch sums

def _new_sums(dist: DistInfo) -> dict[str, torch.Tensor]:
    return defaultdict(lambda: torch.zeros((), device=dist.device))


def _accumulate(sums: dict, terms: dict, output, batch: dict) -> None:
    """Add one batch's loss terms (weighted by its size), correct count and size to ``sums``;
    stays on the device (no ``.item()`` sync per step)."""
    n = len(batch["label"])
    for name, value in terms.items():
        sums[name] += value.detach().float() * n
    sums["correct"] += (output.logits.argmax(1) == batch["label"]).sum()
    sums["count"] += n


def _averages(sums: dict, dist: DistInfo) -> dict[str, float]:
    """Accuracy and mean loss terms from ``_accumulate``'s sums, reduced across processes."""
    totals = all_reduce_sums(sums, dist)
    count = max(totals.pop("count", 0.0), 1.0)
    metrics = {"accuracy": totals.pop("correct", 0.0) / count}
    metrics.update({k: v / count for k, v in totals.items()})
    return metrics


def evaluate_loss_accuracy(model, dataset: Dataset, cfg: TrainConfig, dist: DistInfo,
                           loss_weights: dict | None = None) -> dict[str, float]:
    """Accuracy and loss terms over ``dataset``, reduced across processes."""
    sums = _new_sums(dist)
    for batch, output in iterate(model, shard(dataset, dist), cfg.batch_size, dist.device,
                                 cfg.amp, cfg.workers):
        _accumulate(sums, model.objective(output, batch, **(loss_weights or {})), output, batch)
    return _averages(sums, dist)


# ----------------------------------------------------------------------------- the trainer

@dataclass
class ActionContext:
    """What a phase action (e.g. push) may use: the data, the device, an evaluator."""

    model: torch.nn.Module
    data: object  # protozoo.data.DataBundle
    cfg: TrainConfig
    dist: DistInfo
    run_dir: Path | None
    evaluate: Callable[[Dataset], dict]


class Trainer:
    def __init__(self, cfg: TrainConfig, model, data, run_dir: Path | None, dist: DistInfo):
        self.cfg, self.model, self.data, self.dist = cfg, model.to(dist.device), data, dist
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.phases = model.phases(cfg)
        self.log_records: list[dict] = []
        self._plotted = time.monotonic()

    # -- files (main process only)
    def _write(self) -> bool:
        return self.run_dir is not None and self.dist.is_main

    def _log(self, record: dict) -> None:
        self.log_records.append(record)
        if self._write():
            with open(self.run_dir / LOG, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if time.monotonic() - self._plotted >= CURVES_EVERY_S:
                self._plot()
        summary = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if k != "time")
        if self.dist.is_main:
            print(summary, flush=True)

    def _plot(self) -> None:
        if self._write():
            from .render.curves import plot_curves

            plot_curves(self.log_records, self.run_dir / "curves.png")
        self._plotted = time.monotonic()

    def _checkpoint(self, position: dict, optimizer=None, scaler=None) -> None:
        if not self._write():
            return
        checkpoint.save(self.model, self.run_dir, image_size=self.data.image_size)
        state = {
            "position": position,
            "model_name": self.model.model_name,
            "model_config": json.dumps(self.model.config()),
            "metadata": json.dumps(self.model.metadata),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "log": json.dumps(self.log_records),
        }
        with atomic_path(self.run_dir / STATE) as tmp:
            torch.save(state, tmp)

    # -- the loop
    def fit(self, resume: dict | None = None) -> list[dict]:
        position = resume["position"] if resume else {"phase": 0, "epoch": 0, "global_epoch": 0}
        if resume:
            self.log_records = json.loads(resume["log"])
            if self._write():  # drop log lines written after the state we resume from
                atomic_write_text(self.run_dir / LOG,
                                  "".join(json.dumps(r) + "\n" for r in self.log_records))
        global_epoch = position["global_epoch"]
        for index in range(position["phase"], len(self.phases)):
            phase = self.phases[index]
            resuming_here = resume is not None and index == position["phase"]
            if phase.action:
                self._run_action(phase, index, global_epoch)
            else:
                global_epoch = self._run_phase(
                    phase, index, position["epoch"] if resuming_here else 0, global_epoch,
                    resume.get("optimizer") if resuming_here else None,
                    resume.get("scaler") if resuming_here else None)
        self._checkpoint({"phase": len(self.phases), "epoch": 0, "global_epoch": global_epoch,
                          "finished": True})
        self._plot()
        return self.log_records

    def _run_action(self, phase: Phase, index: int, global_epoch: int) -> None:
        actions = self.model.actions()
        if phase.action not in actions:
            raise ValueError(f"model '{self.model.model_name}' has no action '{phase.action}'")
        context = ActionContext(self.model, self.data, self.cfg, self.dist, self.run_dir,
                                lambda ds: evaluate_loss_accuracy(self.model, ds, self.cfg,
                                                                  self.dist))
        start = time.time()
        result = actions[phase.action](context) or {}
        self._log({"phase": phase.name, "epoch": global_epoch, **result,
                   "time": round(time.time() - start, 2)})
        self._checkpoint({"phase": index + 1, "epoch": 0, "global_epoch": global_epoch})

    def _set_trainable(self, phase: Phase) -> list[dict]:
        groups = self.model.param_groups()
        unknown = set(phase.lrs) - set(groups)
        if unknown:
            raise ValueError(f"phase '{phase.name}' names unknown parameter groups {unknown}")
        for params in groups.values():
            for p in params:
                p.requires_grad_(False)
        param_groups = []
        for name, lr in phase.lrs.items():
            for p in groups[name]:
                p.requires_grad_(True)
            param_groups.append({"params": groups[name], "lr": lr, "base_lr": lr, "name": name})
        return param_groups

    def _run_phase(self, phase, index, start, global_epoch, opt_state, scaler_state) -> int:
        """Train ``phase`` from its epoch ``start``; returns the global epoch count after it."""
        param_groups = self._set_trainable(phase)
        calibrate_frozen_norms(self.model, self.data.push, self.cfg.batch_size, self.dist.device,
                               self.cfg.amp)  # the training items without augmentation
        optimizer = torch.optim.Adam(param_groups, weight_decay=phase.weight_decay)
        autocast, amp_dtype = autocast_for(self.dist.device, self.cfg.amp)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        sampler = training_sampler(self.data.train, self.dist.world, self.dist.rank,
                                   self.cfg.seed)
        loader = DataLoader(self.data.train, batch_size=self.cfg.batch_size, sampler=sampler,
                            num_workers=self.cfg.workers, drop_last=False,
                            pin_memory=self.dist.device.type == "cuda")
        for epoch in range(start, phase.epochs):
            for group in optimizer.param_groups:
                group["lr"] = _scheduled_lr(group["base_lr"], phase, epoch)
            started = time.time()
            train = self._train_epoch(net, loader, sampler, optimizer, scaler, autocast, phase,
                                      global_epoch)
            val = evaluate_loss_accuracy(self.model, self.data.val, self.cfg, self.dist,
                                         phase.loss_weights)
            global_epoch += 1
            record = {"phase": phase.name, "epoch": global_epoch,
                      **{f"train/{k}": v for k, v in train.items()},
                      **{f"val/{k}": v for k, v in val.items()},
                      "lr": optimizer.param_groups[0]["lr"], "time": round(time.time() - started, 2)}
            self._log(record)
            self._checkpoint({"phase": index, "epoch": epoch + 1, "global_epoch": global_epoch},
                             optimizer, scaler)
        return global_epoch

    def _train_epoch(self, net, loader, sampler, optimizer, scaler, autocast, phase, global_epoch):
        from tqdm import tqdm

        sampler.set_epoch(global_epoch)
        torch.manual_seed(self.cfg.seed * 100003 + global_epoch)  # augmentation of this epoch
        train_unfrozen(self.model)
        sums = _new_sums(self.dist)
        bar = tqdm(loader, desc=f"{phase.name} epoch {global_epoch + 1}", leave=False,
                   disable=None if self.dist.is_main else True)
        for batch in bar:
            batch = to_device(batch, self.dist.device)
            with autocast:
                output = net(*self.model.inputs(batch))
                terms = self.model.objective(output, batch, **phase.loss_weights)
            optimizer.zero_grad(set_to_none=True)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} in phase '{phase.name}'; "
                                         "lower --lr or use --amp off")
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            _accumulate(sums, terms, output, batch)
        return _averages(sums, self.dist)


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest submodules all of whose parameters are frozen (and that have some)."""
    found = []

    def visit(module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def train_unfrozen(model: torch.nn.Module) -> None:
    """Training mode for what the phase trains, eval mode for what it freezes
    (:func:`frozen_modules`): their BatchNorm statistics stay fixed and their dropout is off.
    Switching gradients off alone would let BatchNorm's running statistics drift in a "frozen"
    backbone -- after a prototype push that moves the features under the prototypes, which then
    no longer *are* their source patches."""
    model.train()
    for module in frozen_modules(model):
        module.eval()


def _unfitted_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """BatchNorm layers of frozen modules whose statistics were never estimated (still exactly
    mean 0, variance 1, as constructed)."""
    return [m for frozen in frozen_modules(model) for m in frozen.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())]


@torch.no_grad()
def calibrate_frozen_norms(model, dataset: Dataset, batch_size: int, device: torch.device,
                           amp: str = "auto") -> int:
    """Estimate the statistics of frozen BatchNorm layers that never saw data, once, over
    ``dataset`` in order (the same on every process), then keep them fixed. A backbone trained
    from scratch is frozen during a prototype warm-up: in eval mode with its initial statistics
    its features would be unnormalised, and the first phase that trains it (batch statistics)
    would then see other features than the prototypes were fitted to. Returns how many layers
    were calibrated."""
    norms = _unfitted_norms(model)
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the whole pass
        m.train()
    autocast, _ = autocast_for(device, amp)
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            batch = to_device(batch, device)
            with autocast:
                model(*model.inputs(batch))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


class GroupedSampler(Sampler[int]):
    """A shuffled order in which the items of a group (e.g. the questions about one image) stay
    together.

    Every epoch the groups are shuffled and so are the items inside each group; consecutive
    items therefore share groups, so a batch holds a few whole groups (a model can then compute
    what the items of a group share once per batch, e.g. one CNN pass per image). Under DDP
    the order is cut into ``num_replicas`` equal contiguous parts (the last wraps around, as
    :class:`DistributedSampler` pads), so every rank runs the same number of batches. Seeded by
    ``(seed, epoch)``: a resumed run repeats the order of the epoch it restarts."""

    def __init__(self, groups, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.groups = np.asarray(groups).reshape(-1)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = -(-len(self.groups) // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        item_order = rng.permutation(len(self.groups))  # shuffles the items inside each group
        group_rank = rng.permutation(int(self.groups.max()) + 1 if len(self.groups) else 0)
        order = item_order[np.argsort(group_rank[self.groups[item_order]], kind="stable")]
        total = self.per_rank * self.num_replicas
        order = np.resize(order, total)  # wraps around to pad, like DistributedSampler
        mine = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return iter(mine.tolist())


def training_sampler(dataset: Dataset, world: int, rank: int, seed: int) -> Sampler:
    """:class:`GroupedSampler` over ``dataset.groups`` when the dataset defines it (one integer
    per item; items with the same value are batched together, see :mod:`protozoo.data.base`),
    else a shuffling :class:`DistributedSampler`."""
    groups = getattr(dataset, "groups", None)
    if groups is not None and len(groups):
        return GroupedSampler(groups, world, rank, seed)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


def _scheduled_lr(base: float, phase: Phase, epoch: int) -> float:
    """The phase's learning rate at ``epoch``: constant, cosine, or ``step:SIZE:GAMMA``."""
    if phase.schedule == "cosine" and phase.epochs > 1:
        return base * 0.5 * (1 + math.cos(math.pi * epoch / phase.epochs))
    if phase.schedule.startswith("step:"):
        _, size, gamma = phase.schedule.split(":")
        return base * float(gamma) ** (epoch // int(size))
    return base


def read_resume_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {STATE} to resume from (it was killed before its "
                        "first epoch ended); start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, overwritten, or not a torch file at all
        raise UserError(f"'{path}' is not a readable torch file: the resume state is damaged; "
                        "evaluate the last saved model with evaluate.py, or start again "
                        "without --resume") from None
    if not isinstance(state, dict) or "model_name" not in state:
        raise UserError(f"'{path}' is not a train.py resume state; start again without --resume")
    return state
