"""ProtoPNet evidence: the report's numbers add up, its folder is self-contained and escaped, and
the prototype metrics give known answers on hand-made masks and boxes."""
from __future__ import annotations

import dataclasses
import html
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protozoo
from protozoo.backbones import backbone_normalization
from protozoo.data import build_data
from protozoo.outputs import PrototypeOutput
from protozoo.models.protopnet.push import apply_push, compute_push
from protozoo.render import evidence_report
from protozoo.render.evidence import write_evidence_report

SIZE = 32
MEAN, STD = backbone_normalization("tiny_cnn")  # the data normalised as the model expects
SCRIPT = "<script>alert(1)</script>"
ODD_FILE = 'odd&"<>.png'


def _pushed_model(data, class_names=None, seed=0):
    torch.manual_seed(seed)
    model = protozoo.create_model("protopnet", backbone="tiny_cnn",
                                  class_names=class_names or data.class_names,
                                  prototypes_per_class=3, prototype_dim=16)
    model.metadata["image_size"] = data.image_size
    apply_push(model, compute_push(model, data.push, batch_size=32))
    with torch.no_grad():  # a non-trivial last layer, so contributions have both signs
        model.last_layer.weight.add_(0.3 * torch.randn_like(model.last_layer.weight))
    return model.eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build_data("synthetic-parts", cache_dir=cache, num_classes=3, num_train=30,
                      num_test=9, image_size=SIZE, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def report(synthetic, tmp_path_factory):
    model = _pushed_model(synthetic)
    out = tmp_path_factory.mktemp("report") / "report"
    user = synthetic.test.paths[0]
    write_evidence_report(model, synthetic, out, {"accuracy": 0.5}, images=[user], count=3)
    return model, out


# ----------------------------------------------------------------------------- helpers
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(attrs.get("src"))
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


def _assert_self_contained(folder: Path) -> int:
    pages = sorted(folder.glob("*.html"))
    assert pages
    checked = 0
    for page in pages:
        refs = _refs(page)
        assert not {"script", "link", "iframe"} & set(refs.tags), page.name
        for src in refs.srcs:
            assert src and not re.match(r"^(/|[a-z]+:)", src), (page.name, src)
            assert (page.parent / src).is_file(), (page.name, src)
            checked += 1
        for href in refs.hrefs:
            target = href.split("#")[0]
            assert not re.match(r"^(/|[a-z]+:)", href), (page.name, href)
            assert not target or (page.parent / target).is_file(), (page.name, href)
    return checked


def _numbers(section: str, cls: str) -> list[float]:
    return [float(v) for v in re.findall(rf'class="{cls}">(-?\d+\.\d+)<', section)]


def _section(page: str, kind: str) -> str:
    match = re.search(rf'<section class="evidence {kind}".*?</section>', page, re.S)
    assert match, kind
    return match.group(0)


# ----------------------------------------------------------------------------- the numbers
def test_contributions_of_all_prototypes_sum_to_each_logit(synthetic):
    model = _pushed_model(synthetic)
    batch = torch.stack([synthetic.test[i]["image"] for i in range(len(synthetic.test))])
    with torch.no_grad():
        out = model(batch)
    contrib = model.contributions(out)
    assert contrib.shape == (len(batch), model.num_classes, model.num_prototypes)
    torch.testing.assert_close(contrib.sum(-1), out.logits, atol=1e-5, rtol=0)


def test_local_page_numbers_add_up_to_the_logit(report, synthetic):
    model, out = report
    from protozoo.evaluation import pick_examples

    picked = pick_examples(synthetic.test.labels, 3)
    for n, index in enumerate(picked):
        page = (out / f"image_{n:03d}.html").read_text()
        with torch.no_grad():
            logits = model(synthetic.test[index]["image"][None]).logits[0]
        pred = int(logits.argmax())
        for kind in ("predicted", "runner-up"):
            section = _section(page, kind)
            shown = _numbers(section, "contribution")
            others = _numbers(section, "others")
            (logit,) = _numbers(section, "logit")
            assert len(shown) == min(5, model.num_prototypes) and len(others) == 1
            # 5 shown + 1 rest, each rounded to 4 decimals
            assert abs(sum(shown) + others[0] - logit) <= 6 * 0.5e-4 + 1e-6
            assert shown == sorted(shown, reverse=True)
        predicted = _section(page, "predicted")
        assert f'id="class-{pred}"' in predicted
        assert abs(_numbers(predicted, "logit")[0] - float(logits[pred])) <= 0.5e-4 + 1e-6


# ----------------------------------------------------------------------------- the folder
def test_every_image_in_every_page_exists(report):
    _, out = report
    names = {p.name for p in out.glob("*.html")}
    assert {"index.html", "prototypes.html", "image_000.html", "user_000.html"} <= names
    assert _assert_self_contained(out) > 20
    gallery = (out / "prototypes.html").read_text()
    model = report[0]
    for j in range(model.num_prototypes):
        assert f'id="proto-{j}"' in gallery
    # every PNG written is used by some page, and 32 px images are upscaled (x6 -> 192 px)
    used = {src for p in out.glob("*.html") for src in _refs(p).srcs}
    assert {f"img/{p.name}" for p in (out / "img").glob("*.png")} == used
    assert Image.open(out / "img" / "image_000_input.png").size == (192, 192)


def test_report_folder_still_works_when_copied(report, tmp_path):
    _, out = report
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    assert _assert_self_contained(moved) > 20
    text = "".join(p.read_text() for p in moved.glob("*.html"))
    assert str(out) not in text  # no absolute path to the original folder


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """A folder dataset whose class folders and file names need escaping."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for cls in ("<script>alert(1)", "plain"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                name = ODD_FILE if i == 0 else f"{i}.png"
                pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / name)
    return build_data("folder", data_dir=root, image_size=SIZE, mean=MEAN, std=STD)


def test_class_and_file_names_are_escaped(odd_folder, tmp_path):
    assert odd_folder.class_names == ["<script>alert(1)", "plain"]
    # the checkpoint's class names are what the report prints; one carries a full script tag
    model = _pushed_model(odd_folder, class_names=[SCRIPT, "plain"])
    out = tmp_path / "report"
    (odd,) = [p for p in odd_folder.test.paths if p.endswith(ODD_FILE)][:1]
    write_evidence_report(model, odd_folder, out, {"<b>metric</b>": 1.0}, images=[odd], count=4)
    pages = {p.name: p.read_text() for p in out.glob("*.html")}
    assert len(pages) >= 4
    everything = "".join(pages.values())
    assert "<script" not in everything.lower()
    assert html.escape(SCRIPT) in everything
    assert ODD_FILE not in everything
    assert html.escape(ODD_FILE) in everything
    assert "<b>metric" not in everything
    for name in ("index.html", "prototypes.html", "user_000.html"):
        assert html.escape(SCRIPT) in pages[name] and "alert(1)</script>" not in pages[name]
    _assert_self_contained(out)


# ----------------------------------------------------------------------------- public API
def test_evidence_report_for_one_image_in_every_form(synthetic, tmp_path):
    model = _pushed_model(synthetic)
    path = synthetic.test.paths[1]
    tensor = synthetic.test[1]["image"]
    for n, image in enumerate([path, Image.open(path), tensor]):
        page = evidence_report(model, image, tmp_path / f"r{n}")
        assert page == tmp_path / f"r{n}" / "index.html"
        text = page.read_text()
        assert "grey placeholders" not in text  # sources found from the recorded paths
        _assert_self_contained(page.parent)
    # the same picture whatever the input form (decoded file, PIL image, denormalised tensor)
    first = np.asarray(Image.open(tmp_path / "r0" / "img" / "index_input.png")).astype(int)
    for n in (1, 2):
        other = np.asarray(Image.open(tmp_path / f"r{n}" / "img" / "index_input.png"))
        assert other.shape == first.shape == (192, 192, 3)
        assert np.abs(other - first).max() <= 1


def test_evidence_report_says_when_prototype_sources_are_missing(synthetic, tmp_path):
    model = _pushed_model(synthetic)
    model.metadata["prototypes"] = [dict(r, image_path=str(tmp_path / "gone" / "x.png"),
                                         image_index=10**6)
                                    for r in model.metadata["prototypes"]]
    page = evidence_report(model, synthetic.test[0]["image"], tmp_path / "r").read_text()
    assert "were not found" in page
    # with the data the sources come from the push set again (matched by class folder/name)
    model2 = _pushed_model(synthetic)
    page2 = evidence_report(model2, synthetic.test[0]["image"], tmp_path / "r2",
                            data=synthetic).read_text()
    assert "were not found" not in page2
    # a model that was never pushed has no patches to show, and says so
    model2.metadata.pop("prototypes")
    page3 = evidence_report(model2, synthetic.test[0]["image"], tmp_path / "r3").read_text()
    assert "never projected" in page3
    _assert_self_contained(tmp_path / "r3")


def test_unreadable_user_image_is_a_one_line_data_error(synthetic, tmp_path):
    model = _pushed_model(synthetic)
    with pytest.raises(protozoo.DataError, match="not found"):
        evidence_report(model, tmp_path / "missing.png", tmp_path / "r")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(protozoo.DataError, match="cannot read image"):
        evidence_report(model, bad, tmp_path / "r")


def test_report_dispatch_and_metrics_through_evaluation(synthetic, tmp_path):
    from protozoo.evaluation import test_metrics
    from protozoo.render.reports import write_report

    model = _pushed_model(synthetic)
    metrics = test_metrics(model, synthetic.test, 8, torch.device("cpu"))
    metrics.update(model.dataset_metrics(synthetic))
    assert 0.0 <= metrics["evidence_on_part"] <= 1.0
    assert 0.0 <= metrics["prototype_purity"] <= 1.0
    small = dataclasses.replace(synthetic, test=synthetic.test.subset([0, 1]))  # 2 local pages
    page = write_report(model, small, tmp_path / "report", metrics)
    assert page.name == "index.html" and "prototype_purity" in page.read_text()
    assert (tmp_path / "report" / "prototypes.html").is_file()


# ----------------------------------------------------------------------------- metrics
def _output(logits, sims, maps):
    return PrototypeOutput(logits=logits, stride=4, features=torch.zeros(1),
                           distances=-maps, min_distances=-sims, similarities=sims,
                           similarity_maps=maps)


def _two_prototype_model():
    model = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=2,
                                  prototypes_per_class=1, prototype_dim=4)
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.eye(2))
    return model


def test_evidence_on_part_uses_the_top_prototype_of_the_predicted_class():
    # 2 classes, 2 prototypes (p0 -> class 0, p1 -> class 1), 16 px images, 4x4 maps
    maps = torch.zeros(3, 2, 4, 4)
    maps[:, 0, 0, 0] = 1.0  # p0 always fires in the top-left cell
    maps[:, 1, 3, 3] = 1.0  # p1 always fires in the bottom-right cell
    sims = torch.tensor([[2.0, 1.0], [1.0, 2.0], [2.0, 1.0]])
    logits = sims.clone()  # image 0 and 2 -> class 0 (p0), image 1 -> class 1 (p1)
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, :4, :4] = 1  # part top-left: p0's patch is on it
    masks[1, 0, :4, :4] = 1  # part top-left, but the evidence (p1) is bottom-right
    masks[2, 0, 12:, 12:] = 1  # part bottom-right; the class-1 prototype would hit, p0 does not
    out = _two_prototype_model().explanation_metrics(_output(logits, sims, maps), {"mask": masks})
    torch.testing.assert_close(out["evidence_on_part"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["evidence_on_part_chance"], torch.full((3,), 16 / 256))
    # the 5 px region around the peak (pixel (1, 1) or so): mostly on the 4x4 part in image 0
    assert out["evidence_region_on_part"][0] > 0.3 and out["evidence_region_on_part"][1] == 0
    # relevance mass: the predicted class's evidence map is its own prototype's map
    assert out["evidence_relevance_mass"][0] > 0.7 and out["evidence_relevance_mass"][1] < 0.05


def test_evidence_map_is_the_weighted_sum_of_similarity_maps():
    model = _two_prototype_model()
    with torch.no_grad():
        model.last_layer.weight.copy_(torch.tensor([[1.0, -0.5], [0.25, 2.0]]))
    maps = torch.rand(2, 2, 3, 3)
    sims = maps.flatten(2).amax(2)
    out = _output(sims @ model.last_layer.weight.t(), sims, maps)
    ev = model.evidence_maps(out, torch.tensor([0, 1]))
    torch.testing.assert_close(ev[0], maps[0, 0] - 0.5 * maps[0, 1])
    torch.testing.assert_close(ev[1], 0.25 * maps[1, 0] + 2.0 * maps[1, 1])
    # at a prototype's best cell its term is exactly its contribution to the class
    contributions = model.contributions(out)
    j_best = maps[0, 0].flatten().argmax()
    torch.testing.assert_close(maps[0, 0].flatten()[j_best] * model.last_layer.weight[0, 0],
                               contributions[0, 0, 0])


def test_gallery_line_says_when_a_prototype_was_moved_to_a_class_specific_patch():
    from protozoo.render.evidence import _provenance_line
    record = {"image_path": "train/a/<x>.png", "image_index": 3, "cell": [2, 5],
              "distance": 1.5, "class_specificity": 0.97, "projection": "class-specific",
              "nearest_patch_specificity": 0.5}
    line = _provenance_line(record, 0, {})
    assert "&lt;x&gt;.png" in line and "<x>" not in line  # file names are escaped
    assert "most specific patch" in line and "specificity 0.5000, was class-agnostic" in line
    plain = _provenance_line({**record, "projection": "nearest"}, 1, {})
    assert "most specific patch" not in plain
