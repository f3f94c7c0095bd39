"""The join of the two stages: a tokenizer and a prior that sample and complete images together.

A pipeline folder is ``tokenizer/`` (a VQModel export) + ``prior/`` (a GPT export).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from stage1_vq.model import VQModel
from stage2_prior.highres import complete
from stage2_prior.model import GPT
from stage2_prior.sampling import generate
from vqgpt.checkpoint import read_export_meta
from vqgpt.config import ConfigError


class VQGPTPipeline:
    """Tokenizer + prior. ``generate`` returns images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, tokenizer: VQModel, prior: GPT, classes: list[str] | None = None) -> None:
        check_compatible(tokenizer, prior)
        self.tokenizer = tokenizer.eval()
        self.prior = prior.eval()
        self.classes = list(classes or [])
        self.tokenizer_dir: Path | None = None
        self.prior_dir: Path | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_parts(cls, tokenizer_dir: str | Path, prior_dir: str | Path, check_fingerprint: bool = True,
                   map_location: str = "cpu") -> "VQGPTPipeline":
        """Load a tokenizer export and a prior export; refuse a prior trained on another tokenizer's codes."""
        from vqgpt.encode import tokenizer_fingerprint

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
        pipe = cls(tokenizer, prior, classes=extra.get("classes"))
        pipe.tokenizer_dir, pipe.prior_dir = Path(tokenizer_dir), Path(prior_dir)
        return pipe

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "VQGPTPipeline":
        """Load a pipeline folder (``tokenizer/`` + ``prior/``)."""
        directory = Path(directory)
        for part in ("tokenizer", "prior"):
            if not (directory / part).is_dir():
                raise FileNotFoundError(f"{directory} is not a pipeline folder: {part}/ is missing "
                                        "(a pipeline folder holds tokenizer/ and prior/ exports)")
        return cls.from_parts(directory / "tokenizer", directory / "prior", map_location=map_location)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``tokenizer/`` and ``prior/`` into ``directory`` (copies the source exports when known)."""
        from vqgpt.encode import tokenizer_fingerprint

        directory = Path(directory)
        tok_dst, prior_dst = directory / "tokenizer", directory / "prior"
        if self.tokenizer_dir is not None:
            if self.tokenizer_dir.resolve() != tok_dst.resolve():
                shutil.copytree(self.tokenizer_dir, tok_dst, dirs_exist_ok=True)
        else:
            self.tokenizer.save_pretrained(tok_dst)
        if self.prior_dir is not None:
            if self.prior_dir.resolve() != prior_dst.resolve():
                shutil.copytree(self.prior_dir, prior_dst, dirs_exist_ok=True)
        else:
            self.prior.save_pretrained(prior_dst, extra={"classes": self.classes,
                                                         "tokenizer_fingerprint": tokenizer_fingerprint(tok_dst)})
        return directory

    def to(self, device: str | torch.device) -> "VQGPTPipeline":
        self.tokenizer.to(device)
        self.prior.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def downsample_factor(self) -> int:
        return self.tokenizer.downsample_factor

    # ------------------------------------------------------------------ generation
    def grid_for_pixels(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Pixel size -> code grid (h, w); sizes must be multiples of the downsampling factor."""
        f = self.downsample_factor
        h0, w0 = self.prior.config.grid_size
        height = height or h0 * f
        width = width or w0 * f
        for name, value, trained in (("height", height, h0), ("width", width, w0)):
            if value % f != 0:
                lo, hi = (value // f) * f, (value // f + 1) * f
                raise ValueError(f"{name}={value} is not a multiple of the tokenizer's downsampling factor {f}: "
                                 f"use {lo} or {hi}")
            if value // f < trained:
                raise ValueError(f"{name}={value} is smaller than the prior's trained size {trained * f} "
                                 f"({trained} codes x {f} pixels)")
        return height // f, width // f

    def class_index(self, label: int | str) -> int:
        """A class given by index or by name -> its index."""
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in self.classes:
                raise ValueError(f"unknown class {label!r}; known classes: {self.classes}")
            return self.classes.index(label)
        index = int(label)
        n = self.prior.config.num_classes
        if not 0 <= index < n:
            raise ValueError(f"class label {index} out of range: this prior has {n} classes" if n else
                             "this prior is unconditional: it takes no class label")
        return index

    @torch.inference_mode()
    def generate(self, num_samples: int, class_labels: int | list[int] | torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """Sample images (num_samples, 3, H, W) in [-1, 1]; larger H, W use sliding-window sampling."""
        grid = self.grid_for_pixels(height, width)
        labels = self.labels_tensor(class_labels, num_samples)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        codes = generate(self.prior, num_samples, class_labels=labels, grid_size=grid, temperature=temperature,
                         top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, generator=gen)
        return self.tokenizer.decode(codes.to(self.device)).clamp(-1, 1)

    def trained_pixels(self) -> tuple[int, int]:
        """Pixel size (H, W) of the prior's training grid."""
        h, w = self.prior.config.grid_size
        return h * self.downsample_factor, w * self.downsample_factor

    @torch.inference_mode()
    def complete(self, image: torch.Tensor, num_samples: int, keep_rows: int | None = None,
                 extend_right: int = 0, extend_down: int = 0,
                 class_labels: int | list[int] | torch.Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0,
                 seed: int | None = None) -> torch.Tensor:
        """Complete or extend one image (3, H, W) in [-1, 1] -> (num_samples, 3, H', W').

        The image is encoded; its first ``keep_rows`` code rows (all rows when None) are kept
        unchanged, ``extend_right`` / ``extend_down`` code columns / rows are added, and every other
        cell is sampled in raster order with sliding windows where the canvas exceeds the trained grid.
        """
        if image.dim() != 3:
            raise ValueError(f"expected one image (3, H, W), got shape {tuple(image.shape)}")
        self.tokenizer.grid_shape(image.shape[1], image.shape[2])  # clear error for sizes that are not a multiple of f
        codes = self.tokenizer.encode(image[None].to(self.device))[0]  # (h, w)
        h, w = codes.shape
        gh, gw = self.prior.config.grid_size
        if h < gh or w < gw:
            raise ValueError(f"the image gives a {h}x{w} code grid, smaller than the prior's {gh}x{gw}: "
                             f"use an image of at least {gh * self.downsample_factor}x{gw * self.downsample_factor} pixels")
        if keep_rows is not None and not 0 <= keep_rows <= h:
            raise ValueError(f"keep_rows must be between 0 and {h} (the image's code rows), got {keep_rows}")
        if extend_right < 0 or extend_down < 0:
            raise ValueError("extend_right / extend_down must be >= 0")
        H, W = h + extend_down, w + extend_right
        canvas = torch.full((num_samples, H, W), -1, dtype=torch.long, device=self.device)
        canvas[:, :h, :w] = codes
        known = torch.zeros(H, W, dtype=torch.bool, device=self.device)
        known[: (h if keep_rows is None else keep_rows), :w] = True
        labels = self.labels_tensor(class_labels, num_samples)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        out = complete(self.prior, canvas, known_mask=known, class_labels=labels, temperature=temperature,
                       top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, generator=gen)
        return self.tokenizer.decode(out).clamp(-1, 1)

    def labels_tensor(self, class_labels, num_samples: int) -> torch.Tensor | None:
        """Class labels (index, name, or a list / tensor of them) -> LongTensor (num_samples,) or None."""
        if class_labels is None:
            return None
        if isinstance(class_labels, (str, int)):
            class_labels = [class_labels]
        if not isinstance(class_labels, torch.Tensor):
            class_labels = [self.class_index(x) for x in class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(num_samples).clone()
        if labels.numel() != num_samples:
            raise ValueError(f"got {labels.numel()} class labels for {num_samples} samples")
        return labels


def check_compatible(tokenizer: VQModel, prior: GPT) -> None:
    """Raise a ConfigError naming the value that differs between a tokenizer and a prior."""
    if tokenizer.codebook_size != prior.config.codebook_size:
        raise ConfigError(f"vocabulary mismatch: the tokenizer has codebook_size={tokenizer.codebook_size} "
                          f"but the prior was trained with codebook_size={prior.config.codebook_size}")
