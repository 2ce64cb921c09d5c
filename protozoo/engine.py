"""The one training loop: phases, mixed precision, DDP, checkpoints, resume, logs.

Every family trains through :class:`Trainer`. A model supplies its phases (``model.phases(cfg)``,
data from :class:`protozoo.config.Phase`), its loss terms (``model.objective``), its step tasks
(``model.tasks()``: the data and loss of a step phase, e.g. a backbone pretrained on another
objective first) and its actions (``model.actions()``, e.g. a prototype push between phases);
the loop itself knows no family and no dataset: it asks the model, and a training set that
defines ``groups`` is batched by group (:func:`training_sampler`).

Epoch phases and step phases share one set-up (:meth:`Trainer._optimiser`: Adam over the groups
the phase trains, the autocast of ``--amp``, a gradient scaler for fp16), one optimiser step
(:meth:`Trainer._optimise`: a finite-loss check, the scaled backward), one DDP wrapping
(:meth:`Trainer._parallel`), one checkpoint format and one resume. A step task is any object with

* ``train_set(data)`` -- the dataset its batches are drawn from (with replacement,
  :class:`StepBatches`);
* ``val_set(data)`` -- the dataset its last record is validated on, or None;
* ``terms(model, batch)`` -- its loss terms for a batch on the device (``"loss"`` is optimised,
  the rest are logged), computed under autocast and, under ``torchrun``, inside DDP's forward;
* ``eval_batch_size`` -- the validation batch (None: the run's ``--batch-size``);

:class:`protozoo.models.base.StepTask` is the base class families derive from.

Not everything a family fits is an SGD phase: a fit with its own closed-form or optimisation
procedure on precomputed features runs as an action (its family documents where).

Files written in the run directory (by one process only under ``torchrun``):
``train_config.json`` (resolved config), ``log.jsonl`` (one record per epoch, block of steps
or action), ``curves.png`` (at most every :data:`CURVES_EVERY_S` seconds, and at the end),
``model.safetensors`` + ``config.json`` (the model, every epoch, block of steps or action) and
``train_state.pt`` (optimiser, counters and model state in one atomic file, for ``--resume``).
A run killed mid-epoch resumes from its last completed epoch; the sampler order and augmentation of
every epoch are seeded from ``(seed, epoch)`` so a resumed run repeats the epochs it lost exactly.
A step phase checkpoints every ``log_every`` steps and resumes from the last of them the same way:
its batches are one seeded sequence (:class:`StepBatches`) that a resumed run skips into, its
learning rate a function of the step, and the augmentation of each block of steps is seeded from
``(seed, phase, step)``.
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
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint
from .config import Phase, TrainConfig
from .errors import UserError
from .fileio import atomic_path, atomic_write_text
from .runfolder import write_failed
# re-exported: the device and inference helpers lived here before protozoo.runtime
from .runtime import (DistInfo, all_reduce_sums, autocast_for, iterate,  # noqa: F401
                      resolve_device, setup_distributed, shard, to_device)

STATE = "train_state.pt"
LOG = "log.jsonl"
# curves.png is redrawn at most this often (and when the run ends): drawing it takes about a
# second on a CPU, which on a short run of small epochs was half the training time
CURVES_EVERY_S = 30.0

# ----------------------------------------------------------------------------- epoch sums

def _new_sums(dist: DistInfo, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return defaultdict(lambda: torch.zeros((), device=dist.device, dtype=dtype))


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
            try:
                with open(self.run_dir / LOG, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise write_failed(self.run_dir / LOG, exc) from None
            if time.monotonic() - self._plotted >= CURVES_EVERY_S:
                self._plot()
        summary = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if k != "time")
        if self.dist.is_main:
            print(summary, flush=True)

    def _plot(self) -> None:
        if self._write():
            from .render.curves import plot_curves

            try:
                plot_curves(self.log_records, self.run_dir / "curves.png")
            except OSError as exc:
                raise write_failed(self.run_dir / "curves.png", exc) from None
        self._plotted = time.monotonic()

    def _checkpoint(self, position: dict, optimizer=None, scaler=None) -> None:
        if not self._write():
            return
        try:
            checkpoint.save(self.model, self.run_dir, image_size=self.data.image_size)
        except UserError:
            raise
        except Exception as exc:  # a full disk: OSError, or safetensors' own error
            raise write_failed(self.run_dir / checkpoint.WEIGHTS, exc) from None
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
        try:
            with atomic_path(self.run_dir / STATE) as tmp:
                torch.save(state, tmp)
        except Exception as exc:  # torch's writer reports a full disk as a RuntimeError
            raise write_failed(self.run_dir / STATE, exc) from None

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
            elif phase.steps:
                self._run_steps(
                    phase, index, position.get("step", 0) if resuming_here else 0, global_epoch,
                    resume.get("optimizer") if resuming_here else None,
                    resume.get("scaler") if resuming_here else None)
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

    def _optimiser(self, phase: Phase, opt_state, scaler_state):
        """Adam over the groups ``phase`` trains (the others frozen), the autocast context of
        ``--amp`` and a gradient scaler for fp16, restored from a resume state when given."""
        optimizer = torch.optim.Adam(self._set_trainable(phase), weight_decay=phase.weight_decay)
        autocast, amp_dtype = autocast_for(self.dist.device, self.cfg.amp)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        return optimizer, autocast, scaler

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DDP under ``torchrun`` (gradients averaged across processes)."""
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    @staticmethod
    def _optimise(loss: torch.Tensor, optimizer, scaler, phase: Phase, where: str) -> None:
        """One optimiser step on ``loss`` (scaled for fp16), every phase's; ``where`` names the
        epoch or step for the message of a loss that is not finite."""
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} in phase '{phase.name}' "
                                   f"({where}): lower --lr or use --amp off")
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _run_phase(self, phase, index, start, global_epoch, opt_state, scaler_state) -> int:
        """Train ``phase`` from its epoch ``start``; returns the global epoch count after it."""
        if phase.task:
            raise ValueError(f"phase '{phase.name}' names task '{phase.task}' but no steps: a "
                             "task trains in a step phase (Phase.steps > 0)")
        optimizer, autocast, scaler = self._optimiser(phase, opt_state, scaler_state)
        calibrate_frozen_norms(self.model, self.data.push, self.cfg.batch_size, self.dist.device,
                               self.cfg.amp)  # the training items without augmentation
        net = self._parallel(self.model)
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
            self._optimise(terms["loss"], optimizer, scaler, phase, f"epoch {global_epoch + 1}")
            _accumulate(sums, terms, output, batch)
        return _averages(sums, self.dist)

    # -- step phases
    def _task(self, phase: Phase):
        tasks = self.model.tasks()
        if phase.task is None:
            raise ValueError(f"phase '{phase.name}' has {phase.steps} steps but no task: a step "
                             "phase trains a task of the model (Phase.task)")
        if phase.task not in tasks:
            raise ValueError(f"model '{self.model.model_name}' has no task '{phase.task}' "
                             f"(phase '{phase.name}')")
        return tasks[phase.task]

    def _run_steps(self, phase, index, start, global_epoch, opt_state, scaler_state) -> None:
        """Train step phase ``phase`` from its step ``start`` (see :class:`Phase`)."""
        if start >= phase.steps:
            return
        task = self._task(phase)
        train_set = task.train_set(self.data)
        optimizer, autocast, scaler = self._optimiser(phase, opt_state, scaler_state)
        calibrate_frozen_norms(self.model, train_set, self.cfg.batch_size, self.dist.device,
                               self.cfg.amp, forward=lambda batch: task.terms(self.model, batch))
        net = self._parallel(_TaskNet(self.model, task))
        batch_size = phase.batch_size or self.cfg.batch_size
        step = start
        for end in _block_ends(phase.steps, phase.log_every):
            if end <= start:
                continue
            started = time.time()
            # the block's augmentation (and data-loader workers' seeds) from (seed, phase, step)
            torch.manual_seed(self.cfg.seed * 100003 + 1000003 * (index + 1) + step)
            train_unfrozen(self.model)
            batches = StepBatches(len(train_set), phase.steps, batch_size, self.cfg.seed, step,
                                  end, self.dist.world, self.dist.rank)
            loader = DataLoader(train_set, batch_sampler=batches, num_workers=self.cfg.workers,
                                pin_memory=self.dist.device.type == "cuda")
            sums = _new_sums(self.dist, torch.float64)  # the mean of many small steps
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = _scheduled_lr(group["base_lr"], phase, step)
                batch = to_device(batch, self.dist.device)
                with autocast:
                    terms = net(batch)
                self._optimise(terms["loss"], optimizer, scaler, phase, f"step {step + 1}")
                for name, value in terms.items():
                    sums[name] += value.detach().double()
                sums["count"] += 1
                step += 1
            totals = all_reduce_sums(sums, self.dist)
            count = max(totals.pop("count", 0.0), 1.0)
            record = {"phase": phase.name, "epoch": global_epoch, "step": step,
                      **{f"train/{k}": v / count for k, v in totals.items()}}
            if step == phase.steps:
                record.update({f"val/{k}": v for k, v in self._validate(task).items()})
            record.update(lr=optimizer.param_groups[0]["lr"],
                          time=round(time.time() - started, 2))
            self._log(record)
            self._checkpoint({"phase": index, "epoch": 0, "step": step,
                              "global_epoch": global_epoch}, optimizer, scaler)

    @torch.no_grad()
    def _validate(self, task) -> dict[str, float]:
        """The task's mean terms over its validation set (weighted by batch size), in eval mode,
        reduced across processes; {} without one."""
        val = task.val_set(self.data)
        if val is None or not len(val):
            return {}
        autocast, _ = autocast_for(self.dist.device, self.cfg.amp)
        sums = _new_sums(self.dist, torch.float64)
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(shard(val, self.dist), num_workers=self.cfg.workers,
                            batch_size=getattr(task, "eval_batch_size", None)
                            or self.cfg.batch_size)
        for batch in loader:
            batch = to_device(batch, self.dist.device)
            n = next(len(v) for v in batch.values() if torch.is_tensor(v))
            with autocast:
                terms = task.terms(self.model, batch)
            for name, value in terms.items():
                sums[name] += value.detach().double() * n
            sums["count"] += n
        self.model.train(was_training)
        totals = all_reduce_sums(sums, self.dist)
        count = max(totals.pop("count", 0.0), 1.0)
        return {k: v / count for k, v in totals.items()}


class _TaskNet(torch.nn.Module):
    """A step task's loss terms as the forward of a module holding the model, so that DDP
    (which syncs gradients only through its own forward) wraps the task like a model."""

    def __init__(self, model: torch.nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.task.terms(self.model, batch)


class StepBatches(Sampler[list[int]]):
    """The batches of steps ``start`` to ``stop`` (default: the last) of a step phase of
    ``steps`` batches of ``batch_size`` indices into ``size`` items, drawn with replacement by
    torch's :class:`RandomSampler` from a generator seeded by ``seed``: one sequence for the
    whole phase, so a run resumed at step ``start`` draws the batches the lost steps would have
    drawn. Under DDP each step's batch is dealt out among the ``world`` processes (rank ``r``
    gets items ``r, r + world, ...``), so together they take the step one process would."""

    def __init__(self, size: int, steps: int, batch_size: int, seed: int, start: int = 0,
                 stop: int | None = None, world: int = 1, rank: int = 0):
        if batch_size < world:
            raise ValueError(f"a step batch of {batch_size} cannot be dealt to {world} processes")
        self.size, self.steps, self.batch_size, self.seed = size, steps, batch_size, int(seed)
        self.start, self.stop = start, steps if stop is None else min(stop, steps)
        self.world, self.rank = world, rank

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        b = self.batch_size
        order = list(RandomSampler(range(self.size), replacement=True, generator=generator,
                                   num_samples=self.steps * b))
        for step in range(self.start, self.stop):
            yield order[step * b:(step + 1) * b][self.rank::self.world]


def _block_ends(steps: int, every: int) -> list[int]:
    """The steps after which a step phase logs and checkpoints, in order: every ``every``
    steps counted back from ``steps`` (so the last block is a whole one)."""
    return sorted(range(steps, 0, -max(int(every), 1)))


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
                           amp: str = "auto", forward: Callable | None = None) -> int:
    """Estimate the statistics of frozen BatchNorm layers that never saw data, once, over
    ``dataset`` in order (the same on every process), then keep them fixed. A backbone trained
    from scratch is frozen during a prototype warm-up: in eval mode with its initial statistics
    its features would be unnormalised, and the first phase that trains it (batch statistics)
    would then see other features than the prototypes were fitted to. ``forward(batch)`` runs
    the phase's computation (default: the model on ``model.inputs(batch)``; a step phase passes
    its task's). Returns how many layers were calibrated."""
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
                if forward is not None:
                    forward(batch)
                else:
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
    """The phase's learning rate at ``epoch`` (a step phase: at its step): constant, cosine
    (over the phase's epochs or steps), or ``step:SIZE:GAMMA``."""
    length = phase.steps or phase.epochs
    if phase.schedule == "cosine" and length > 1:
        return base * 0.5 * (1 + math.cos(math.pi * epoch / length))
    if phase.schedule.startswith("step:"):
        _, size, gamma = phase.schedule.split(":")
        return base * float(gamma) ** (epoch // int(size))
    return base


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite: the run cannot go on with its settings, so ``--resume``
    is no way on (it keeps them)."""

    resumable = False


def read_resume_state(run_dir: Path, cli: bool = True) -> dict:
    path = Path(run_dir) / STATE
    if not path.is_file():
        again = (f"run the same train.py command again with --out {run_dir}" if cli else
                 f"call protozoo.train(..., run_dir='{run_dir}') without resume=True")
        raise UserError(f"'{run_dir}' has no {STATE} to resume from (it stopped before its "
                        f"first epoch ended, so nothing is lost): {again}; a run folder without "
                        "a checkpoint starts over in place")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, overwritten, or not a torch file at all
        raise UserError(f"'{path}' is not a readable torch file: the resume state is damaged; "
                        "evaluate the last saved model with evaluate.py, or start again "
                        "without --resume") from None
    if not isinstance(state, dict) or "model_name" not in state:
        raise UserError(f"'{path}' is not a train.py resume state; start again without --resume")
    return state
