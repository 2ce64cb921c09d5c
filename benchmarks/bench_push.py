"""Push (prototype projection) time relative to a bare inference pass over the same images.

Measured in the same process, interleaved (the order rotates every repetition), after a warm-up
on the first two batches, reported as medians:

* ``inference``        -- backbone + add-on forward only, ``no_grad``, same DataLoader, batch size and
                          precision as push: the floor any push must pay;
* ``push``             -- :func:`protozoo.models.protopnet.push.compute_push` with the paper's
                          rule (nearest patch; scan + provenance records), what the target is for;
* ``push + specific``  -- the default ``compute_push``: the same, then the class specificity of
                          every projection (one more pass over the data) and, for a class with a
                          class-agnostic projection, the search for its most specific patch. On
                          random images every projection is class-agnostic: the worst case;
* ``push (scan only)`` -- :func:`protozoo.models.protopnet.push.nearest_images`, the vectorised search alone;
* ``official-style``   -- a re-implementation of the official ProtoPNet push loop
                          (``push.update_prototypes_on_batch``): per batch, distances by three
                          convolutions, copied to NumPy, then a Python loop over prototypes that
                          masks to the images of the prototype's class, takes the min and updates
                          the running best. Image saving (the official code writes PNGs of every
                          prototype) is left out, so this is a lower bound of the official cost.

The data set is random tensors with labels (no download), kept on the device by default so that
host-side loading does not dilute the ratios. Target: push <= 1.5x inference.

    python benchmarks/bench_push.py           # CPU: tiny_cnn, 64 px, 2000 images, 5 x 10 prototypes
    python benchmarks/bench_push.py --quick   # < 30 s smoke run
    python benchmarks/bench_push.py           # on a CUDA GPU: resnet34, 224 px, 2000 images,
                                              # 200 classes x 10 prototypes (D=128), batch 80, bf16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, protozoo, sync, three_conv_distances  # noqa: E402
from protozoo.runtime import autocast_for, resolve_device, to_device
from protozoo.models.protopnet.push import compute_push, nearest_images

TARGET = 1.5


class RandomImages(Dataset):
    """``n`` random images with labels ``0..K-1`` (every class present), as protozoo data sets
    yield them: ``{"image": [3, S, S], "label": int64}``."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int, device: torch.device):
        if n < num_classes:
            raise ValueError(f"{n} images cannot cover {num_classes} classes")
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % num_classes
        self.labels = labels[torch.randperm(n, generator=g)]
        if device.type == "cuda":
            gd = torch.Generator(device=device).manual_seed(seed)
            self.images = torch.randn(n, 3, size, size, generator=gd, device=device)
        else:
            self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


# ----------------------------------------------------------------------------- the measured passes

@torch.no_grad()
def inference_pass(model, dataset, batch_size: int, device: torch.device, amp: str) -> None:
    """Backbone + add-on forward over ``dataset``: the same loader and autocast as push."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    autocast, _ = autocast_for(device, amp)
    was = model.training
    model.eval()
    for batch in loader:
        batch = to_device(batch, device)
        with autocast:
            features = model.add_on(model.backbone(batch["image"]))
        features.float()  # push works on fp32 features too
    model.train(was)


@torch.no_grad()
def official_style_push(model, dataset, batch_size: int, device: torch.device, amp: str):
    """The official ProtoPNet push loop (``push_prototypes`` + ``update_prototypes_on_batch``,
    class-specific), minus image saving; a reference, written as plainly as the original.

    Returns ``(min_distance [P], image_index [P], cell [P, 2], prototype_update [P, D, 1, 1])``.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    autocast, _ = autocast_for(device, amp)
    was = model.training
    model.eval()
    n_prototypes, D = model.prototypes.shape
    num_classes = model.num_classes
    # the official prototype_class_identity is a plain attribute, left on the CPU
    prototype_class_identity = model.class_identity.cpu()
    ones = torch.ones(n_prototypes, D, 1, 1, device=device)
    global_min_proto_dist = np.full(n_prototypes, np.inf)
    global_min_fmap_patches = np.zeros([n_prototypes, D, 1, 1])
    global_min_image = np.full(n_prototypes, -1)
    global_min_cell = np.zeros([n_prototypes, 2], dtype=int)

    start_index_of_search_batch = 0
    for batch in loader:
        search_y = batch["label"].cpu()  # the official loader yields labels on the CPU
        search_batch = to_device(batch, device)["image"]
        # push_forward: conv_features (backbone + add-on), then _l2_convolution
        with autocast:
            protoL_input_torch = model.add_on(model.backbone(search_batch))
        protoL_input_torch = protoL_input_torch.float()
        proto_dist_torch = three_conv_distances(protoL_input_torch, model.prototypes.float(), ones)
        protoL_input_ = np.copy(protoL_input_torch.detach().cpu().numpy())
        proto_dist_ = np.copy(proto_dist_torch.detach().cpu().numpy())
        del protoL_input_torch, proto_dist_torch

        class_to_img_index_dict = {key: [] for key in range(num_classes)}
        for img_index, img_y in enumerate(search_y):
            img_label = img_y.item()
            class_to_img_index_dict[img_label].append(img_index)

        for j in range(n_prototypes):
            target_class = torch.argmax(prototype_class_identity[j]).item()
            if len(class_to_img_index_dict[target_class]) == 0:
                continue
            proto_dist_j = proto_dist_[class_to_img_index_dict[target_class]][:, j, :, :]
            batch_min_proto_dist_j = np.amin(proto_dist_j)
            if batch_min_proto_dist_j < global_min_proto_dist[j]:
                batch_argmin_proto_dist_j = list(np.unravel_index(np.argmin(proto_dist_j, axis=None),
                                                                  proto_dist_j.shape))
                batch_argmin_proto_dist_j[0] = \
                    class_to_img_index_dict[target_class][batch_argmin_proto_dist_j[0]]
                img_index_in_batch = batch_argmin_proto_dist_j[0]
                fmap_height_start_index = batch_argmin_proto_dist_j[1]  # prototype stride 1
                fmap_height_end_index = fmap_height_start_index + 1  # prototype height 1
                fmap_width_start_index = batch_argmin_proto_dist_j[2]
                fmap_width_end_index = fmap_width_start_index + 1
                batch_min_fmap_patch_j = protoL_input_[img_index_in_batch, :,
                                                       fmap_height_start_index:fmap_height_end_index,
                                                       fmap_width_start_index:fmap_width_end_index]
                global_min_proto_dist[j] = batch_min_proto_dist_j
                global_min_fmap_patches[j] = batch_min_fmap_patch_j
                global_min_image[j] = img_index_in_batch + start_index_of_search_batch
                global_min_cell[j] = (fmap_height_start_index, fmap_width_start_index)
        start_index_of_search_batch += len(search_y)

    prototype_update = np.reshape(global_min_fmap_patches, (n_prototypes, D, 1, 1))
    update = torch.tensor(prototype_update, dtype=torch.float32).to(device)  # official copy_()
    model.train(was)
    return global_min_proto_dist, global_min_image, global_min_cell, update


# ----------------------------------------------------------------------------- helpers

def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def check_agreement(ours, official) -> None:
    """compute_push and the official-style loop should pick the same patches (results of the last
    timed repetition of each); they differ where the official loop gives two prototypes of a
    class the same source image, which compute_push does not allow."""
    dist, image, cell, update = official
    same_image = (ours.image_index.cpu().numpy() == image).mean()
    same_patch = ((ours.image_index.cpu().numpy() == image)
                  & (ours.cell.cpu().numpy() == cell).all(1)).mean()
    ddiff = np.abs(ours.distances.cpu().double().numpy() - dist).max()
    vdiff = (ours.vectors.float() - update.view(update.shape[0], -1)).abs().max().item()
    print(f"agreement with the official-style loop: same image {100 * same_image:.1f}% and same "
          f"patch {100 * same_patch:.1f}% of {len(dist)} prototypes; max |distance diff| "
          f"{ddiff:.2e}, max |projected vector diff| {vdiff:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--backbone", default=None, help="default: tiny_cnn on CPU, resnet34 on GPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 CPU, 224 GPU")
    parser.add_argument("--images", type=int, default=2000, help="push-set size (default 2000)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 5 CPU, 200 GPU")
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--prototype-dim", type=int, default=128, help="D (default 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 CPU, 80 GPU")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="backbone precision for all passes; default fp32 on CPU, bf16 "
                             "(autocast) on GPU, as compute_push's amp='auto'")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions (default 3 CPU, 5 GPU)")
    parser.add_argument("--data-on", default="device", choices=["device", "host"],
                        help="keep the images on the device (default) or in host memory")
    parser.add_argument("--no-official", action="store_true",
                        help="skip the official-style loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a < 30 s smoke run")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.backbone = args.backbone or ("resnet34" if gpu else "tiny_cnn")
    args.image_size = args.image_size or (224 if gpu else 64)
    args.num_classes = args.num_classes or (200 if gpu else 5)
    args.batch_size = args.batch_size or (80 if gpu else 64)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.repeats = args.repeats or (5 if gpu else 3)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.images = min(args.images, 400 if gpu else 256)
        if not gpu:
            args.image_size = min(args.image_size, 32)
    amp = "bf16" if args.precision == "bf16" else "off"

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    header("ProtoPNet push vs a bare inference pass", device)
    P = args.num_classes * args.prototypes_per_class
    print(f"backbone {args.backbone}, {args.images} random images of {args.image_size} px "
          f"({args.data_on} memory), {args.num_classes} classes x {args.prototypes_per_class} "
          f"prototypes = {P}, D={args.prototype_dim}, batch {args.batch_size}, {args.precision}; "
          f"warm-up on 2 batches + {args.repeats} timed repetitions{' (--quick)' if args.quick else ''}")

    model = protozoo.create_model("protopnet", backbone=args.backbone,
                                  num_classes=args.num_classes,
                                  prototypes_per_class=args.prototypes_per_class,
                                  prototype_dim=args.prototype_dim).to(device)
    data_device = device if args.data_on == "device" else torch.device("cpu")
    dataset = RandomImages(args.images, args.image_size, args.num_classes, args.seed, data_device)

    started = time.perf_counter()
    passes = {
        "inference": lambda: inference_pass(model, dataset, args.batch_size, device, amp),
        "push": lambda: compute_push(model, dataset, args.batch_size, device, amp,
                                     class_specific=False),
        "push + specific": lambda: compute_push(model, dataset, args.batch_size, device, amp),
        "push (scan only)": lambda: nearest_images(model, dataset, args.prototypes_per_class,
                                                   args.batch_size, device, True, amp),
    }
    if not args.no_official:
        passes["official-style"] = lambda: official_style_push(model, dataset, args.batch_size,
                                                               device, amp)
    # warm-up on the first two batches: one-time costs (allocator, backbone geometry measurement
    # cached by compute_push's provenance step) are paid before the timed repetitions
    warm = Subset(dataset, range(min(len(dataset), 2 * args.batch_size)))
    inference_pass(model, warm, args.batch_size, device, amp)
    compute_push(model, warm, args.batch_size, device, amp)
    if not args.no_official:
        official_style_push(model, warm, args.batch_size, device, amp)
    sync(device)

    times = {name: [] for name in passes}
    results = {}
    names = list(passes)
    for rep in range(args.repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, results[name] = timed(passes[name], device)
            times[name].append(seconds)
    if not args.no_official:
        check_agreement(results["push"], results["official-style"])

    base = statistics.median(times["inference"])
    print(f"\nwall time over the {args.images} images, median of {args.repeats} interleaved "
          "repetitions; 'x inference' = median / inference's median")
    print(f"{'pass':<17} {'seconds':>8} {'min-max s':>15} {'x inference':>12}  target")
    for name in names:
        t = statistics.median(times[name])
        if name == "push":
            target = f"<= {TARGET:.1f}x: {'PASS' if t / base <= TARGET else 'FAIL'}"
        elif name == "inference":
            target = "(baseline)"
        elif name == "push + specific":
            target = "(the class-specific rule; worst case: every projection moved)"
        elif name == "official-style":
            target = f"(reference: {t / statistics.median(times['push']):.1f}x our push)"
        else:
            target = "(breakdown)"
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        print(f"{name:<17} {t:>8.3f} {spread:>15} {t / base:>11.2f}x  {target}")
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    print(f"\ntotal {time.perf_counter() - started:.1f} s; 1-min load average now {load}")


if __name__ == "__main__":
    main()
