"""The join of the two stages: a tokenizer and a prior that sample and complete images together.

A pipeline folder is ``tokenizer/`` (a VQModel export) + ``prior/`` (a GPT export).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from stage1_vq.model import VQModel
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
        directory = Path(directory)
        for part, src, model in (("tokenizer", self.tokenizer_dir, self.tokenizer), ("prior", self.prior_dir, self.prior)):
            dst = directory / part
            if src is not None and src.resolve() != dst.resolve():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src is None:
                model.save_pretrained(dst)
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
        labels = _labels_tensor(class_labels, num_samples)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        codes = generate(self.prior, num_samples, class_labels=labels, grid_size=grid, temperature=temperature,
                         top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, generator=gen)
        return self.tokenizer.decode(codes.to(self.device)).clamp(-1, 1)


def _labels_tensor(class_labels, num_samples: int) -> torch.Tensor | None:
    if class_labels is None:
        return None
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
