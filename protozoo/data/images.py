"""Decoding one image file (plus its optional mask and box) into fixed-size arrays.

Every loader (image folders, CUB, the synthetic set read back from disk) goes through
:func:`decode_sample`, so the rules are the same everywhere: images become RGB (alpha composited
onto white, so a transparent background does not turn black), are resized bilinearly to a square,
masks are resized with nearest neighbour (a mask must stay binary), and boxes are scaled with the
same factors as the image. Errors name the file and the fix, because a bad file among thousands is
otherwise hard to find.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from protozoo.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Exceptions PIL raises for unreadable, truncated or absurdly large files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Decoded:
    """One decoded sample at the dataset's resolution."""

    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray | None  # uint8 [S, S] in {0, 1}
    box: np.ndarray | None  # float32 [4] xyxy in resized pixels, exclusive x1/y1
    converted: bool  # the file was not RGB and had to be converted


def unreadable(path, err) -> DataError:
    """The one message for a file PIL cannot decode (also used by the header scan)."""
    if isinstance(err, FileNotFoundError):
        return DataError(f"image '{path}' not found: restore the file or remove it from the "
                         "dataset")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"cannot read image '{path}' ({detail}): delete or re-export the file")


def to_rgb(im: Image.Image) -> Image.Image:
    """Return an RGB copy; transparent pixels become white rather than black."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        # A palette may carry transparency; going through RGBA keeps it.
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # 16/32-bit grayscale: PIL's convert would clip to 255; rescale to 8 bits instead.
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")


def header_mode(path) -> str:
    """Read only the header (cheap) so a lazily loaded dataset can still count conversions."""
    try:
        with Image.open(path) as im:
            return im.mode
    except _PIL_ERRORS as err:
        raise unreadable(path, err) from None


def header_size(path) -> tuple[int, int]:
    """``(width, height)`` from the header alone (no pixels decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except _PIL_ERRORS as err:
        raise unreadable(path, err) from None


def scale_box(box, orig_size, image_size: int, crop=None) -> np.ndarray:
    """Map an xyxy box in original pixels to the resized (and optionally cropped) image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = orig_size
    if crop is not None:
        cx0, cy0, cx1, cy1 = crop
        x0, x1 = x0 - cx0, x1 - cx0
        y0, y1 = y0 - cy0, y1 - cy0
        width, height = cx1 - cx0, cy1 - cy0
    sx, sy = image_size / width, image_size / height
    out = np.array([x0 * sx, y0 * sy, x1 * sx, y1 * sy], dtype=np.float32)
    return np.clip(out, 0.0, float(image_size))


def _load_mask(mask_path, image_path, size, image_size: int, crop) -> np.ndarray:
    """Binary mask at the dataset resolution; its size must match the image it annotates."""
    try:
        with Image.open(mask_path) as m:
            m.load()
            if m.size != size:
                raise DataError(
                    f"mask '{mask_path}' is {m.size[0]}x{m.size[1]} but image '{image_path}' is "
                    f"{size[0]}x{size[1]}: re-export the mask at the image's size"
                )
            gray = m.convert("L")
    except _PIL_ERRORS as err:
        raise unreadable(mask_path, err) from None
    if crop is not None:
        gray = gray.crop(crop)
    gray = gray.resize((image_size, image_size), Image.NEAREST)
    return (np.asarray(gray) > 127).astype(np.uint8)


def decode_sample(path, image_size: int, *, mask_path=None, box=None, crop=None) -> Decoded:
    """Decode, convert and resize one image (+ mask, + box).

    ``crop`` (xyxy, original pixels, clipped to the image) is applied before resizing; CUB uses it
    for crop-to-box.
    ``.load()`` is called explicitly so that truncated files fail here, with the file named, and
    not later inside a DataLoader worker.
    """
    try:
        with Image.open(path) as im:
            im.load()
            converted = im.mode != "RGB"
            size = im.size
            rgb = to_rgb(im)
            if crop is not None:
                crop = clip_crop(crop, size)
                rgb = rgb.crop(crop)
            rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
            image = np.asarray(rgb, dtype=np.uint8).copy()
    except _PIL_ERRORS as err:
        raise unreadable(path, err) from None
    mask = None if mask_path is None else _load_mask(mask_path, path, size, image_size, crop)
    scaled = None if box is None else scale_box(box, size, image_size, crop)
    return Decoded(image=image, mask=mask, box=scaled, converted=converted)


def clip_crop(box, size) -> tuple[int, int, int, int]:
    """Integer crop rectangle covering ``box`` inside an image of ``size`` (at least 1x1)."""
    width, height = size
    x0 = int(np.clip(np.floor(box[0]), 0, width - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, height - 1))
    x1 = int(np.clip(np.ceil(box[2]), x0 + 1, width))
    y1 = int(np.clip(np.ceil(box[3]), y0 + 1, height))
    return x0, y0, x1, y1


def load_image_for_model(path, image_size: int, mean, std):
    """One user image as a model input: ``(tensor float32 [3, S, S] normalised, raw uint8
    [S, S, 3])``, decoded by the loaders' rules (RGB, alpha onto white, bilinear resize).

    A missing or unreadable file raises a one-line :class:`DataError` naming it.
    """
    import os

    import torch

    if not os.path.isfile(path):
        raise DataError(f"image '{path}' not found (or not a file): check the path")
    raw = decode_sample(path, int(image_size)).image
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    tensor = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255.0 - mean_t) / std_t
    return tensor, raw
