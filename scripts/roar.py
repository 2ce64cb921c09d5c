"""ROAR: RemOve And Retrain (Hooker, Erhan, Kindermans & Kim, "A Benchmark for Interpretability
Methods in Deep Neural Networks", NeurIPS 2019).

A model is trained; each explainer ranks the pixels of every training and test image by its map
of that model (for the image's *label*); the top 10/30/50/70/90% are replaced by the training
set's per-channel mean; a fresh model (same architecture, same initialisation, same schedule) is
retrained on the modified training images and tested on the modified test images. An
explainer whose top pixels carry the evidence makes the retrained accuracy fall faster than a
random ranking does; retraining is what separates "the pixels matter" from "the model was never
shown images like these" (the distribution shift that deletion curves suffer from). What
retraining cannot separate: a removal mask whose shape depends on the class (a smooth
class-specific map) tells the retrained model the label by itself (Rong et al., ICML 2022), so
curves that rise again at high fractions say more about the mask than about the evidence
(docs/roar/README.md).

    python scripts/roar.py                                     # cam/tiny_cnn, synthetic-parts
    python scripts/roar.py --num-train 600 --epochs 2 --out docs/roar
    python scripts/roar.py --explainers intrinsic,gradcam,gradient,random --fractions 0.1,0.5,0.9

Writes ``roar.json`` (every accuracy, the settings and the time taken) and ``roar.png`` into
``--out``. Runs on the CPU by default; every retrain takes ``--epochs`` epochs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import protozoo  # noqa: E402
from protozoo.backbones import backbone_normalization  # noqa: E402
from protozoo.data import build_data  # noqa: E402
from protozoo.errors import UserError, run_cli  # noqa: E402
from protozoo.explain.explainers import explain, resolve_explainers  # noqa: E402
from protozoo.explain.faithfulness import remove_top  # noqa: E402
from protozoo.explain.training import TensorImages, train_model  # noqa: E402
from protozoo.fileio import atomic_path, atomic_write_text  # noqa: E402
from protozoo.runtime import resolve_device  # noqa: E402

DEFAULT_EXPLAINERS = "intrinsic,gradcam,gradient,random"
DEFAULT_FRACTIONS = "0.1,0.3,0.5,0.7,0.9"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="cam")
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--dataset", default="synthetic-parts")
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="epochs of every (re)training")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--explainers", default=DEFAULT_EXPLAINERS,
                   help=f"comma-separated explainer names (default {DEFAULT_EXPLAINERS})")
    p.add_argument("--fractions", default=DEFAULT_FRACTIONS,
                   help=f"fractions of pixels removed (default {DEFAULT_FRACTIONS})")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each repeats the whole "
                   "experiment (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="where the generated dataset is cached")
    p.add_argument("--out", default="runs/roar", help="folder for roar.json and roar.png")
    return p.parse_args(argv)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([torch.as_tensor(it["image"]) for it in items]).float(),
            torch.tensor([int(it["label"]) for it in items]))


def _ranked_maps(model, images, labels, explainer, batch_size, device,
                 offset: int = 0) -> torch.Tensor:
    """The explainer's maps of every image, for its label, computed in batches (kept on the
    CPU); a seeded explainer (random, SmoothGrad) draws new noise for every batch."""
    maps = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        e = explainer
        if hasattr(e, "seed"):
            e = dataclasses.replace(e, seed=e.seed + offset + start)
        maps.append(explain(model, x, e, y).cpu())
    return torch.cat(maps)


def _accuracy(model, images, labels, batch_size, device) -> float:
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out = model(images[start:start + batch_size].to(device))
            correct += int((out.logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def _retrain(args, data, splits, seed: int, device) -> float:
    """A fresh model trained on the ``splits`` ``{"train": (x, y), "val": ..., "test": ...}``;
    its accuracy on the modified test images."""
    train, val, test = (TensorImages(*splits[k]) for k in ("train", "val", "test"))
    bundle = type(data)(train=train, val=val, test=test, push=train,
                        class_names=data.class_names, image_size=data.image_size,
                        has_masks=False, has_boxes=False)
    model = _new_model(args, data, seed)
    train_model(model, bundle, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                device=device)
    return _accuracy(model, *splits["test"], args.batch_size, device)


def _new_model(args, data, seed: int):
    torch.manual_seed(seed)  # every (re)training of one seed starts from the same weights
    return protozoo.create_model(args.model, backbone=args.backbone,
                                 class_names=data.class_names)


def run_seed(args, seed: int, methods, fractions, device, started: float) -> dict:
    """Train, rank, remove and retrain for one seed (the validation split, the initial weights
    and every random choice follow it; the generated images do not)."""
    mean, std = backbone_normalization(args.backbone)
    data = build_data(args.dataset, image_size=args.image_size, mean=mean, std=std,
                      num_classes=args.num_classes, num_train=args.num_train,
                      num_test=args.num_test, seed=seed, cache_dir=args.cache_dir)
    splits = {"train": _stack(data.push), "val": _stack(data.val), "test": _stack(data.test)}
    fill = splits["train"][0].mean(dim=(0, 2, 3))  # the training set's per-channel mean
    print(f"seed {seed}: {len(splits['train'][1])} train / {len(splits['val'][1])} val / "
          f"{len(splits['test'][1])} test images", flush=True)
    base = _new_model(args, data, seed)
    train_model(base, data, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                device=device)
    run = {"seed": seed, "class_names": data.class_names, "fill": fill.tolist(),
           "num_train_used": len(splits["train"][1]), "num_val": len(splits["val"][1]),
           "trained_model_accuracy": _accuracy(base, *splits["test"], args.batch_size, device),
           "accuracy_unmodified": _retrain(args, data, splits, seed, device), "accuracy": {}}
    print(f"  trained model: test accuracy {run['trained_model_accuracy']:.3f}; retrained on "
          f"unmodified images: {run['accuracy_unmodified']:.3f}", flush=True)
    for e in methods:
        maps = {k: _ranked_maps(base, *splits[k], e, args.batch_size, device,
                                10 ** 6 * i + 10 ** 4 * seed) for i, k in enumerate(splits)}
        run["accuracy"][e.name] = []
        for f in fractions:
            modified = {k: (remove_top(x, maps[k], f, fill, seed=seed), y)
                        for k, (x, y) in splits.items()}
            acc = _retrain(args, data, modified, seed, device)
            run["accuracy"][e.name].append(acc)
            print(f"  {e.name:>22s}  remove {f:.0%}: test accuracy {acc:.3f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    return run


def summarise(runs: list[dict]) -> dict:
    """Mean, min and max over the seeds of every accuracy."""
    out = {}
    for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        out[f"accuracy_{stat}"] = {name: [fn([r["accuracy"][name][i] for r in runs])
                                          for i in range(len(accs))]
                                   for name, accs in runs[0]["accuracy"].items()}
        out[f"accuracy_unmodified_{stat}"] = fn([r["accuracy_unmodified"] for r in runs])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [0.0] + result["fractions"]
    for name in result["accuracy_mean"]:
        ys = [result[f"accuracy_unmodified_{s}"] for s in ("mean", "min", "max")]
        mean, lo, hi = ([y] + result[f"accuracy_{s}"][name]
                        for y, s in zip(ys, ("mean", "min", "max")))
        line, = ax.plot(xs, mean, marker="o", label=name)
        if len(result["runs"]) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(1 / len(result["class_names"]), color="grey", linestyle=":", label="chance")
    ax.set_xlabel("fraction of pixels removed (top-ranked by the explainer)")
    ax.set_ylabel("test accuracy after retraining")
    s = result["settings"]
    seeds = len(result["runs"])
    ax.set_title(f"ROAR: {s['model']} ({s['backbone']}) on {s['dataset']}, {s['num_train']} "
                 f"train images, {s['epochs']} epochs, {seeds} seed{'s' if seeds > 1 else ''}"
                 + (" (mean, min-max)" if seeds > 1 else ""), fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    methods = resolve_explainers([n.strip() for n in args.explainers.split(",") if n.strip()])
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--fractions and --seeds must be numbers separated by commas, got "
                        f"'{args.fractions}' and '{args.seeds}'") from None
    if any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"--fractions must lie in (0, 1], got {args.fractions}")
    print(f"ROAR: {args.model} ({args.backbone}) on {args.dataset}, {args.epochs} epochs per "
          f"training, explainers {', '.join(e.name for e in methods)}, fractions {fractions}, "
          f"seeds {seeds}", flush=True)
    runs = [run_seed(args, seed, methods, fractions, device, started) for seed in seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"fractions": fractions, **summarise(runs), "class_names": runs[0]["class_names"],
              "runs": runs,
              "settings": {**{k: v for k, v in vars(args).items() if k != "cache_dir"},
                           "explainer_params": {e.name: e.params() for e in methods},
                           "threads": torch.get_num_threads(),
                           "seconds": round(time.time() - started, 1),
                           "command": "python scripts/roar.py " + " ".join(
                               sys.argv[1:] if argv is None else argv)}}
    atomic_write_text(out / "roar.json", json.dumps(result, indent=2))
    plot(result, out / "roar.png")
    print(f"wrote {out / 'roar.json'} and {out / 'roar.png'} "
          f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
