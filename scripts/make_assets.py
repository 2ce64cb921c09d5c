"""Regenerate ``assets/``: the pictures the README and docs show, taken from evaluated runs.

    python train.py --dataset synthetic-birds --seed 0 --out runs/protopnet-birds
    python train.py --model cam --seed 0 --out runs/cam-parts
    python scripts/make_assets.py --protopnet runs/protopnet-birds --cam runs/cam-parts

writes ``assets/evidence.png`` (the top of a "this looks like that" page), ``assets/gallery.png``
(the top of the prototype gallery), ``assets/curves.png`` (the ProtoPNet run's training curves)
and ``assets/cams.png`` (the top third of the CAM report's grid). The two pages are screenshots taken by headless
Chromium when it is installed; without it the evidence picture is the page's first row PNG and
the gallery is skipped (said on the console).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

MAX_WIDTH = 1000  # px: pictures are shrunk to this width to keep the repository small


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                None)


def _screenshot(browser: str, page: Path, out: Path, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
                        f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        _save(Image.open(shot), out)


def _save(image: Image.Image, out: Path) -> None:
    image = image.convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)),
                             Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # ~3x smaller
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def _report(run: Path, page: str) -> Path:
    path = run / "report" / page
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: evaluate the run first "
                         f"(python evaluate.py {run})")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protopnet", type=Path, required=True, help="an evaluated ProtoPNet run")
    p.add_argument("--cam", type=Path, required=True, help="an evaluated CAM run")
    p.add_argument("--out", type=Path, default=Path("assets"))
    args = p.parse_args(argv)
    page, gallery = _report(args.protopnet, "image_000.html"), _report(args.protopnet,
                                                                        "prototypes.html")
    cams = _report(args.cam, "cams.png")
    browser = _browser()
    if browser:
        _screenshot(browser, page, args.out / "evidence.png", (1300, 1000))
        _screenshot(browser, gallery, args.out / "gallery.png", (1300, 900))
    else:
        print("note: no Chromium found: evidence.png is the first evidence row, no gallery.png")
        rows = sorted((args.protopnet / "report" / "img").glob("image_000_c*_r0.png"))
        _save(Image.open(rows[0]), args.out / "evidence.png")
    _save(Image.open(args.protopnet / "curves.png"), args.out / "curves.png")
    grid = Image.open(cams)
    _save(grid.crop((0, 0, grid.width, grid.height // 3)), args.out / "cams.png")  # 2 of 6 rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
