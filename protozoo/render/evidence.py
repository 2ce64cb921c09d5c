"""ProtoPNet evidence reports: "this looks like that" (Chen et al. 2019, Figs. 1 and 3).

* Local (one image): the predicted class and, for the two classes with the largest logits, the
  prototypes ranked by contribution = similarity x last-layer weight (top 5, then one line for all
  the others, so the numbers on the page add up to the logit). Each row is one PNG: the image with
  the box of the patch most like the prototype, the prototype's patch, the training image it was
  projected onto (its box drawn), and the similarity map over the image.
* Global (the model): ``prototypes.html``, every prototype's source patch and its 5 nearest
  training patches (any class), grouped by class.

Boxes are the evidence box (:func:`protozoo.models.protopnet.push.evidence_boxes`): the similarity
map upsampled bicubically to the image (as the official code), its pixels at or above the 95th
percentile, and of those the connected region around the peak. Chen et al.'s high-activation box
bounds *all* of those pixels, which for a part smaller than 5% of the image spreads over
unrelated regions; it stays in the push provenance (``high_activation_box``). The metrics score
the map itself (its peak, the region around it, its mass), not the box.

Folder layout (relative links only, no external resources, so it works copied anywhere)::

    index.html  prototypes.html  image_000.html ... user_000.html ...  img/*.png
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, UserError
from ..maps import peak_region_box, upsample
from ..models.protopnet.push import (MAP_UPSAMPLING, evidence_boxes, locate_sources,
                                      source_similarity_maps)
from ..models.protopnet.prune import MIN_SPECIFICITY
from .html import esc, img_tag, metrics_table, table, write_page
from .overlay import draw_box, heatmap_overlay, mask_outline, save_png, upscale

PERCENTILE = 95.0  # evidence box threshold, as Chen et al.'s high-activation box
TOP_CLASSES = 2
TOP_PROTOTYPES = 5
NEAREST = 5
IMG = "img"  # PNG sub-folder
GALLERY = "prototypes.html"
YELLOW, RED, GREEN, GREY = (255, 230, 0), (230, 0, 0), (0, 190, 0), (215, 215, 215)
GAP = 6
GALLERY_PX = 128
PANELS = ("this image: the box on the patch most like the prototype", "the prototype's patch",
          "the training image it comes from", "similarity map over this image")


def _scale(size: int, target: int = 192) -> int:
    """Integer upscaling to about ``target`` px: local pages 192 (64 px -> x3); the gallery,
    seven pictures a row, 128 (x2, its patches are enlarged crops anyway)."""
    return max(1, target // int(size))


def _num(value: float) -> str:
    return f"{value:.4f}"


# ----------------------------------------------------------------------------- evidence
@dataclass
class Evidence:
    """One image's forward pass on the CPU: everything a local page shows."""

    raw: np.ndarray  # uint8 [H, W, 3]
    logits: torch.Tensor  # [K]
    contributions: torch.Tensor  # [K, P], sums over P to the logits
    similarities: torch.Tensor  # [P]
    maps: torch.Tensor  # [P, h, w] similarity maps at feature resolution

    @property
    def pred(self) -> int:
        return int(self.logits.argmax())

    def upsampled(self, j: int) -> np.ndarray:
        return upsample(self.maps[j][None, None], self.raw.shape[:2], MAP_UPSAMPLING)[0, 0].numpy()

    def box(self, j: int) -> tuple[int, int, int, int]:
        """Evidence box of prototype ``j`` on this image (the region around its peak)."""
        return peak_region_box(self.upsampled(j), PERCENTILE)

    def ranking(self, k: int) -> list[int]:
        """Prototypes by contribution to class ``k``, largest first."""
        return torch.argsort(self.contributions[k], descending=True, stable=True).tolist()


@torch.no_grad()
def explain(model, images: torch.Tensor, raws: list[np.ndarray],
            batch_size: int = 1) -> list[Evidence]:
    """Forward normalised ``images`` [N, 3, H, W]; ``raws`` are the same images as uint8.

    One image at a time by default, so the page shows exactly what ``model(image[None])`` gives:
    with the log similarity a distance near 0 turns fp32 differences between batch sizes or
    memory layouts into visible differences in the logits."""
    device = next(model.parameters()).device
    out_list = []
    for start in range(0, len(images), batch_size):
        out = model(images[start:start + batch_size].to(device))
        contrib = model.contributions(out).cpu()
        logits, sims = out.logits.float().cpu(), out.similarities.float().cpu()
        maps = out.similarity_maps.float().cpu()
        for b in range(len(logits)):
            out_list.append(Evidence(raws[start + b], logits[b], contrib[b], sims[b], maps[b]))
    return out_list


class PrototypeSources:
    """Push provenance of each prototype and its source image's pixels.

    With ``data``, source images come from ``data.push`` (checked against the recorded path);
    otherwise from the recorded ``image_path`` when that file exists. Images are decoded at
    ``size``, the resolution the provenance boxes were recorded at.
    """

    def __init__(self, model, data=None, size: int | None = None):
        self.records = {int(r["prototype"]): r for r in model.metadata.get("prototypes") or []}
        self.push = data.push if data is not None else None
        records = list(self.records.values())  # where each source is in the push data, if it is
        at = locate_sources(records, self.push) if self.push is not None else []
        self.index = {int(r["prototype"]): n for r, n in zip(records, at)}
        self.size = int(size or model.metadata.get("image_size") or 224)
        self._cache: dict = {}
        self._model = model
        self._boxes: dict | None = None

    @property
    def projected(self) -> bool:
        return bool(self.records)

    def record(self, j: int) -> dict | None:
        return self.records.get(int(j))

    def image(self, j: int) -> np.ndarray | None:
        rec = self.record(j)
        if rec is None:
            return None
        key = (rec.get("image_index"), rec.get("image_path"))
        if key not in self._cache:
            self._cache[key] = self._load(rec)
        return self._cache[key]

    def box(self, j: int) -> tuple[int, int, int, int]:
        """Prototype ``j``'s evidence box on its source image: recorded at push; for a checkpoint
        from before evidence boxes were recorded, computed from the model's similarity map on the
        source image when the push data holds it, else Chen et al.'s recorded box."""
        rec = self.record(j)
        if rec.get("evidence_box"):
            return tuple(rec["evidence_box"])
        if self._boxes is None:
            self._boxes = {}
            order = sorted(self.records)  # the maps are indexed by prototype
            if order == list(range(len(order))) and order and \
                    all(self.index.get(p) is not None for p in order):
                located = [dict(self.records[p], image_index=self.index[p], image_path=None)
                           for p in order]
                maps = source_similarity_maps(self._model, self.push, located)
                side = self.push.raw_image(self.index[0]).shape[:2]
                self._boxes = dict(zip(order, evidence_boxes(maps.float().cpu(), side,
                                                             PERCENTILE)))
        return self._boxes.get(int(j)) or tuple(rec["high_activation_box"])

    def _load(self, rec: dict) -> np.ndarray | None:
        path = rec.get("image_path")
        if self.index.get(int(rec["prototype"])) is not None:
            return self.push.raw_image(self.index[int(rec["prototype"])])
        if path and Path(path).is_file():
            from ..data.images import decode_sample

            try:
                return decode_sample(path, self.size).image
            except DataError:
                return None
        return None


# ----------------------------------------------------------------------------- panels
def _big(image: np.ndarray, box=None, colour=YELLOW, target: int = 192) -> np.ndarray:
    """Upscaled image, with ``box`` (image pixels) drawn after upscaling so it stays thin."""
    s = _scale(image.shape[0], target)
    out = upscale(image, s)
    if box is not None:
        out = draw_box(out, [v * s for v in box], colour, width=2)
    return out


def _patch(image: np.ndarray, box, side: int) -> np.ndarray:
    """Crop ``image`` at ``box``, enlarge it (nearest) to fit a ``side`` square, pad white."""
    h, w = image.shape[:2]
    x0, y0 = int(np.clip(box[0], 0, w - 1)), int(np.clip(box[1], 0, h - 1))
    x1, y1 = int(np.clip(box[2], x0 + 1, w)), int(np.clip(box[3], y0 + 1, h))
    crop = upscale(image[y0:y1, x0:x1], max(1, side // max(y1 - y0, x1 - x0)))
    out = np.full((side, side, 3), 255, np.uint8)
    ch, cw = min(side, crop.shape[0]), min(side, crop.shape[1])
    top, left = (side - ch) // 2, (side - cw) // 2
    out[top:top + ch, left:left + cw] = crop[:ch, :cw]
    return out


def _blank(side: int) -> np.ndarray:
    """Placeholder where a prototype's source image is not available."""
    out = np.full((side, side, 3), GREY, np.uint8)
    idx = np.arange(side)
    out[idx, idx] = out[idx, side - 1 - idx] = (150, 150, 150)
    return out


def _fit(panel: np.ndarray, side: int) -> np.ndarray:
    """Pad (or crop) a panel to ``side`` rows so panels of other sizes line up in a row."""
    if panel.shape[0] >= side:
        return panel[:side]
    return np.pad(panel, ((0, side - panel.shape[0]), (0, 0), (0, 0)), constant_values=255)


def _row(panels: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    side = max(p.shape[0] for p in panels)
    parts = []
    for n, p in enumerate(panels):
        if n:
            parts.append(np.full((side, gap, 3), 255, np.uint8))
        parts.append(_fit(p, side))
    return np.concatenate(parts, axis=1)


def _source_panels(sources: PrototypeSources, j: int, side: int,
                   target: int = 192) -> list[np.ndarray]:
    """[the prototype's patch, its source image with the box], or placeholders."""
    rec, src = sources.record(j), sources.image(j)
    if rec is None or src is None:
        return [_blank(side), _blank(side)]
    box = sources.box(j)
    return [_patch(src, box, side), _big(src, box, target=target)]


def evidence_row(ev: Evidence, j: int, sources: PrototypeSources) -> np.ndarray:
    """One PNG row for prototype ``j`` on this image (see :data:`PANELS`)."""
    here = _big(ev.raw, ev.box(j))
    side = here.shape[0]
    heat = heatmap_overlay(upscale(ev.raw, _scale(ev.raw.shape[0])), ev.maps[j].numpy())
    return _row([here, *_source_panels(sources, j, side), heat])


# ----------------------------------------------------------------------------- local pages
def _proto_cell(model, j: int, gallery: bool) -> str:
    name = f"p{j} ({esc(model.class_names[int(model.prototype_class[j])])})"
    return f'<a href="{GALLERY}#proto-{j}">{name}</a>' if gallery else name


def _class_section(model, ev: Evidence, k: int, stem: str, out_dir: Path,
                   sources: PrototypeSources, gallery: bool) -> str:
    order = ev.ranking(k)
    shown, rest = order[:TOP_PROTOTYPES], order[TOP_PROTOTYPES:]
    weights = model.last_layer.weight.detach().float().cpu()
    rows = []
    for rank, j in enumerate(shown):
        name = f"{stem}_c{k}_r{rank}.png"
        save_png(out_dir / IMG / name, evidence_row(ev, j, sources))
        rows.append([str(rank + 1), _proto_cell(model, j, gallery),
                     _num(ev.similarities[j]), _num(weights[k, j]),
                     f'<span class="contribution">{_num(ev.contributions[k, j])}</span>',
                     img_tag(f"{IMG}/{name}", f"evidence of prototype {j} for class {k}")])
    others = float(ev.contributions[k, rest].sum()) if rest else 0.0
    rows.append(["", f"+ {len(rest)} others", "", "", f'<span class="others">{_num(others)}</span>',
                 "the other prototypes' contributions together"])
    rows.append(["", "= logit", "", "", f'<b class="logit">{_num(ev.logits[k])}</b>', ""])
    kind = "predicted" if k == ev.pred else "runner-up"
    heading = (f"<h2>{'Predicted' if k == ev.pred else 'Next'} class: "
               f"{esc(model.class_names[k])} (logit {_num(ev.logits[k])})</h2>")
    header = ["#", "prototype", "similarity", "weight", "contribution",
              "this image · prototype's patch · its source · similarity map"]
    return (f'<section class="evidence {kind}" id="class-{k}">{heading}'
            + table(header, rows) + "</section>")


def write_local_page(model, ev: Evidence, sources: PrototypeSources, out_dir: Path, stem: str,
                     title: str, label: int | None = None, mask: np.ndarray | None = None,
                     gallery: bool = False, index: bool = False) -> Path:
    """``out_dir/{stem}.html`` (+ ``img/{stem}_*.png``) explaining one image."""
    (out_dir / IMG).mkdir(parents=True, exist_ok=True)
    shown = ev.raw if mask is None else mask_outline(ev.raw, mask > 0.5)
    save_png(out_dir / IMG / f"{stem}_input.png", _big(shown))
    pred = ev.pred
    verdict = "" if label is None else (
        f" — true class <span class='{'ok' if pred == label else 'bad'}'>"
        f"{esc(model.class_names[label])}</span>")
    links = " · ".join(filter(None, ['<a href="index.html">report index</a>' if index else "",
                                     f'<a href="{GALLERY}">all prototypes</a>' if gallery else ""]))
    body = [f"<p>{links}</p>" if links else "",
            img_tag(f"{IMG}/{stem}_input.png", "the image"
                    + (" (ground-truth part outlined in red)" if mask is not None else "")),
            f"<p>Predicted class: <b>{esc(model.class_names[pred])}</b>{verdict}.</p>",
            "<p>Each class score is the sum over all prototypes of similarity &times; last-layer "
            "weight; below are the largest contributions to the top classes. Pictures, left to "
            "right: " + "; ".join(f"({n + 1}) {p}" for n, p in enumerate(PANELS)) + ".</p>",
            _sources_note(model, sources)]
    top = torch.argsort(ev.logits, descending=True, stable=True)[:TOP_CLASSES].tolist()
    body += [_class_section(model, ev, k, stem, out_dir, sources, gallery) for k in top]
    path = out_dir / f"{stem}.html"
    write_page(path, title, "\n".join(body))
    return path


def _sources_note(model, sources: PrototypeSources) -> str:
    if not sources.projected:
        return ("<p class='bad'>This model's prototypes were never projected onto training "
                "patches (no push provenance), so their patches cannot be shown.</p>")
    missing = [j for j in range(model.num_prototypes) if sources.image(j) is None]
    if not missing:
        return ""
    return (f"<p class='bad'>The source images of {len(missing)} of {model.num_prototypes} "
            "prototypes were not found (pass the training data, or keep the files at the paths "
            "recorded at push); their patches are shown as grey placeholders.</p>")


# ----------------------------------------------------------------------------- global gallery
@torch.no_grad()
def nearest_patch_boxes(model, dataset, k: int = NEAREST, batch_size: int = 128):
    """For every prototype its ``k`` nearest training images (one patch each, any class) and the
    evidence box of the prototype's similarity map on each: ``(distances [P, k],
    image_index [P, k], boxes [P][k])``."""
    from ..models.protopnet.push import nearest_images

    device = next(model.parameters()).device
    dist, index, _ = nearest_images(model, dataset, k, batch_size, device)
    dist, index = dist.cpu(), index.cpu()
    P, k = index.shape
    flat_i, flat_j = index.flatten(), torch.arange(P).repeat_interleave(k)
    unique = flat_i.unique()
    where = torch.full((len(dataset),), -1, dtype=torch.long)
    maps = None
    for start in range(0, len(unique), batch_size):
        ids = unique[start:start + batch_size]
        x = torch.stack([dataset[int(i)]["image"] for i in ids]).to(device)
        sim = model(x).similarity_maps.float().cpu()  # [b, P, h, w]
        maps = maps if maps is not None else torch.zeros(P * k, *sim.shape[-2:])
        where.fill_(-1)
        where[ids] = torch.arange(len(ids))
        hit = where[flat_i] >= 0
        maps[hit] = sim[where[flat_i[hit]], flat_j[hit]]
    if maps is None:  # an empty push set
        return dist, index, [[] for _ in range(P)]
    size = tuple(dataset.raw_image(0).shape[:2])
    boxes = evidence_boxes(maps, size, PERCENTILE)
    return dist, index, [boxes[j * k:(j + 1) * k] for j in range(P)]


@dataclass
class Neighbours:
    """The nearest training patches of every prototype, as the gallery shows them."""

    distances: torch.Tensor  # [P, k]
    index: torch.Tensor  # [P, k] into the push set
    boxes: list  # [P][k] evidence boxes
    labels: np.ndarray  # class of every push image
    names: list[str]  # file name of every push image


def write_gallery(model, data, out_dir: Path, sources: PrototypeSources, k: int = NEAREST) -> Path:
    """``out_dir/prototypes.html``: each prototype's source patch and its nearest patches."""
    (out_dir / IMG).mkdir(parents=True, exist_ok=True)
    push = data.push
    with fast_layout(model):
        dist, index, boxes = nearest_patch_boxes(model, push, k)
    near = Neighbours(dist, index, boxes, np.asarray(push.labels),
                      [Path(p).name for p in push.paths])
    first: dict = {}  # prototypes projected onto the same patch are duplicates of the first
    sections = []
    for c, cname in enumerate(model.class_names):
        protos = [j for j in range(model.num_prototypes) if int(model.prototype_class[j]) == c]
        cards = [_gallery_card(model, j, sources, push, near, first, out_dir) for j in protos]
        sections.append(f"<h2>Class {esc(cname)} ({len(protos)} prototypes)</h2>"
                        + ("".join(cards) or "<p>No prototypes (all pruned).</p>"))
    body = ('<p><a href="index.html">report index</a></p>'
            + f"<p>Each prototype: its source training image with the patch boxed and the "
            f"patch itself, then the {k} training patches nearest to it (one per image, any "
            "class; green frame: same class as the prototype, red: another class). Boxes are "
            "the region around the peak of the similarity map (its connected pixels at or "
            "above the map's 95th percentile). The projection distance is how far the "
            "prototype moved when it was projected onto its patch (its nearest patch of its "
            "class, or, where that patch was class-agnostic, its class's most specific one); "
            "the class specificity is the "
            "probability that an image of its class is nearer to it than an image of another "
            f"class (0.5: it matches every image alike; pruned below {MIN_SPECIFICITY}).</p>"
            + _sources_note(model, sources) + "\n".join(sections))
    path = out_dir / GALLERY
    write_page(path, f"Prototypes — {model.model_name} ({model.backbone.name})", body)
    return path


def _gallery_card(model, j: int, sources: PrototypeSources, push, near: Neighbours,
                  first: dict, out_dir: Path) -> str:
    c = int(model.prototype_class[j])
    nearest = []
    for i, box in zip(near.index[j].tolist(), near.boxes[j]):
        raw = push.raw_image(i)
        patch = _patch(raw, box, raw.shape[0] * _scale(raw.shape[0], GALLERY_PX))
        colour = GREEN if near.labels[i] == c else RED
        nearest.append(draw_box(patch, (0, 0, patch.shape[1], patch.shape[0]), colour, width=3))
    side = nearest[0].shape[0] if nearest else 192
    panels = _source_panels(sources, j, side, GALLERY_PX)[::-1] + [
        np.full((side, 3 * GAP, 3), 255, np.uint8)]
    name = f"proto_{j:04d}.png"
    save_png(out_dir / IMG / name, _row(panels + nearest))
    weight = float(model.last_layer.weight.detach()[c, j])
    rows = [[str(n + 1), esc(near.names[i]),
             f"<span class='{'ok' if near.labels[i] == c else 'bad'}'>"
             f"{esc(model.class_names[int(near.labels[i])])}</span>", _num(d)]
            for n, (i, d) in enumerate(zip(near.index[j].tolist(), near.distances[j].tolist()))]
    return (f'<div class="card" id="proto-{j}"><h3>Prototype p{j}</h3>'
            f"<p>{_provenance_line(sources.record(j), j, first)}; weight to its class "
            f"{_num(weight)}</p>"
            + img_tag(f"{IMG}/{name}", f"prototype {j} and its nearest patches")
            + table(["nearest", "training image", "class", "distance"], rows) + "</div>")


def _provenance_line(rec: dict | None, j: int, first: dict) -> str:
    if rec is None:
        return "not projected onto a training patch"
    source = Path(str(rec.get("image_path") or rec["image_index"])).name
    line = (f"source {esc(source)}, cell {esc(rec['cell'])}, projection distance "
            f"{_num(rec['distance'])}")
    if rec.get("projection") == "class-specific":
        line += (" (projected onto its class's most specific patch: its nearest patch, "
                 f"specificity {_num(rec.get('nearest_patch_specificity'))}, was class-agnostic)")
    specificity = rec.get("class_specificity")
    if specificity is not None:
        flag = ("" if specificity >= MIN_SPECIFICITY else
                " — <b class='bad'>class-agnostic: it matches other classes' images about as well "
                "as its own</b>")
        line += f", class specificity {_num(specificity)}{flag}"
    key = (rec.get("image_index"), tuple(rec.get("cell") or ()))
    if key in first:
        return line + f" — <b>the same patch as p{first[key]}</b> (a duplicate)"
    first[key] = j
    return line


# ----------------------------------------------------------------------------- full report
def write_evidence_report(model, data, out_dir: Path, metrics: dict, images=None,
                          count: int = 8) -> Path:
    """The ProtoPNet report: ``index.html`` (metrics, links), one local page per picked test
    image and per user image in ``images``, ``prototypes.html`` and the PNGs under ``img/``."""
    out_dir = Path(out_dir)
    (out_dir / IMG).mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        _write_pages(model, data, out_dir, metrics, images or [], count)
    finally:
        model.train(was_training)
    return out_dir / "index.html"


@contextlib.contextmanager
def fast_layout(model):
    """Channels-last weights for the gallery's pass over the push set (about 30% faster on a
    CPU), then the model as it was. Not for the local pages: their numbers must be exactly those
    of ``model(image[None])``."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None or conv.weight.is_contiguous(memory_format=torch.channels_last):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _write_pages(model, data, out_dir: Path, metrics: dict, images: list, count: int) -> None:
    from ..data.images import load_image_for_model
    from ..data.base import pick_examples

    size = data.image_size
    sources = PrototypeSources(model, data, size)
    test = data.test
    picked = pick_examples(test.labels, count)
    items = [test[i] for i in picked]
    loaded = [load_image_for_model(p, size, model.mean, model.std) for p in images]
    tensors = [it["image"] for it in items] + [t for t, _ in loaded]
    raws = [test.raw_image(i) for i in picked] + [r for _, r in loaded]
    evidence = explain(model, torch.stack(tensors), raws) if tensors else []
    rows, user_rows = [], []
    for n, ev in enumerate(evidence):
        user = n >= len(items)
        stem = f"user_{n - len(items):03d}" if user else f"image_{n:03d}"
        if user:
            file, label, mask = Path(images[n - len(items)]).name, None, None
        else:
            it = items[n]
            file, label = Path(it["path"]).name, int(it["label"])
            mask = it["mask"][0].numpy() if "mask" in it else None
        write_local_page(model, ev, sources, out_dir, stem, f"Evidence — {file}", label, mask,
                         gallery=True, index=True)
        cells = [f'<a href="{stem}.html">{img_tag(f"{IMG}/{stem}_input.png", file, 96)}</a>',
                 f'<a href="{stem}.html">{esc(file)}</a>', _class_span(model, ev.pred, label)]
        (user_rows if user else rows).append(cells + ([] if user else
                                                      [esc(model.class_names[label])]))
    write_gallery(model, data, out_dir, sources)
    body = (metrics_table(metrics)
            + f'<h2>Prototypes</h2><p><a href="{GALLERY}">Prototype gallery</a>: all '
              f"{model.num_prototypes} prototypes, their source patches and nearest training "
              "patches.</p><h2>Test images</h2><p>Why did the model decide what it did? Each "
              "page lists the prototypes that contributed most to the two top classes.</p>"
            + table(["image", "file", "predicted", "true"], rows)
            + (("<h2>Your images</h2>" + table(["image", "file", "predicted"], user_rows))
               if user_rows else ""))
    write_page(out_dir / "index.html",
               f"Evidence report — {model.model_name} ({model.backbone.name})", body)


def _class_span(model, pred: int, label: int | None) -> str:
    cls = "" if label is None else f" class='{'ok' if pred == label else 'bad'}'"
    return f"<span{cls}>{esc(model.class_names[pred])}</span>"


# ----------------------------------------------------------------------------- public API
def _as_input(model, image, size: int | None):
    """(normalised tensor [3, H, W], raw uint8 [H, W, 3]) from a path, PIL image, uint8 array or
    normalised tensor."""
    from PIL import Image

    from ..data import denormalize
    from ..data.images import load_image_for_model, to_rgb

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"expected a normalised image tensor [3, H, W], got "
                            f"{tuple(image.shape)}")
        return image.float().cpu(), denormalize(image, model.mean, model.std)
    if size is None:
        raise UserError("the model does not record its input size (metadata 'image_size'); pass "
                        "image_size=... or data=...")
    if isinstance(image, (str, Path)):
        return load_image_for_model(image, size, model.mean, model.std)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if not isinstance(image, Image.Image):
        raise UserError(f"cannot explain a {type(image).__name__}: give a file path, a PIL "
                        "image or a normalised tensor [3, H, W]")
    raw = np.asarray(to_rgb(image).resize((size, size), Image.BILINEAR), dtype=np.uint8).copy()
    mean = torch.as_tensor(model.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(model.std, dtype=torch.float32).view(3, 1, 1)
    return (torch.from_numpy(raw).permute(2, 0, 1).float() / 255.0 - mean) / std, raw


def evidence_report(model, image, out_dir, data=None, image_size: int | None = None) -> Path:
    """Explain one image: write ``out_dir/index.html`` (+ ``img/*.png``) and return its path.

    ``image`` is a file path, a PIL image (or uint8 array [H, W, 3]) or a normalised tensor
    [3, H, W]. Prototype patches come from ``data.push`` when ``data`` is given, otherwise from
    the source image paths recorded at push, when those files exist (the page says when not).
    """
    out_dir = Path(out_dir)
    size = image_size or (data.image_size if data is not None else None) \
        or model.metadata.get("image_size")
    tensor, raw = _as_input(model, image, size)
    was_training = model.training
    model.eval()
    try:
        (ev,) = explain(model, tensor[None], [raw])
        sources = PrototypeSources(model, data, size or raw.shape[0])
        name = Path(image).name if isinstance(image, (str, Path)) else "image"
        return write_local_page(model, ev, sources, out_dir, "index", f"Evidence — {name}")
    finally:
        model.train(was_training)
