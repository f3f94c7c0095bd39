"""Image helpers shared by both stages: reading any file as RGB, tensors <-> PIL, grids."""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torchvision.utils import make_grid

from vqgpt.ground.file_index import IMAGE_EXTENSIONS  # noqa: F401  (the file types read as images; kept here too)
from vqgpt.ground.files import replace_when_whole


GREY_BLOCK = 1 << 22  # pixels of a high-bit-depth grey picture converted at a time


def _row_blocks(arr: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, that block of ``arr`` as float64), about GREY_BLOCK pixels each: a 13000 x 13000 16-bit PNG
    (360 KB) took 5 GB as whole-picture float64 temporaries."""
    step = max(1, GREY_BLOCK // max(1, int(np.prod(arr.shape[1:]))))
    for start in range(0, arr.shape[0], step):
        rows = slice(start, start + step)
        yield rows, arr[rows].astype(np.float64)


def _finite_range(arr: np.ndarray, zero_for_others: bool) -> tuple[float, float] | None:
    """(min, max) of ``arr``'s finite values (with non-finite ones read as 0 where ``zero_for_others``), a
    block at a time; None when there is none."""
    lo, hi = math.inf, -math.inf
    for _, block in _row_blocks(arr):
        finite = np.isfinite(block)
        block = np.where(finite, block, 0.0) if zero_for_others else block[finite]
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return None if lo > hi else (lo, hi)


def _grey_to_l(arr: np.ndarray, peak: float | None) -> Image.Image:
    """A grey array -> 8-bit 'L': ``arr / peak`` read as [0, 1] (clipped), or, with no ``peak``,
    stretched from its own minimum to maximum. Non-finite values count as 0. Converted a block of rows
    at a time (the same values as the whole array at once)."""
    lo = 0.0
    if peak is None:
        lo, hi = _finite_range(arr, zero_for_others=True) or (0.0, 0.0)
        peak = max(hi - lo, 1e-12)
    out = np.empty(arr.shape, np.uint8)
    for rows, block in _row_blocks(arr):
        block = np.where(np.isfinite(block), block, 0.0)
        if lo:
            block = block - lo
        out[rows] = np.clip(block / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited over white, palette expanded, high bit depths scaled to 8.

    Grey levels keep their meaning: the scale comes from the mode, never from the image's own
    brightest pixel, so a dark image stays dark.

    - 'I;16', 'I;16B', 'I;16L' are 16-bit: divided by 65535.
    - 'I' (32-bit int) is read as 16-bit when every value lies in 0..65535 (older Pillow opens
      16-bit PNGs as 'I'; Pillow 12 opens them as 'I;16'); other values have no known scale, so
      the image is stretched from its minimum to its maximum.
    - 'F' (float): values in [0, 1] are read as such; an image with values outside [0, 1] has no
      known scale and is stretched from its minimum to its maximum.
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF / multi-page TIFF: first frame
    if img.mode.startswith("I;16"):
        img = _grey_to_l(np.asarray(img), 65535.0)
    elif img.mode == "I":
        arr = np.asarray(img)
        fits_16_bit = arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)
        img = _grey_to_l(arr, 65535.0 if fits_16_bit else None)
    elif img.mode == "F":
        arr = np.asarray(img)
        finite = _finite_range(arr, zero_for_others=False)
        in_unit_range = finite is None or (finite[0] >= 0 and finite[1] <= 1)
        img = _grey_to_l(arr, 1.0 if in_unit_range else None)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def check_pixel_limit(height: int, width: int, given: str, verb: str = "give", what: str = "images",
                      advice: str = "choose a smaller size (or raise that limit first)") -> None:
    """Refuse images over PIL's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``, its guard against decompression
    bombs, which would refuse to read them back) before any work: ``given`` names what asked for them (a
    canvas of 10**9 columns failed in an allocation after loading, a reconstruct at 100000 px was killed
    for memory), ``what`` what they are, ``advice`` what to do instead. Raising PIL's limit (None: no limit)
    raises this one."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        raise ValueError(f"{given} {verb} {height}x{width}-pixel {what} ({height * width:,} pixels), more than "
                         f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,}, the largest image PIL reads without calling it "
                         f"a decompression bomb: {advice}")


def open_image(path: str | Path) -> Image.Image:
    """``Image.open(path)``, with Pillow's DecompressionBombWarning (a picture over ``Image.MAX_IMAGE_PIXELS``, up
    to twice it) naming the file, which Pillow's does not: in a folder of many images it could not be found.
    In the main thread only (a DataLoader worker is a process's main thread): catching warnings swaps the
    process's warning filters, which another thread could be using at that moment."""
    if threading.current_thread() is not threading.main_thread():
        return Image.open(path)
    with warnings.catch_warnings(record=True) as caught:
        img = Image.open(path)
    for seen in caught:  # said again, the bomb warning with the file's name
        if issubclass(seen.category, Image.DecompressionBombWarning):
            warnings.warn(f"{path}: {seen.message}", seen.category, stacklevel=2)
        else:
            warnings.warn_explicit(seen.message, seen.category, seen.filename, seen.lineno, source=seen.source)
    return img


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB (fully decoded, so a truncated file fails here, not later)."""
    with open_image(path) as img:
        img.load()
        return _upright_rgb(img)


def _upright_rgb(img: Image.Image) -> Image.Image:
    """A loaded picture as RGB, upright: phone photos store their rotation in EXIF, applied here."""
    return to_rgb(ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img)


# Fitting a picture to a size resizes its shorter side, then crops the middle. A picture far longer than
# it is wide (a 1 x 2,000,000 px strip) grew to the size times its aspect ratio first: tens of gigabytes
# for a 6 KB file. Its long side is therefore cut (in the middle) to at most MAX_ASPECT times its short
# side first, which leaves the fitted result of every picture within that ratio exactly as it was.
MAX_ASPECT = 8
# Pictures with more pixels than this are decoded at a reduced scale (JPEG) or shrunk in Pillow (by a whole
# factor, 8-bit) before the exact antialiased resize, keeping at least twice the target's pixels on the
# short side: a 12000 x 12000 upload took 5 GB and half a minute as float32, for a picture of a few hundred
# pixels. Smaller ones are fitted exactly as before.
FIT_SHRINK_PIXELS = 4096 * 4096


def crop_aspect(img: Image.Image, ratio: float = MAX_ASPECT) -> Image.Image:
    """``img`` with its longer side cut in the middle to at most ``ratio`` times its shorter side."""
    width, height = img.size
    limit = max(1, int(min(width, height) * ratio))
    if width > limit:
        left = (width - limit) // 2
        return img.crop((left, 0, left + limit, height))
    if height > limit:
        top = (height - limit) // 2
        return img.crop((0, top, width, top + limit))
    return img


def open_fitted(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file fitted to ``height`` x ``width`` -> (3, height, width) in [-1, 1]: resized (Pillow's
    bicubic) to the smallest size that covers the target, then the middle cropped; for a square target that is the
    shorter side resized. (A non-square target was given its shorter side only and the rest padded with
    grey.) Memory is bounded by the target rather than the file: a large JPEG is decoded at a reduced
    scale, a very long picture cut to ``MAX_ASPECT`` first, a very large one shrunk in 8-bit first."""
    from torchvision.transforms.v2 import functional as TF

    with open_image(path) as img:
        if img.format == "JPEG" and img.size[0] * img.size[1] > FIT_SHRINK_PIXELS:
            # decoded at 1/2, 1/4 or 1/8 scale where that still leaves twice the target (either way up:
            # the EXIF rotation comes after)
            scale = min(1.0, 2 * max(height, width) / max(1, min(img.size)))
            img.draft("RGB", (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
        img.load()
        picture = _upright_rgb(img)
    picture = crop_aspect(picture, max(MAX_ASPECT, max(height, width) / min(height, width)))
    cover = max(height / picture.size[1], width / picture.size[0])  # the scale at which it covers the target
    factor = min(picture.size[1] // (2 * height), picture.size[0] // (2 * width))  # (whole numbers: exact)
    if picture.size[0] * picture.size[1] > FIT_SHRINK_PIXELS and factor >= 2:
        picture = picture.reduce(factor)
        cover = max(height / picture.size[1], width / picture.size[0])
    # Pillow's bicubic, in 8 bits, as the datasets fit a picture (dataset_base.image_transform): for a square
    # target these are the very pixels `reconstruct` and `encode` read from the file, so its codes are the
    # ones the prior was trained on (torchvision's bilinear on floats moved up to a quarter of the codes)
    w, h = picture.size
    if height == width:  # the shorter side to the target, the longer one as torchvision's Resize sizes it
        size = (height, int(height * w / h)) if h <= w else (int(height * h / w), height)
    else:
        size = (max(height, round(h * cover)), max(width, round(w * cover)))
    return TF.center_crop(pil_to_tensor(picture.resize(size[::-1], Image.BICUBIC)), [height, width])


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 in [0, 255], same shape."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    return Image.fromarray(tensor_to_uint8(image).permute(1, 2, 0).numpy())


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save one (3, H, W) image in [-1, 1] as PNG, written whole (a failed write leaves no cut-off file)."""
    pil = tensor_to_pil(image)
    return replace_when_whole(path, lambda tmp: pil.save(tmp, format="PNG"))


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> one PIL grid image, ``nrow`` images per row."""
    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=max(1, nrow), padding=padding,
                     normalize=True, value_range=(-1, 1), pad_value=1.0)
    return Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def grid_pixels(count: int, height: int, width: int, nrow: int = 8, padding: int = 2) -> tuple[int, int]:
    """Pixel size (H, W) of ``image_grid``'s picture of ``count`` images of height x width, ``nrow`` a row."""
    columns = max(1, min(nrow, count))
    rows = -(-count // columns)
    return rows * (height + padding) + padding, columns * (width + padding) + padding


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8,
              row_labels: Sequence[str] | None = None) -> Path:
    """Save a grid PNG of (B, 3, H, W) images in [-1, 1], optionally labelling each row on the left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, nrow=nrow)
    if row_labels:
        width = 8 + 7 * max(len(s) for s in row_labels)
        canvas = Image.new("RGB", (grid.width + width, grid.height), (255, 255, 255))
        canvas.paste(grid, (width, 0))
        draw = ImageDraw.Draw(canvas)
        step = grid.height / max(1, len(row_labels))
        for i, label in enumerate(row_labels):
            draw.text((4, int(step * i + step / 2 - 5)), str(label), fill=(0, 0, 0))
        grid = canvas
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: not an image file name PIL can write (.png, .jpg, ...)")
    replace_when_whole(path, lambda tmp: grid.save(tmp, format=image_format))  # an earlier image stays whole
    return path


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave two (B, 3, H, W) batches as pairs (orig, recon) for a comparison grid: (2B, 3, H, W)."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shape mismatch: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
