"""The join of the two stages: a tokenizer and a prior that sample and complete images together.

A pipeline folder is ``tokenizer/`` (a VQModel export) + ``prior/`` (a GPT export).
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from stage1_vq.model import VQModel
from stage2_prior.draw import SamplingConfig, check_num_samples, eval_mode, inference, resolve_class_labels
from stage2_prior.highres import complete
from stage2_prior.layers import content_fingerprint
from stage2_prior.model import GPT
from stage2_prior.sampling import generate
from vqgpt.ground.checkpoint import (copy_export, export_stamp, hub_part_missing, push_to_hub, read_export_meta,
                                     resolve_model_dir, usable_device)
from vqgpt.ground.config import ConfigError
from vqgpt.ground.images import check_pixel_limit
from vqgpt.workflow.encode import tokenizer_fingerprint

INDEX_PREFIX = "index:"  # "index:2" is always class index 2, whatever the class names are
# an index or a name (see VQGPTPipeline.class_index), one for all samples or one per sample
ClassLabels = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


def _is_int(text: str) -> bool:
    """An integer written in ASCII digits (``str.isdigit`` also passes '²', which ``int`` refuses)."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


class VQGPTPipeline:
    """Tokenizer + prior. ``generate`` returns images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, tokenizer: VQModel, prior: GPT, classes: list[str] | None = None) -> None:
        check_compatible(tokenizer, prior)
        self.tokenizer = tokenizer.eval()
        self.prior = prior.eval()
        prior.code_groups = tokenizer_code_groups(tokenizer)  # (the samplers read it: stage2_prior.draw)
        self.classes = classes or []  # checked by the property below
        self.tokenizer_dir: Path | None = None
        self.prior_dir: Path | None = None
        self._as_loaded: tuple[tuple | None, tuple | None] = (None, None)  # weights as loaded from those folders
        self._stamps: tuple[tuple | None, tuple | None] = (None, None)  # their files then (export_stamp)
        self._prior_extra: dict = {}  # the prior export's 'extra' section as loaded
        # generate / complete run the prior's one-token step under torch.compile (see set_decoding)
        self.compile_decode = False

    @property
    def classes(self) -> list[str]:
        """The class names, by class index ([] when the prior's classes have no names)."""
        return self._classes

    @classes.setter
    def classes(self, names: list[str] | tuple[str, ...]) -> None:
        self._classes = check_class_names(names, self.prior.config.num_classes)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_parts(cls, tokenizer_dir: str | Path, prior_dir: str | Path, check_fingerprint: bool = True,
                   map_location: str = "cpu", warn_unverified: bool = True) -> "VQGPTPipeline":
        """Load a tokenizer export and a prior export; refuse a prior trained on another tokenizer's codes.

        A prior that records no tokenizer fingerprint (made outside vqgpt) loads with a warning
        (``warn_unverified``); a pipeline folder loads it silently: it was paired when it was written.
        """
        tokenizer = VQModel.from_pretrained(tokenizer_dir, map_location=map_location)
        prior = GPT.from_pretrained(prior_dir, device=map_location)
        extra = read_export_meta(prior_dir).get("extra", {})
        expected = extra.get("tokenizer_fingerprint")
        if check_fingerprint and expected:
            actual = tokenizer_fingerprint(tokenizer_dir)
            if actual != expected:
                raise ConfigError(
                    f"the prior in {prior_dir} was trained on codes of tokenizer {expected}, "
                    f"but {tokenizer_dir} is tokenizer {actual}: re-encode and retrain, or pair it with the right tokenizer")
        elif check_fingerprint and warn_unverified:
            # Only the vocabulary size can be checked: codes of another tokenizer would decode to noise.
            warnings.warn(f"the prior in {prior_dir} records no tokenizer fingerprint, so it cannot be verified "
                          f"that it was trained on codes of {tokenizer_dir}; if its samples look like noise, "
                          "pair it with the tokenizer whose codes it was trained on", stacklevel=2)
        try:  # class names that do not fit the prior: said with the file that holds them
            check_class_names(extra.get("classes") or [], prior.config.num_classes)
        except ValueError as exc:
            raise ConfigError(f"{Path(prior_dir) / 'config.json'}: extra.classes: {exc}") from None
        pipe = cls(tokenizer, prior, classes=extra.get("classes"))
        pipe.tokenizer_dir, pipe.prior_dir = Path(tokenizer_dir), Path(prior_dir)
        pipe._as_loaded = (_weights_state(tokenizer), _weights_state(prior))
        pipe._stamps = (export_stamp(tokenizer_dir), export_stamp(prior_dir))
        pipe._prior_extra = extra
        return pipe

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str = "cpu", *,
                        revision: str | None = None) -> "VQGPTPipeline":
        """Load a pipeline folder (``tokenizer/`` + ``prior/``), or a Hub id ``owner/name`` holding one."""
        usable_device(map_location)  # before a Hub download
        directory = resolve_model_dir(name_or_path, revision=revision)
        for part in ("tokenizer", "prior"):
            if not (directory / part).is_dir() and not Path(name_or_path).expanduser().is_dir():
                raise FileNotFoundError(hub_part_missing(str(name_or_path), revision, part))
            if not (directory / part).is_dir():
                raise FileNotFoundError(f"{name_or_path} is not a pipeline folder: {part}/ is missing "
                                        f"(a pipeline folder holds tokenizer/ and prior/ exports){_hint(directory)}")
        return cls.from_parts(directory / "tokenizer", directory / "prior", map_location=map_location,
                              warn_unverified=False)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``tokenizer/`` and ``prior/`` into ``directory``: the weights as they are now. A part whose
        weights are still those it was loaded with, and whose export files are still those it was loaded
        from, is copied from its export (byte for byte, its two files only); one that was trained, edited
        or moved since, or whose files were replaced since (a resumed run's new export), is written from
        memory. A prior cast by ``set_decoding`` to
        int8 (its export would not load) or bfloat16 (its float32 weights would be lost) is refused."""
        from stage2_prior.quantize import is_quantized

        if is_quantized(self.prior):
            raise ValueError("the prior holds int8 weights (set_decoding('int8')), which an export cannot hold: "
                             "save the pipeline before quantizing it, or load it again to save the float weights")
        rounded = sorted({str(p.dtype) for p in self.prior.parameters() if p.dtype != torch.float32})
        if getattr(self, "_rounded_prior", False) and not rounded:  # back to float32, the rounding stays
            rounded = ["bfloat16 (now float32 again)"]
        if rounded:  # set_decoding('bfloat16') rounded the float32 weights; saving would make that permanent
            raise ValueError(f"the prior holds {', '.join(rounded)} weights (set_decoding), rounded from its float32 "
                             "ones: save the pipeline before set_decoding, or load it again to save the float32 "
                             "weights")
        # What the constructor checks, again: a prior swapped in (pipe.prior = ...) or class names changed in
        # place (pipe.classes.append(...)) since were written, and the folder then refused to load.
        check_compatible(self.tokenizer, self.prior)
        try:
            check_class_names(self.classes, self.prior.config.num_classes)
        except ValueError as exc:
            raise ValueError(f"pipe.classes no longer fit the prior: {exc}; set pipe.classes to one name per class "
                             "(or [] for none) before saving") from None
        directory = Path(directory)
        tok_dst, prior_dst = directory / "tokenizer", directory / "prior"
        tok_loaded, prior_loaded = self._as_loaded
        tok_stamp, prior_stamp = self._stamps
        tok_copied = (self.tokenizer_dir is not None and tok_loaded is not None
                      and _weights_state(self.tokenizer) == tok_loaded
                      and tok_stamp is not None and export_stamp(self.tokenizer_dir) == tok_stamp)
        if tok_copied:
            if self.tokenizer_dir.resolve() != tok_dst.resolve():
                copy_export(self.tokenizer_dir, tok_dst)
        else:
            self.tokenizer.save_pretrained(tok_dst)
        prior_unchanged = (self.prior_dir is not None and prior_stamp is not None
                           and export_stamp(self.prior_dir) == prior_stamp)
        extra = self._prior_extra
        # The prior's export is copied only while it still describes this pipeline: its weights, its class
        # names and the tokenizer (fingerprint) it names are those of now. Else it is written anew.
        # (a pair made with from_parts(check_fingerprint=False) names another tokenizer: it is stamped anew)
        fingerprint = tokenizer_fingerprint(tok_dst)  # (a hash of its weights file: read once)
        if (tok_copied and prior_unchanged and prior_loaded is not None
                and _weights_state(self.prior) == prior_loaded and extra.get("classes", []) == list(self.classes)
                and extra.get("tokenizer_fingerprint") in (None, fingerprint)):
            if self.prior_dir.resolve() != prior_dst.resolve():
                copy_export(self.prior_dir, prior_dst)
        else:
            self.prior.save_pretrained(prior_dst, extra={**extra, "classes": self.classes,
                                                         "tokenizer_fingerprint": fingerprint})
        return directory

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None) -> str:
        """Upload this pipeline folder as Hub repository ``repo_id`` (created when missing); returns the commit URL."""
        return push_to_hub(self.save_pretrained, repo_id, private=private, token=token, commit_message=commit_message)

    def to(self, device: str | torch.device) -> "VQGPTPipeline":
        """Move both parts to ``device`` (a device only: the prior's dtype is set_decoding's)."""
        if isinstance(device, str) and isinstance(getattr(torch, device, None), torch.dtype):  # 'bfloat16'
            device = getattr(torch, device)
        if isinstance(device, torch.dtype):
            raise ValueError(f"to() takes a device, got the dtype {device}: use set_decoding(prior_dtype=...) for "
                             "the prior's weights (the tokenizer runs in float32)")
        device = usable_device(device)
        self.tokenizer.to(device)
        self.prior.to(device)
        return self

    def set_decoding(self, prior_dtype: str | None = None, compile: bool | None = None) -> "VQGPTPipeline":
        """How the prior decodes from now on; returns self. None leaves a setting as it is.

        ``prior_dtype``: 'float32', 'bfloat16', or 'int8' (weight-only int8 linear layers with
        per-output-channel scales, the rest float32; ``stage2_prior.quantize``). Both lower precisions
        are one-way: 'bfloat16' rounds the float32 weights (back to 'float32' keeps the rounded values)
        and int8 cannot go back; load the pipeline again for its exported weights, and save it
        (``save_pretrained`` refuses a rounded prior) before set_decoding. ``compile``: every later ``generate`` /
        ``complete`` runs the one-token decode step under torch.compile (CUDA graphs on a GPU),
        compiled on the first call and reused after; the tokenizer is untouched by both.
        """
        if compile is not None and not isinstance(compile, bool):  # bool('false') is True; before the one-way dtype
            raise ValueError(f"compile must be True, False or None, got {type(compile).__name__} {compile!r}")
        if prior_dtype is not None:
            from stage2_prior.quantize import set_prior_dtype

            if any(p.dtype == torch.float32 for p in self.prior.parameters()) and prior_dtype == "bfloat16":
                self._rounded_prior = True  # a later 'float32' cannot restore the float32 weights
            set_prior_dtype(self.prior, prior_dtype)
        if compile is not None:
            self.compile_decode = compile
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def downsample_factor(self) -> int:
        return self.tokenizer.downsample_factor

    # ------------------------------------------------------------------ generation
    @property
    def codes_per_position(self) -> int:
        """Codes per latent position, side by side in a code row (residual VQ: its depth D; else 1)."""
        return self.tokenizer.codes_per_position

    def _window_stride(self) -> tuple[int, int]:
        # Sliding windows move a whole position (its D codes) at a time, so a window never starts
        # mid-position (the prior only saw positions start at multiples of D).
        return 1, self.codes_per_position

    def grid_for_pixels(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Pixel size -> code grid (h, w); sizes must be multiples of the downsampling factor."""
        f, d = self.downsample_factor, self.codes_per_position
        h0, w0 = self.prior.config.grid_size
        trained_h, trained_w = self.trained_pixels()
        height = trained_h if height is None else _whole("height", height)  # 0 is no size, not the default
        width = trained_w if width is None else _whole("width", width)
        for name, value, trained in (("height", height, h0), ("width", width, w0 // d)):
            if value % f != 0:
                lo, hi = (value // f) * f, (value // f + 1) * f
                raise ValueError(f"{name}={value} is not a multiple of the tokenizer's downsampling factor {f}: "
                                 f"use {lo} or {hi}")
            if value // f < trained:
                raise ValueError(f"{name}={value} is smaller than the prior's trained size {trained * f} "
                                 f"({trained} codes x {f} pixels)")
        check_pixel_limit(height, width, f"height={height}, width={width}")
        return self.tokenizer.grid_shape(height, width)

    def class_index(self, label: int | str) -> int:
        """A class given by name or index -> its index (range-checked by ``resolve_class_labels``).

        A Python int is an index. A string is a class name when it is one; ``"index:N"`` is always
        index N; a bare integer string that is no class name is read as an index only when no class
        name is itself an integer (with folders ``1, 10, 11, 2, ...`` it would be ambiguous).
        """
        if isinstance(label, str) and self.prior.conditional:
            index = self._name_to_index(label)
        elif isinstance(label, bool) or not (isinstance(label, str) or hasattr(label, "__index__")):
            raise ValueError(f"a class label is an int index or a str name, got {label!r}")
        else:
            index = label  # ints, numpy ints, 0-d int tensors; an unconditional prior refuses any label below
        return int(resolve_class_labels(self.prior, index, 1)[0])  # type: ignore[index, arg-type]

    def _name_to_index(self, label: str) -> int:
        if label.startswith(INDEX_PREFIX):  # before the names: a class folder named "index:0" does not take it
            digits = label[len(INDEX_PREFIX):]
            if not _is_int(digits):
                raise ValueError(f"class label {label!r}: write an index as {INDEX_PREFIX}N, e.g. {INDEX_PREFIX}0")
            return int(digits)
        if label in self.classes:
            return self.classes.index(label)
        # The same letters in another Unicode form: macOS names folders 'ü' as 'u' + a combining mark (NFD),
        # which a typed 'ü' (NFC) is not; taken when exactly one class reads so.
        alike = [i for i, name in enumerate(self.classes)
                 if unicodedata.normalize("NFC", name) == unicodedata.normalize("NFC", label)]
        if len(alike) == 1:
            return alike[0]
        if not _is_int(label):
            raise ValueError(f"unknown class {label!r}; known classes: {self._known()}")
        if any(_is_int(c) for c in self.classes):
            n = self.prior.config.num_classes
            hint = (f"so write an index as {INDEX_PREFIX}N (e.g. {INDEX_PREFIX}{label})" if 0 <= int(label) < n
                    else f"and as an index it is outside 0..{n - 1}")
            raise ValueError(f"class {label!r} is not one of this prior's classes {self._known()}; class names "
                             f"here are numbers, {hint}")
        return int(label)

    def _known(self) -> str:
        # a name with edge spaces or a comma in quotes: ' a' and 'a' are two classes, which [ a, a] hid
        shown = ", ".join(repr(name) if name != name.strip() or "," in name else name for name in self.classes[:20])
        shown += ", ..." if len(self.classes) > 20 else ""
        return f"[{shown}]" if self.classes else f"none named; indices 0..{self.prior.config.num_classes - 1}"

    @inference
    def generate(self, num_samples: int, class_labels: ClassLabels = None, height: int | None = None,
                 width: int | None = None, sampling: SamplingConfig | None = None,
                 seed: int | None = None, progress: bool = False) -> torch.Tensor:
        """Sample images (num_samples, 3, H, W) in [-1, 1]; larger H, W use sliding-window sampling.

        ``progress`` shows a tqdm bar over the codes drawn.
        """
        check_num_samples(num_samples)
        grid = self.grid_for_pixels(height, width)
        labels = self.labels_tensor(class_labels, num_samples)
        generators = sample_generators(seed, range(num_samples))
        codes = self.draw_codes(num_samples, labels, grid, sampling, generators=generators, progress=progress)
        return self.decode_codes(codes)

    def draw_codes(self, num_samples: int, labels: torch.Tensor | None, grid: tuple[int, int],
                   sampling: SamplingConfig | None, generator: torch.Generator | None = None,
                   generators: list[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
        """Codes (num_samples, h, w) of ``grid`` drawn by the prior with this pipeline's settings: its sliding
        windows move whole positions, and its decode step is compiled when asked. One ``generator`` for the
        batch, or ``generators``, one per sample (a sample's codes then depend on its own generator only)."""
        return generate(self.prior, num_samples, class_labels=labels, grid_size=grid, sampling=sampling,
                        generator=generator, generators=generators, progress=progress,
                        window_stride=self._window_stride(), compile=self.compile_decode)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (B, h, w) -> images (B, 3, H, W) in [-1, 1], the tokenizer in eval mode (a tokenizer
        left in train mode would apply its dropout: other images, and the global RNG drawn from)."""
        with eval_mode(self.tokenizer):
            return self.tokenizer.decode(codes.to(self.device)).clamp(-1, 1)

    def trained_pixels(self) -> tuple[int, int]:
        """Pixel size (H, W) of the prior's training grid."""
        return self.tokenizer.image_shape(*self.prior.config.grid_size)

    @inference
    def complete(self, image: torch.Tensor, num_samples: int, keep_rows: int | None = None,
                 extend_right: int = 0, extend_down: int = 0,
                 class_labels: ClassLabels = None, sampling: SamplingConfig | None = None,
                 seed: int | None = None, progress: bool = False) -> torch.Tensor:
        """Complete or extend one image (3, H, W) in [-1, 1] -> (num_samples, 3, H', W').

        The image is encoded; its first ``keep_rows`` code rows (all rows when None) are kept
        unchanged, ``extend_right`` / ``extend_down`` code columns / rows are added (a column being one
        position: its D codes for residual VQ), and every other
        cell is sampled in raster order with sliding windows where the canvas exceeds the trained grid.
        """
        check_num_samples(num_samples)
        image = _checked_image(image)
        keep_rows = None if keep_rows is None else _whole("keep_rows", keep_rows)
        extend_right, extend_down = _whole("extend_right", extend_right), _whole("extend_down", extend_down)
        self.tokenizer.grid_shape(image.shape[1], image.shape[2])  # clear error for sizes that are not a multiple of f
        with eval_mode(self.tokenizer):  # a tokenizer left in train mode would apply its dropout
            codes = self.tokenizer.encode(image[None].to(self.device))[0]  # (h, w)
        h, w = codes.shape
        gh, gw = self.prior.config.grid_size
        if h < gh or w < gw:
            th, tw = self.trained_pixels()
            raise ValueError(f"the image gives a {h}x{w} code grid, smaller than the prior's {gh}x{gw}: "
                             f"use an image of at least {th}x{tw} pixels")
        if keep_rows is not None and not 0 <= keep_rows <= h:
            raise ValueError(f"keep_rows (--keep-rows) must be between 0 and {h}, the code rows of the "
                             f"{image.shape[1]}x{image.shape[2]} px image completed, got {keep_rows}")
        if extend_right < 0 or extend_down < 0:
            raise ValueError("extend_right / extend_down must be >= 0")
        if (keep_rows is None or keep_rows == h) and not (extend_right or extend_down):
            raise ValueError(f"nothing to sample: keep fewer than all {h} code rows of the image, or add code "
                             "columns / rows")
        H, W = h + extend_down, w + extend_right * self.codes_per_position
        check_pixel_limit(*self.tokenizer.image_shape(H, W), f"extend_right={extend_right}, extend_down={extend_down}")
        canvas = torch.full((num_samples, H, W), -1, dtype=torch.long, device=self.device)
        canvas[:, :h, :w] = codes
        known = torch.zeros(H, W, dtype=torch.bool, device=self.device)
        known[: (h if keep_rows is None else keep_rows), :w] = True
        labels = self.labels_tensor(class_labels, num_samples)
        out = complete(self.prior, canvas, known_mask=known, class_labels=labels, sampling=sampling,
                       generator=sample_generators(seed, range(num_samples)), progress=progress,
                       window_stride=self._window_stride(),
                       compile=self.compile_decode)
        return self.decode_codes(out)

    def labels_tensor(self, class_labels: ClassLabels, num_samples: int) -> torch.Tensor | None:
        """Class labels (index, name, or a list / tensor of them) -> LongTensor (num_samples,) or None.

        Names become indices here; range and shape are checked by ``resolve_class_labels``.
        """
        if isinstance(class_labels, np.ndarray) and class_labels.dtype.kind in "US":  # numpy names
            class_labels = [str(x) for x in class_labels.reshape(-1)] if class_labels.ndim else str(class_labels)
        if isinstance(class_labels, str) or (isinstance(class_labels, (list, tuple))
                                             and any(isinstance(x, str) for x in class_labels)):
            one = isinstance(class_labels, str)
            class_labels = [self.class_index(x) for x in ([class_labels] if one else class_labels)]
        return resolve_class_labels(self.prior, class_labels, num_samples)  # type: ignore[arg-type]


def _hint(directory: Path) -> str:
    """What a folder given as a pipeline is instead, when that can be told: a run folder, or one export."""
    if (directory / "pipeline" / "prior").is_dir():
        return f"; this looks like a prior's run folder: use {directory / 'pipeline'}"
    kinds = {"vq_tokenizer": "a tokenizer export", "gpt_prior": "a prior export"}  # the exports' config.json kind
    try:
        kind = read_export_meta(directory).get("kind")
    except (OSError, ConfigError):  # no readable config.json: nothing more to say
        return ""
    if kind in kinds:
        # (said for every command: only sample and complete take the two exports apart)
        return (f"; it is {kinds[kind]}: give the RUN/pipeline/ that train-prior --tokenizer writes, or join "
                "the tokenizer and prior exports into one (VQGPTPipeline.from_parts(TOKENIZER, PRIOR)"
                ".save_pretrained(DIR)); sample and complete also take them apart (--tokenizer DIR --prior DIR)")
    return ""


def _weights_state(module: torch.nn.Module) -> tuple | None:
    """Each parameter's and buffer's (name, address, version, dtype, content fingerprint): changed by
    training, an in-place edit (through ``.data`` too, which bumps no version), a move, a cast or a
    replaced module; None for inference tensors (no version to tell)."""
    try:
        return tuple((name, t.data_ptr(), t._version, t.dtype,
                      content_fingerprint(t).float().cpu().numpy().tobytes() if t.is_floating_point() and t.numel() else b"")
                     for name, t in [*module.named_parameters(), *module.named_buffers()])
    except RuntimeError:
        return None


def _checked_image(image: torch.Tensor) -> torch.Tensor:
    """One RGB image (3, H, W) with float values in [-1, 1], as float32; an error says how to convert
    another one (the tokenizer would encode any numbers, into the codes of some other image). An image
    in [0, 1] lies inside [-1, 1] and cannot be told apart: the docstrings say [-1, 1]."""
    convert = "(from uint8 0..255: x.float() / 127.5 - 1; from 0..1: x * 2 - 1)"
    if not torch.is_tensor(image):
        raise ValueError(f"expected an image tensor (3, H, W) in [-1, 1], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected float values in [-1, 1], got {image.dtype} {convert}")
    lo, hi = float(image.min()), float(image.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the image holds NaN or inf values")
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"expected values in [-1, 1], got {lo:.4g}..{hi:.4g} {convert}")
    return image.float()


def _integral(value: object) -> bool:
    """Whether ``value`` is of an integer type: int, a numpy integer or a 0-d torch integer tensor (a float
    tensor has ``__index__`` too, and int() would truncate it); not bool."""
    return (not isinstance(value, bool) and hasattr(value, "__index__")
            and not (torch.is_tensor(value) and (value.is_floating_point() or value.dim() != 0)))


def _whole(name: str, value: object) -> int:
    """``value`` as an int when ``_integral``, else a ValueError naming ``name``: 2.0 or 2.5 samples or
    pixels would fail deep inside torch."""
    if not _integral(value):
        raise ValueError(f"{name} must be a whole number (int), got {value!r}")
    return int(value)  # type: ignore[call-overload]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a draw seeded with ``seed`` (a hash, the same on every process)."""
    digest = hashlib.blake2b(f"vqgpt-sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generators(seed: int | None, indices: Iterable[int]) -> list[torch.Generator] | None:
    """One CPU generator per sample, sample i's seeded from (``seed``, i): a sample does not depend on how many
    are drawn beside it, nor on the device (a CPU generator draws the same noise for a prior on any device,
    see ``stage2_prior.draw.exponential_noise``), and ``generate(n, seed=s)`` draws the codes of the first n images
    of ``vqgpt sample --out DIR/ --seed s`` (decoded in another batch, a pixel may differ by a level of 255).
    ``seed``: any integer type; None (the global RNG) gives None."""
    if seed is None:
        return None
    if not _integral(seed):  # tensor(1.5) would be read as 1
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not -(2**63) <= int(seed) < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be between -2**63 and 2**64 - 1, got {int(seed)}")
    return [torch.Generator(device="cpu").manual_seed(sample_seed(int(seed), i)) for i in indices]


def tokenizer_code_groups(tokenizer: VQModel) -> tuple[int, int] | None:
    """``stage2_prior.draw.code_groups`` of a prior of ``tokenizer``'s codes: (depth D, codes per depth K) for
    residual VQ with a codebook per depth, whose position p must be drawn from depth p % D's codes; else None."""
    quantizer = tokenizer.quantize
    depth = getattr(quantizer, "depth", 1)
    if depth > 1 and not getattr(quantizer, "shared_codebook", True):
        return depth, quantizer.depth_codebook_size
    return None


def check_compatible(tokenizer: VQModel, prior: GPT) -> None:
    """Raise a ConfigError naming the value that differs between a tokenizer and a prior."""
    if tokenizer.codebook_size != prior.config.codebook_size:
        raise ConfigError(f"vocabulary mismatch: the tokenizer has codebook_size={tokenizer.codebook_size} "
                          f"but the prior was trained with codebook_size={prior.config.codebook_size}")
    depth, width = tokenizer.codes_per_position, prior.config.grid_size[1]
    if width % depth:  # (found at generate otherwise, after loading and saving such a pair without a word)
        raise ConfigError(f"the tokenizer writes {depth} codes per position side by side in a code row (residual "
                          f"depth {depth}), but the prior's rows are {width} codes wide, not a multiple of {depth}: "
                          "it was not trained on this tokenizer's codes")


def check_class_names(names: list[str] | tuple[str, ...], num_classes: int | None) -> list[str]:
    """``names`` as a list if they can name the classes of a prior of ``num_classes`` classes (distinct
    strings, one per class index; none at all is fine), else ValueError saying what is wrong. The rule a
    pipeline's ``classes`` are set by, and what an importer checks before it writes a pipeline."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ValueError(f"classes must be a list of class names, got {type(names).__name__} {names!r}")
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"classes must be names (str), got {[type(n).__name__ for n in names][:5]}")
    counts = collections.Counter(names)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"class names must differ from each other; given more than once: {repeated[:5]}")
    if names and num_classes == 0:  # (listed and saved, they named classes no label can ask for)
        raise ValueError(f"{len(names)} class names for an unconditional prior (num_classes=0), which takes no "
                         "class label: give no names")
    if names and num_classes and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a prior of {num_classes} classes: give one name per class "
                         "index")
    return list(names)
