"""Train-step time of ProtoPNet relative to a plain classifier with the same backbone.

Three variants, measured in the same process with interleaved repetitions (the order rotates every
repetition, so drift and background load hit all of them alike), after warm-up, reported as
medians:

* ``plain``            -- ``create_model("cam", ...)``: backbone -> GAP -> linear, cross-entropy;
* ``protopnet``        -- ``create_model("protopnet", ...)``: add-on layers, prototypes, distances
                          (protozoo's one-matmul fp32 :func:`squared_distances`), Chen et al.'s loss;
* ``protopnet-3conv``  -- the same ProtoPNet with its distance swapped for the official code's
                          three-convolution ``||x||^2 - 2 x.p + ||p||^2`` (reference only).

Every variant runs the full training step the engine runs: zero_grad, forward and
``model.objective(output, batch)`` under autocast, the engine's finiteness check, backward,
``Adam.step``. The batch is a fixed synthetic tensor already on the device (data loading is not
timed). Target: ``protopnet`` <= 1.15x ``plain`` at the same precision.

    python benchmarks/bench_protopnet_step.py            # CPU: tiny_cnn, 64 px, batch 64
    python benchmarks/bench_protopnet_step.py --quick    # < 30 s smoke run
    python benchmarks/bench_protopnet_step.py            # on a CUDA GPU: resnet34, 224 px, batch 80,
                                                         # 200 classes x 10 prototypes, fp32 and bf16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, protozoo, sync, three_conv_distances  # noqa: E402
from protozoo.runtime import resolve_device
from protozoo.models.protopnet import squared_distances

TARGET = 1.15


# ----------------------------------------------------------------------------- reference distance

def use_three_conv_distance(model) -> None:
    """Swap this ProtoPNet instance's distance function for :func:`three_conv_distances`."""
    ones = torch.ones(model.num_prototypes, model.prototypes.shape[1], 1, 1,
                      device=model.prototypes.device)
    model.distances_from_features = lambda features: three_conv_distances(
        features, model.prototypes, ones)


# ----------------------------------------------------------------------------- helpers

def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def state_bytes(model, optimizer) -> int:
    """Bytes held by a model's parameters, buffers and optimiser state (gradients excluded)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Variant:
    def __init__(self, name, model, device, precision, channels_last, lr=1e-4):
        self.name, self.model = name, model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.device, self.precision = device, precision
        self.times: list[float] = []

    def step(self, batch: dict) -> None:
        """One training step, as :meth:`protozoo.engine.Trainer._train_epoch` runs it."""
        with autocast(self.device, self.precision):
            output = self.model(batch["image"])
            terms = self.model.objective(output, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss became {loss.item()}")
        loss.backward()
        self.optimizer.step()

    def timed_step(self, batch: dict) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step(batch)
        sync(self.device)
        return time.perf_counter() - start

    def peak_memory_mib(self, batch: dict):
        """Peak allocated memory of one step as if this variant were alone on the GPU: the
        step's peak minus what the *other* variants hold. ``None`` off CUDA."""
        if self.device.type != "cuda":
            return None
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        others = torch.cuda.memory_allocated(self.device) - state_bytes(self.model, self.optimizer)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(batch)
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - others
        self.optimizer.zero_grad(set_to_none=True)
        return peak / 2 ** 20


def check_distances(model, batch: dict, precision: str) -> None:
    """Max abs difference between protozoo's distances and the three-convolution ones, both
    against a float64 ground truth ``sum_d (x_d - p_d)^2``."""
    device = batch["image"].device
    with torch.no_grad():
        was = model.training
        model.eval()
        features = model.add_on(model.backbone(batch["image"])).float()
        model.train(was)
        protos = model.prototypes.detach().float()
        ones = torch.ones(protos.shape[0], protos.shape[1], 1, 1, device=device)
        ours = squared_distances(features, protos)
        conv = three_conv_distances(features, protos, ones)
        B, D, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, D).double()
        exact = (torch.cdist(flat, protos.double()) ** 2).view(B, h, w, -1).permute(0, 3, 1, 2)
        print(f"distance check on {B}x{protos.shape[0]}x{h}x{w} distances "
              f"(max distance {float(exact.max()):.3f}):")
        print(f"  max |protozoo - 3-conv|     (fp32) = {float((ours - conv).abs().max()):.3e}")
        print(f"  max |protozoo - float64|    (fp32) = {float((ours.double() - exact).abs().max()):.3e}")
        print(f"  max |3-conv  - float64|     (fp32) = {float((conv.double() - exact).abs().max()):.3e}")
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                ours_bf = squared_distances(features, protos)
                conv_bf = three_conv_distances(features, protos, ones)
            print(f"  under bf16 autocast: max |protozoo - float64| = "
                  f"{float((ours_bf.double() - exact).abs().max()):.3e} (kept in fp32), "
                  f"max |3-conv - float64| = {float((conv_bf.double() - exact).abs().max()):.3e}")


def build(kind: str, args, seed: int):
    torch.manual_seed(seed)  # the same backbone initialisation for every variant
    if kind == "plain":
        return protozoo.create_model("cam", backbone=args.backbone, num_classes=args.num_classes)
    return protozoo.create_model("protopnet", backbone=args.backbone,
                                 num_classes=args.num_classes,
                                 prototypes_per_class=args.prototypes_per_class,
                                 prototype_dim=args.prototype_dim)


def run_precision(args, device: torch.device, precision: str) -> list[dict]:
    channels_last = device.type == "cuda" and precision == "bf16"
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {"image": images, "label": labels.to(device)}

    variants = [Variant("plain", build("plain", args, args.seed), device, precision, channels_last),
                Variant("protopnet", build("protopnet", args, args.seed), device, precision,
                        channels_last)]
    if not args.no_three_conv:
        reference = build("protopnet", args, args.seed)
        variants.append(Variant("protopnet-3conv", reference, device, precision, channels_last))
        use_three_conv_distance(variants[-1].model)

    print(f"\n-- precision {precision}{' (autocast bf16, channels_last)' if channels_last else ''}"
          f"{' (autocast bf16)' if precision == 'bf16' and not channels_last else ''}")
    check_distances(variants[1].model, batch, precision)

    for _ in range(args.warmup):
        for v in variants:
            v.step(batch)
    sync(device)
    for rep in range(args.steps):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.times.append(v.timed_step(batch))

    peaks = {v.name: v.peak_memory_mib(batch) for v in variants}
    plain = variants[0]
    rows = []
    for v in variants:
        paired = [t / p for t, p in zip(v.times, plain.times)]
        rows.append({"variant": v.name, "precision": precision,
                     "ms": 1e3 * statistics.median(v.times),
                     "ratio": statistics.median(v.times) / statistics.median(plain.times),
                     "paired": statistics.median(paired),
                     "spread": (1e3 * min(v.times), 1e3 * max(v.times)),
                     "peak": peaks[v.name]})
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], n: int) -> None:
    print(f"\nstep time, median of {n} interleaved repetitions; 'x plain' = median / plain's median "
          "at the same precision, 'paired' = median of per-repetition ratios")
    print(f"{'variant':<17} {'precision':<9} {'step ms':>9} {'min-max ms':>17} {'x plain':>8} "
          f"{'paired':>7} {'peak MiB':>9}  target")
    for r in rows:
        peak = "n/a" if r["peak"] is None else f"{r['peak']:.0f}"
        if r["variant"] == "protopnet":
            target = f"<= {TARGET:.2f}x: {'PASS' if r['ratio'] <= TARGET else 'FAIL'}"
        elif r["variant"] == "plain":
            target = "(baseline)"
        else:
            target = "(reference: official distance)"
        spread = f"{r['spread'][0]:.1f}-{r['spread'][1]:.1f}"
        print(f"{r['variant']:<17} {r['precision']:<9} {r['ms']:>9.1f} {spread:>17} "
              f"{r['ratio']:>7.3f}x {r['paired']:>6.3f}x {peak:>9}  {target}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--backbone", default=None, help="default: tiny_cnn on CPU, resnet34 on GPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 CPU, 224 GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 CPU, 80 GPU")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 5 CPU, 200 GPU")
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--prototypes", type=int, default=None,
                        help="total prototypes (a multiple of --num-classes); default "
                             "prototypes-per-class x num-classes (GPU: 200 x 10 = 2000)")
    parser.add_argument("--prototype-dim", type=int, default=128, help="D (default 128)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "both"],
                        help="fp32, or bf16 autocast (+ channels_last on GPU); default fp32 on "
                             "CPU, both on GPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed repetitions per variant (default 20 CPU, 50 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 CPU, 10 GPU")
    parser.add_argument("--no-three-conv", action="store_true",
                        help="skip the three-convolution reference variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a < 30 s smoke run")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.backbone = args.backbone or ("resnet34" if gpu else "tiny_cnn")
    args.image_size = args.image_size or (224 if gpu else 64)
    args.batch_size = args.batch_size or (80 if gpu else 64)
    args.num_classes = args.num_classes or (200 if gpu else 5)
    if args.prototypes is not None:
        if args.prototypes % args.num_classes:
            parser.error(f"--prototypes {args.prototypes} is not a multiple of --num-classes "
                         f"{args.num_classes}")
        args.prototypes_per_class = args.prototypes // args.num_classes
    args.precision = args.precision or ("both" if gpu else "fp32")
    args.steps = args.steps or (50 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 5), min(args.warmup, 1)
        if not gpu:
            args.batch_size, args.image_size = min(args.batch_size, 16), min(args.image_size, 32)

    torch.manual_seed(args.seed)
    header("ProtoPNet train step vs a plain classifier (GAP + linear)", device)
    print(f"backbone {args.backbone}, image {args.image_size} px, batch {args.batch_size}, "
          f"{args.num_classes} classes x {args.prototypes_per_class} prototypes = "
          f"{args.num_classes * args.prototypes_per_class} prototypes, D={args.prototype_dim}; "
          f"Adam; {args.warmup} warm-up + {args.steps} timed steps per variant"
          f"{' (--quick)' if args.quick else ''}")
    if gpu:
        print(f"cudnn.benchmark={torch.backends.cudnn.benchmark}, "
              f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"matmul precision={torch.get_float32_matmul_precision()}")

    started = time.perf_counter()
    rows = []
    for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
        rows += run_precision(args, device, precision)
    print_table(rows, args.steps)
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    print(f"\ntotal {time.perf_counter() - started:.1f} s; 1-min load average now {load}")


if __name__ == "__main__":
    main()
