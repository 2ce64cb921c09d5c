"""What each explainer costs, as a multiple of one forward pass of the same model on the same
batch, measured in one run (same process, same device, interleaved repetitions after a warm-up,
medians), and what one deletion + insertion evaluation costs on top.

    python benchmarks/bench_explainers.py                 # cam on tiny_cnn, 64 px, batch 32
    python benchmarks/bench_explainers.py --model protopnet
    python benchmarks/bench_explainers.py --quick         # < 30 s smoke run

Every explainer call includes its own forward pass where it needs one (``intrinsic`` reads the
model's output, so its cost is that forward pass plus the upsampling). Memory:
``protozoo.explain.evaluate_explainers`` holds one batch of images and of maps at a time, and
Captum's internal batches are capped at the batch size (Integrated Gradients'
``internal_batch_size`` = the batch, SmoothGrad's ``nt_samples_batch_size`` = 1, occlusion's
``perturbations_per_eval`` = 1), so evaluation memory is bounded by one batch whatever the
number of images; on a GPU the peak per explainer is printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import header, sync

import protozoo
from protozoo.explain.explainers import explain, list_explainers, resolve_explainers
from protozoo.explain.faithfulness import deletion_insertion


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cam", help="cam (default) or protopnet")
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    p.add_argument("--explainers", default="all")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="batch 8, 32 px, 1 repetition")
    return p.parse_args(argv)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.repeats = 32, 8, 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    header("explainer cost / one forward pass (same model, same batch)", device)
    torch.manual_seed(args.seed)
    kwargs = {"prototypes_per_class": 2} if args.model == "protopnet" else {}
    model = protozoo.create_model(args.model, backbone=args.backbone,
                                  num_classes=args.num_classes, **kwargs).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        target = model(x).logits.argmax(1)
    names = list_explainers() if args.explainers == "all" else args.explainers.split(",")
    methods = resolve_explainers(names)
    print(f"model: {args.model} ({args.backbone}), batch {args.batch_size} x "
          f"{args.image_size} px, {args.repeats} repetitions after a warm-up")

    def forward():
        with torch.no_grad():
            model(x)

    calls = {"forward": forward}
    for e in methods:
        calls[e.name] = (lambda e=e: explain(model, x, e, target))
    maps = explain(model, x, "gradient", target)
    calls["deletion+insertion"] = lambda: deletion_insertion(model, x, maps, target, args.steps)
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so a load change hits every method alike
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(timed(fn, device))
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0),
                                  torch.cuda.max_memory_allocated(device) / 2 ** 20)
    base = statistics.median(times["forward"])
    print(f"{'':>22s}  {'median ms':>10s}  {'x forward':>10s}  {'min-max ms':>16s}  peak MiB")
    for name, ts in times.items():
        med = statistics.median(ts)
        peak = f"{peaks[name]:.0f}" if name in peaks else "n/a"
        print(f"{name:>22s}  {1000 * med:10.2f}  {med / base:10.1f}  "
              f"{1000 * min(ts):7.2f}-{1000 * max(ts):7.2f}  {peak}")
    params = {e.name: e.params() for e in methods if e.params()}
    print(f"parameters: {params}; deletion+insertion: {args.steps} steps = "
          f"{2 * (args.steps + 1)} forward passes per explainer")
    print("memory: evaluation is bounded by one batch (one batch of images and maps at a time; "
          "Captum's internal batches capped at the batch size)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
