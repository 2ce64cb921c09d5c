"""The evidence report in a real browser (headless Chromium): pages render and no image is broken.

Skipped unless ``chromium`` is on PATH (Debian: ``apt-get install -y chromium``). Each page is
checked through a copy with a small script appended that, on ``load``, lists the images the
browser could not decode (``naturalWidth == 0``) into the DOM, which ``--dump-dom`` prints. The
report itself never contains a script.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protozoo
from protozoo.backbones import backbone_normalization
from protozoo.data import build_data
from protozoo.models.protopnet.push import apply_push, compute_push
from protozoo.render.evidence import write_evidence_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK = """<script>
window.addEventListener("load", function () {
  var bad = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) bad.push(im.getAttribute("src"));
  }
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = "images=" + document.images.length + " broken=" + bad.length + " "
    + bad.join(",");
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    mean, std = backbone_normalization("tiny_cnn")
    data = build_data("synthetic-parts", cache_dir=tmp_path_factory.mktemp("cache"),
                      num_classes=3, num_train=24, num_test=6, image_size=32, mean=mean, std=std)
    torch.manual_seed(0)
    model = protozoo.create_model("protopnet", backbone="tiny_cnn", class_names=data.class_names,
                                  prototypes_per_class=2, prototype_dim=16).eval()
    model.metadata["image_size"] = data.image_size
    apply_push(model, compute_push(model, data.push))
    out = tmp_path_factory.mktemp("report") / "report"
    write_evidence_report(model, data, out, {"accuracy": 0.5}, count=2)
    # check a copy moved elsewhere, so the pages must stand on their own
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    return moved


def _chromium(tmp_path: Path, *args: str) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _image_check(report: Path, page: str, tmp_path: Path, extra: str = "") -> tuple[int, int, str]:
    """(images, broken, broken srcs) of ``page`` as Chromium loads it."""
    text = (report / page).read_text()
    assert "<script" not in text
    probe = report / f"__check_{page}"
    probe.write_text(text.replace("</body>", extra + CHECK + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    probe.unlink()
    match = re.search(r"images=(\d+) broken=(\d+) ([^<]*)", dom)
    assert match, dom[-2000:]
    return int(match.group(1)), int(match.group(2)), match.group(3)


@pytest.mark.parametrize("page", ["index.html", "image_000.html", "prototypes.html"])
def test_no_broken_images_in_chromium(report, page, tmp_path):
    images, broken, srcs = _image_check(report, page, tmp_path)
    assert images > 0
    assert broken == 0, srcs


def test_the_check_sees_a_broken_image(report, tmp_path):
    images, broken, srcs = _image_check(report, "image_000.html", tmp_path,
                                        extra='<img src="img/missing.png" alt="">')
    assert broken == 1 and "missing.png" in srcs


def test_local_page_renders(report, tmp_path):
    shot = tmp_path / "page.png"
    _chromium(tmp_path, "--window-size=1200,900", f"--screenshot={shot}",
              (report / "image_000.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text and pictures, not blank
