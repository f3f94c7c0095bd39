"""`vqgpt app`: a local web page to sample, complete and reconstruct images with a pipeline.

The work is done by ``AppHandlers``, plain methods on plain values (numbers, strings, file paths,
PIL images) that the page calls and tests call directly. Gradio is an optional extra
(``pip install "vqgpt[app]"``), imported only when the page is built.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import numbers
import os
import socket
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from stage2_prior.draw import CFG_SCHEDULES, SamplingConfig
from vqgpt.ground.images import open_fitted, open_rgb, pil_to_tensor, tensor_to_pil
from vqgpt.ground.metrics import code_histogram, codebook_stats, psnr
from vqgpt.workflow.pipeline import INDEX_PREFIX, VQGPTPipeline

INSTALL_HINT = 'pip install "vqgpt[app]"'
GOLDEN = (math.sqrt(5) - 1) / 2  # hue step between neighbouring code indices: far apart on the colour wheel
PICTURE_SIDE = 256  # code-grid pictures are drawn at least this many pixels wide, whatever the grid
CACHE_SWEEP = (3600, 6 * 3600)  # (every N s, files older than M s): the page's pictures in gradio's cache
USAGE_BINS = 512  # at most this many bars in a codebook-usage picture (larger codebooks are binned)

# Samples are often a few dozen pixels: show each pixel as a sharp square, not a blur. A gallery keeps
# a tall fixed box even for one row of images: let it be as tall as its images.
PAGE_CSS = ("img { image-rendering: pixelated; } .gallery-box .grid-wrap { min-height: 0; height: auto; } "
            ".enlarge img { width: 100%; height: 100%; object-fit: contain; }")

Images = list[tuple[Image.Image, str]]  # a gallery: (image, caption) pairs


def require_gradio() -> Any:
    """The gradio module, or one clear error saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page reports nothing to anyone
    try:
        import gradio
    except ImportError as exc:
        raise MissingExtra(f"vqgpt app needs Gradio, which is not installed ({exc}): {INSTALL_HINT}") from None
    return gradio


class MissingExtra(ValueError):
    """An optional dependency is missing; the message says which extra to install."""


# ----------------------------------------------------------------------------- pictures


def code_colors(codes: np.ndarray) -> np.ndarray:
    """Integer codes (any shape) -> RGB uint8 (..., 3): one colour per code index, neighbours far apart."""
    hue = ((codes.astype(np.float64) * GOLDEN) % 1.0 * 255).astype(np.uint8)
    hsv = np.stack([hue, np.full_like(hue, 170), np.full_like(hue, 235)], axis=-1)
    flat = Image.fromarray(hsv.reshape(-1, 1, 3), mode="HSV").convert("RGB")
    return np.asarray(flat).reshape(*codes.shape, 3)


def code_grid_picture(codes: torch.Tensor) -> Image.Image:
    """A code grid (h, w) as a picture: one coloured cell per code, its index written in when it fits."""
    grid = codes.detach().cpu().numpy()
    h, w = grid.shape
    cell = max(1, math.ceil(PICTURE_SIDE / max(h, w)))
    picture = Image.fromarray(code_colors(grid)).resize((w * cell, h * cell), Image.NEAREST)
    digits = len(str(int(grid.max())))
    if cell >= 8 * digits:  # the default font is about 6 pixels per digit
        draw = ImageDraw.Draw(picture)
        for i in range(h):
            for j in range(w):
                draw.text((j * cell + 2, i * cell + 2), str(int(grid[i, j])), fill=(0, 0, 0))
    return picture


def usage_picture(counts: torch.Tensor, height: int = 120) -> Image.Image:
    """A code histogram (K,) as bars over the codebook, coloured as in the code grid (binned past USAGE_BINS)."""
    k = counts.numel()
    bins = min(k, USAGE_BINS)
    per_bin = math.ceil(k / bins)
    padded = torch.zeros(bins * per_bin, dtype=torch.float64)
    padded[:k] = counts.double()
    binned = padded.view(bins, per_bin).sum(1).numpy()
    bar = max(1, 512 // bins)
    picture = Image.new("RGB", (bins * bar, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    colors = code_colors(np.arange(bins) * per_bin)
    top = max(float(binned.max()), 1.0)
    for b, count in enumerate(binned):
        if count > 0:
            y = height - max(2, round(count / top * (height - 4)))
            draw.rectangle([b * bar, y, (b + 1) * bar - 1, height - 1], fill=tuple(int(c) for c in colors[b]))
    return picture


# ----------------------------------------------------------------------------- handlers


class TurnLock:
    """A lock handed out in the order it was asked for. A plain threading.Lock wakes its waiters in no set
    order, so a request could wait behind several that came after it (the page's queue lets more handlers
    start than the model serves at once, e.g. after a cancel, which stops the wait but not the handler)."""

    def __init__(self) -> None:
        self._turns = threading.Condition()
        self._next = 0       # the ticket the next caller draws
        self._serving = 0    # the ticket whose holder may run
        self._gone: set[int] = set()  # tickets whose callers stopped waiting (an exception in the wait)

    def locked(self) -> bool:
        with self._turns:
            return self._next != self._serving

    def __enter__(self) -> None:
        with self._turns:
            ticket, self._next = self._next, self._next + 1
            try:
                self._turns.wait_for(lambda: self._serving == ticket)
            except BaseException:
                self._gone.add(ticket)
                self._advance()
                raise

    def __exit__(self, *exc: object) -> None:
        with self._turns:
            self._serving += 1
            self._advance()

    def _advance(self) -> None:
        while self._serving in self._gone:  # (caller holds the condition)
            self._gone.discard(self._serving)
            self._serving += 1
        self._turns.notify_all()


class AppHandlers:
    """What the page does, as plain methods; one model call at a time, in the order asked (a lock beside the
    page's queue)."""

    # An upload used as it is ('fit' unticked) may have at most this many times the pixels of the trained
    # size: 4x per side, the Sample tab's largest canvas. The encoder's cost grows faster than its pixels
    # (attention over every code position), and one phone photo would hold the one-at-a-time queue for minutes.
    UPLOAD_AREA_FACTOR = 16

    def __init__(self, pipe: VQGPTPipeline) -> None:
        self.pipe = pipe
        self.lock = TurnLock()
        trained_h, trained_w = pipe.trained_pixels()
        size = pipe.tokenizer.config.resolution
        self.max_upload_pixels = self.UPLOAD_AREA_FACTOR * max(trained_h * trained_w, size * size)

    # ------------------------------------------------------------------ what the page offers
    @property
    def class_choices(self) -> list[str]:
        """Class names of a conditional prior (``index:N`` where it has none); empty for an unconditional one."""
        prior = self.pipe.prior
        if not prior.conditional:
            return []
        if self.pipe.classes:
            return list(self.pipe.classes)
        return [f"{INDEX_PREFIX}{i}" for i in range(prior.config.num_classes)]

    @property
    def guidance(self) -> bool:
        """Whether classifier-free guidance is possible (a conditional prior with a null class)."""
        return self.pipe.prior.null_class is not None

    @property
    def code_rows(self) -> int:
        return self.pipe.prior.config.grid_size[0]

    @property
    def max_code_rows(self) -> int:
        """Code rows of the tallest upload accepted as it is (at least the trained width, within the pixel limit)."""
        return max(self.code_rows, self.max_upload_pixels // self.pipe.trained_pixels()[1]
                   // self.pipe.downsample_factor)

    # ------------------------------------------------------------------ the three tabs
    def sample(self, class_name: str | None, num: int, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               height: int | None = None, width: int | None = None,
               progress: Callable[..., Any] | None = None) -> tuple[Images, str]:
        """Sample ``num`` images -> ([(image, caption)], a one-line summary); larger sizes use sliding windows."""
        num = _count(num, "number of images")
        label = self._label(class_name)
        sampling = _sampling(cfg_scale, cfg_schedule, temperature, top_k, top_p)
        height, width = _pixels(height, "height"), _pixels(width, "width")
        grid = self.pipe.grid_for_pixels(height, width)  # a clear error before any work
        with self._model(progress, "sampling"):
            start = time.perf_counter()  # the sampling, not the wait for the model
            images = self.pipe.generate(num, class_labels=label, height=height, width=width, sampling=sampling,
                                        seed=_seed(seed), progress=progress is not None).cpu()
        h0, w0 = self.pipe.prior.config.grid_size
        windows = " with sliding windows" if grid != (h0, w0) else ""
        summary = (f"{num} image{'s' * (num > 1)}{self._of(label)}, {images.shape[2]}x{images.shape[3]} px "
                   f"({grid[0]}x{grid[1]} codes{windows}), seed {_seed(seed)}, {time.perf_counter() - start:.1f} s")
        return [(tensor_to_pil(img), f"sample {i + 1}") for i, img in enumerate(images)], summary

    def complete(self, image_path: str | None, keep_rows: int | None, extend_right: int = 0, extend_down: int = 0,
                 num: int = 4, class_name: str | None = None, cfg_scale: float = 1.0,
                 cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, fit: bool = True,
                 progress: Callable[..., Any] | None = None) -> tuple[Images, str]:
        """Complete an uploaded image from its first ``keep_rows`` code rows and/or extend it right / down.

        Returns the original (padded with white to the output size) followed by ``num`` completions.
        """
        num = _count(num, "number of completions")
        extend_right = _at_least(extend_right, 0, "columns to add on the right")
        extend_down = _at_least(extend_down, 0, "rows to add below")
        image = self._image(image_path, self.pipe.trained_pixels() if fit else None)
        rows = image.shape[1] // self.pipe.downsample_factor
        keep = None if keep_rows is None else _at_least(keep_rows, 0, "code rows to keep")
        if keep is not None and keep > rows:  # (the pipeline's message names the CLI's --keep-rows)
            raise ValueError(f"code rows to keep: the image has {rows} code rows, so at most {rows}; got {keep}")
        label = self._label(class_name)
        sampling = _sampling(cfg_scale, cfg_schedule, temperature, top_k, top_p)
        with self._model(progress, "completing"):
            images = self.pipe.complete(image, num, keep_rows=keep, extend_right=extend_right,
                                        extend_down=extend_down, class_labels=label, sampling=sampling,
                                        seed=_seed(seed), progress=progress is not None).cpu()
        original = torch.ones_like(images[0])
        original[:, : image.shape[1], : image.shape[2]] = image
        kept = rows if keep is None else min(keep, rows)
        what = [f"first {kept} of {rows} code rows kept"] if kept < rows else []
        what += [f"{n} code {name}{'s' * (n > 1)} added" for n, name in ((extend_right, "column"), (extend_down, "row"))
                 if n]
        gallery = [(tensor_to_pil(original), "original")]
        gallery += [(tensor_to_pil(img), f"completion {i + 1}") for i, img in enumerate(images)]
        summary = f"{num} completion{'s' * (num > 1)}{self._of(label)}: {', '.join(what)}; seed {_seed(seed)}"
        return gallery, summary

    def reconstruct(self, image_path: str | None, fit: bool = True
                    ) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image, str]:
        """Encode and decode an uploaded image -> (original, reconstruction, code grid, codebook usage, summary)."""
        tokenizer = self.pipe.tokenizer
        size = tokenizer.config.resolution
        image = self._image(image_path, (size, size) if fit else None)
        with self._model(None, ""):
            codes = tokenizer.encode(image[None].to(self.pipe.device))  # (1, h, w)
            recon = tokenizer.decode(codes).clamp(-1, 1).cpu()
        codes = codes[0].cpu()
        counts = code_histogram(codes, tokenizer.codebook_size)
        stats = codebook_stats(counts)
        used = int((counts > 0).sum())
        h, w = codes.shape
        summary = (f"PSNR {float(psnr(image[None], recon)[0]):.2f} dB | {image.shape[1]}x{image.shape[2]} px -> "
                   f"{h}x{w} codes | {used} distinct codes of {tokenizer.codebook_size} "
                   f"({used / tokenizer.codebook_size:.1%} of the codebook), perplexity {stats['perplexity']:.1f}")
        return (tensor_to_pil(image), tensor_to_pil(recon[0]), code_grid_picture(codes), usage_picture(counts),
                summary)

    # ------------------------------------------------------------------ pieces
    @contextlib.contextmanager
    def _model(self, progress: Callable[..., Any] | None, what: str) -> Iterator[None]:
        if progress is not None:
            progress(0, desc=f"{what} (waiting for the model)" if self.lock.locked() else what)
        with self.lock:
            yield

    def _label(self, class_name: str | None) -> int | None:
        if not self.pipe.prior.conditional:
            if class_name:
                raise ValueError(f"class {class_name!r}: this prior is unconditional, it takes no class")
            return None
        if class_name is None or not str(class_name).strip():
            raise ValueError(f"choose a class: {', '.join(self.class_choices[:20])}"
                             + (", ..." if len(self.class_choices) > 20 else ""))
        # the name as chosen: folders 'cat' and 'cat ' are two classes (stripping took the other one)
        return self.pipe.class_index(str(class_name))

    def _of(self, label: int | None) -> str:
        """The class drawn, by name where the classes have names ('1' or 'index:1' typed for class 'b' is 'b')."""
        if label is None:
            return ""
        names = self.pipe.classes
        return f" of class {names[label]}" if names else f" of class index:{label}"

    def _image(self, path: str | None, fit_to: tuple[int, int] | None) -> torch.Tensor:
        """An uploaded file -> (3, H, W) in [-1, 1], fitted (resize + center crop) to ``fit_to`` or checked as is."""
        if not path:
            raise ValueError("upload an image first")
        name = Path(path).name
        try:
            if fit_to is not None:
                return open_fitted(path, *fit_to)
            with Image.open(path) as img:  # the size is in the header: refused before the picture is decoded
                width, height = img.size
            if height * width <= self.max_upload_pixels:
                image = pil_to_tensor(open_rgb(path))
        except Image.DecompressionBombError as exc:  # an image, but over Pillow's pixel limit: say so
            raise ValueError(f"{name} is too large to read: {exc}") from None
        except Exception as exc:  # Pillow raises many types for files that are no image
            raise ValueError(f"{name} cannot be read as an image ({type(exc).__name__}): upload a PNG, JPEG, "
                             "WebP, BMP, GIF or TIFF file") from None
        if height * width > self.max_upload_pixels:
            raise ValueError(f"{name} is {height}x{width} px, more than the {self.max_upload_pixels:,} pixels this "
                             f"page takes as they are ({self.UPLOAD_AREA_FACTOR}x the trained size): tick 'fit to "
                             "the trained size', or upload a smaller image")
        height, width = image.shape[1:]  # (EXIF rotation may swap them)
        try:
            self.pipe.tokenizer.grid_shape(height, width)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}; or tick 'fit to the trained size'") from None
        return image


def _count(value: float | None, what: str) -> int:
    return _at_least(1 if value is None else value, 1, what)


def _whole(value: Any) -> bool:
    """An int (exactly, however large: 2**63 - 1 is no float), or a float with no fraction; not bool, inf, NaN."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()


def _at_least(value: float, low: int, what: str) -> int:
    if not _whole(value) or int(value) < low:
        raise ValueError(f"{what} must be a whole number >= {low}, got {value!r}")
    return int(value)


def _pixels(value: float | None, what: str) -> int | None:
    return None if value in (None, 0) else _at_least(value, 1, what)


def _seed(value: float | None) -> int:
    """The page's seed: a whole number (negative ones too; the pipeline checks the range)."""
    if value is None:
        return 0
    if not _whole(value):
        raise ValueError(f"seed must be a whole number, got {value!r}")
    return int(value)


def _sampling(cfg_scale: float, cfg_schedule: str, temperature: float, top_k: float | None,
              top_p: float | None) -> SamplingConfig:
    """The page's knobs -> a SamplingConfig (top-k 0 and top-p 1 mean off); its checks give the messages."""
    k = None if not top_k else _at_least(top_k, 1, "top-k")
    p = None if top_p is None or top_p == 1 else _number(top_p, "top-p")  # above 1: SamplingConfig refuses it
    return SamplingConfig(temperature=_number(temperature, "temperature"), top_k=k, top_p=p,
                          cfg_scale=_number(cfg_scale, "CFG scale"), cfg_schedule=str(cfg_schedule))


def _number(value: Any, what: str) -> float:
    """A page value as a float (SamplingConfig checks its range), or a ValueError naming the control."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- the page


@contextlib.contextmanager
def page_errors(gr: Any) -> Iterator[None]:
    """Turn a handler's exception into a message in the page (gr.Error); the server keeps serving."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, FileNotFoundError) as exc:  # the user's input: the message says what to change
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception as exc:  # a bug: one line in the page, the traceback in the server's log
        traceback.print_exc()
        raise gr.Error(f"internal error ({type(exc).__name__}: {exc}); the server log has the details",
                       print_exception=False) from None


def _sampling_controls(gr: Any, handlers: AppHandlers) -> list[Any]:
    """Class, CFG scale + schedule, temperature, top-k, top-p, seed: a fresh set per tab."""
    choices = handlers.class_choices
    prior = handlers.pipe.prior
    with gr.Row():
        label = gr.Dropdown(choices=choices, value=choices[0] if choices else None, label="class",
                            allow_custom_value=True, visible=bool(choices), filterable=True)
        seed = gr.Number(value=0, precision=0, label="seed (the same seed gives the same images)")
    with gr.Accordion("sampling settings", open=False):
        with gr.Row():
            cfg = gr.Slider(0.0, 10.0, value=1.0, step=0.1, label="CFG scale (1 = off)", visible=handlers.guidance)
            schedule = gr.Radio(list(CFG_SCHEDULES), value="constant", label="CFG schedule",
                                visible=handlers.guidance)
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature (0 = greedy)")
            top_k = gr.Slider(0, prior.config.codebook_size, value=0, step=1, label="top-k (0 = off)")
            top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="top-p (1 = off)")
    return [label, cfg, schedule, temperature, top_k, top_p, seed]


def build_app(handlers: AppHandlers, title: str = "vqgpt") -> Any:
    """The Gradio page (Blocks) over ``handlers``: tabs Sample, Complete / extend, Reconstruct."""
    gr = require_gradio()
    pipe = handlers.pipe
    f = pipe.downsample_factor
    trained_h, trained_w = pipe.trained_pixels()
    queue = {"concurrency_limit": 1, "concurrency_id": "model"}  # one model call at a time, the rest wait

    # Every answer's pictures are files in gradio's cache: kept, a long-lived page filled its disk (about
    # 0.3 MB a request). Gradio sweeps the ones this page made every hour once they are six hours old.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(f"## {title}\nTokenizer: {pipe.tokenizer.codebook_size} codes, {f}x{f} pixels per code · "
                    f"prior: trained on {trained_h}x{trained_w} px"
                    + (f", {len(handlers.class_choices)} classes" if handlers.class_choices else ", unconditional"))
        with gr.Tab("Sample"):
            with gr.Row():
                num = gr.Slider(1, 16, value=4, step=1, label="number of images")
                height = gr.Slider(trained_h, 4 * trained_h, value=trained_h, step=f,
                                   label=f"height (px; beyond {trained_h}: sliding windows)")
                width = gr.Slider(trained_w, 4 * trained_w, value=trained_w, step=f,
                                  label=f"width (px; beyond {trained_w}: sliding windows)")
            label, cfg, schedule, temperature, top_k, top_p, seed = _sampling_controls(gr, handlers)
            sample_button = gr.Button("Sample", variant="primary", elem_id="sample-button")
            sample_info = gr.Markdown()
            sample_gallery = gr.Gallery(label="samples", columns=8, format="png", object_fit="contain",
                                        buttons=["download", "fullscreen"], elem_id="samples",
                                        elem_classes="gallery-box")

            def sample(label, num, cfg, schedule, temperature, top_k, top_p, seed, height, width,
                       progress=gr.Progress(track_tqdm=True)):
                with page_errors(gr):
                    return handlers.sample(label, num, cfg, schedule, temperature, top_k, top_p, seed, height,
                                           width, progress=progress)[::-1]

            sample_button.click(sample, [label, num, cfg, schedule, temperature, top_k, top_p, seed, height, width],
                                [sample_info, sample_gallery], api_name="sample", **queue)

        with gr.Tab("Complete / extend"):
            with gr.Row():
                c_image = gr.File(label="image", file_types=None, type="filepath")
                with gr.Column():
                    keep = gr.Slider(0, handlers.max_code_rows, value=handlers.code_rows // 2, step=1,
                                     label="code rows to keep (from the top)")
                    right = gr.Slider(0, 4 * trained_w // f, value=0, step=1, label="code columns to add on the right")
                    down = gr.Slider(0, 4 * trained_h // f, value=0, step=1, label="code rows to add below")
                    c_num = gr.Slider(1, 8, value=3, step=1, label="number of completions")
                    c_fit = gr.Checkbox(value=True, label=f"fit to the trained size ({trained_h}x{trained_w} px)")
            c_label, c_cfg, c_schedule, c_temp, c_top_k, c_top_p, c_seed = _sampling_controls(gr, handlers)
            complete_button = gr.Button("Complete", variant="primary", elem_id="complete-button")
            complete_info = gr.Markdown()
            complete_gallery = gr.Gallery(label="original, then completions", columns=8, format="png",
                                          object_fit="contain", buttons=["download", "fullscreen"],
                                          elem_classes="gallery-box")

            def complete(path, keep, right, down, num, fit, label, cfg, schedule, temperature, top_k, top_p, seed,
                         progress=gr.Progress(track_tqdm=True)):
                with page_errors(gr):
                    return handlers.complete(path, keep, right, down, num, label, cfg, schedule, temperature,
                                             top_k, top_p, seed, fit, progress=progress)[::-1]

            complete_button.click(complete, [c_image, keep, right, down, c_num, c_fit, c_label, c_cfg, c_schedule,
                                             c_temp, c_top_k, c_top_p, c_seed],
                                  [complete_info, complete_gallery], api_name="complete", **queue)

        with gr.Tab("Reconstruct"):
            with gr.Row():
                r_image = gr.File(label="image", type="filepath")
                size = pipe.tokenizer.config.resolution
                r_fit = gr.Checkbox(value=True, label=f"fit to the trained size ({size}x{size} px, the tokenizer's)")
            reconstruct_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
            reconstruct_info = gr.Markdown()
            with gr.Row():
                # shown enlarged to a fixed height (pixelated); downloads keep their own size
                r_original = gr.Image(label="original", format="png", height=320, elem_classes="enlarge")
                r_recon = gr.Image(label="reconstruction", format="png", height=320, elem_classes="enlarge")
                r_codes = gr.Image(label="code grid (colour = code index)", format="png", height=320,
                                   elem_classes="enlarge")
            r_usage = gr.Image(label="codebook usage of this image (bars over the code indices)", format="png",
                               height=180)

            def reconstruct(path, fit):
                with page_errors(gr):
                    original, recon, codes, usage, summary = handlers.reconstruct(path, fit)
                    return summary, original, recon, codes, usage

            reconstruct_button.click(reconstruct, [r_image, r_fit],
                                     [reconstruct_info, r_original, r_recon, r_codes, r_usage],
                                     api_name="reconstruct", **queue)
    demo.queue(default_concurrency_limit=1)
    return demo


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def launch(pipeline: str, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           name: str | None = None) -> Any:
    """Load ``pipeline`` (a folder or Hub id), build the page and serve it on host:port; prints the URL.

    ``name`` is what the page calls the pipeline (default: ``pipeline``).
    """
    gr = require_gradio()
    if port is not None and not (isinstance(port, int) and 1 <= port <= 65535):
        raise ValueError(f"port must be a whole number from 1 to 65535, got {port!r}")
    try:  # else the server tries 100 ports, each failing to resolve it, and blames the port
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ValueError(f"--host {host}: no such address or name here ({exc.strerror or exc}); use one of this "
                         "machine's addresses, e.g. 127.0.0.1 or 0.0.0.0") from None
    if not is_loopback(host):
        warnings.warn(f"--host {host} is not a loopback address: anyone who can reach this machine can use the "
                      "page and its compute (there is no login); use --host 127.0.0.1 to keep it local", stacklevel=2)
    pipe = VQGPTPipeline.from_pretrained(pipeline)
    if torch.cuda.is_available():
        pipe.to("cuda")
    demo = build_app(AppHandlers(pipe), title=f"vqgpt · {name or pipeline}")
    # System fonts: the default theme fetches web fonts, which a machine without internet waits for.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    # show_error: gradio's own refusals (a value of the wrong type sent through its HTTP API) reach the caller
    # with gradio's message instead of "has not enabled verbose error reporting"; the handlers' errors are
    # gr.Error, shown either way.
    try:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, theme=theme, css=PAGE_CSS,
                    show_error=True)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        reason = str(exc).split(". ")[0]
        raise ValueError(f"cannot serve on {host}:{port or 'a port from 7860'}: {reason}; choose another --port "
                         "or --host") from None
    return demo
