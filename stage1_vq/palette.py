"""Pixel tokens (Image GPT style): a palette of K colours, each pixel's token the index of its nearest colour.

``VQModel`` with ``architecture: pixels`` has no encoder or decoder: the latent of an image is the
image itself (downsampling factor 1), its quantizer is a frozen ``PaletteQuantizer``, and decoding
maps each token back to its colour. The palette is fitted, not trained by gradients: ``fit_palette``
runs k-means in RGB (k-means++ or seeded random init, then Lloyd iterations) over a seeded sample of
training pixels streamed from the training images, as Image GPT clusters (R, G, B) into 512 colours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from stage1_vq.quantizers.common import BaseQuantizer, QuantizerOutput, code_counts, nearest_code
from vqgpt.ground.config import ConfigError, opt
from vqgpt.ground.data import DataConfig, build_dataset, readable_batches

PALETTE_INITS = ("kmeans++", "random")


@dataclass
class PaletteConfig:
    """How `train-tokenizer` fits the colour palette of ``model.architecture: pixels`` (k-means in RGB)."""

    sample_pixels: int = opt(1_000_000, "pixels: training pixels the k-means sees, a seeded random sample streamed "
                                        "from the training images (train.seed, train.batch_size)")
    pixels_per_image: int = opt(256, "pixels: at most this many random pixels of each image read, so that the "
                                     "sample spans many images (0 = every pixel)")
    iterations: int = opt(20, "pixels: Lloyd iterations after the initialisation")
    init: str = opt("kmeans++", "pixels: initial colours, 'kmeans++' (spread out by D^2 sampling) or 'random' "
                                "(K distinct sampled pixels)")

    def __post_init__(self) -> None:
        if self.sample_pixels < 1:
            raise ValueError(f"sample_pixels must be >= 1, got {self.sample_pixels}")
        if self.pixels_per_image < 0:
            raise ValueError(f"pixels_per_image must be >= 0 (0 = every pixel), got {self.pixels_per_image}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.init not in PALETTE_INITS:
            raise ValueError(f"init must be one of {list(PALETTE_INITS)}, got {self.init!r}")


# ----------------------------------------------------------------------------- the quantizer


def nearest_colour(pixels: torch.Tensor, palette: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest palette colour (squared L2, ties to the lower index) of each pixel (N, C) -> (N,).

    Exact differences, not ``nearest_code``'s ``||c||^2 - 2 x.c`` expansion: its rounding can pick a
    slightly farther colour when two colours lie close together, and a palette colour must always map
    back to its own index.
    """
    pixels, palette = pixels.float(), palette.float()
    rows = max(1, max_elements // (palette.shape[0] * palette.shape[1]))  # bound the (rows, K, C) differences
    out = [(chunk[:, None, :] - palette[None]).pow(2).sum(-1).argmin(-1) for chunk in pixels.split(rows)]
    return torch.cat(out) if out else pixels.new_zeros(0, dtype=torch.long)


class PaletteQuantizer(BaseQuantizer):
    """A frozen palette (K, C): latents (B, C, h, w) are pixels, their codes the nearest colours' indices."""

    def __init__(self, codebook_size: int, channels: int = 3, usage_window: int = 100) -> None:
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, channels
        # A buffer, not a parameter: nothing trains it (``fit_palette`` writes it), and it is exported.
        self.register_buffer("palette", torch.zeros(codebook_size, channels))
        self._init_usage(usage_window)

    def check_palette(self, where: str) -> None:
        """Raise ConfigError unless the palette is one ``fit_palette`` could have made: finite colours in
        [-1, 1], each of which encodes back to its own index (a hand-edited NaN entry was the nearest
        colour of every pixel, and a duplicate colour never encodes to its second index)."""
        palette = self.palette.float()
        bad = (~torch.isfinite(palette).all(1)).nonzero().flatten()
        if len(bad):
            raise ConfigError(f"{where}: palette colour {int(bad[0])} is {palette[bad[0]].tolist()}, not finite")
        outside = (palette.abs() > 1 + 1e-4).any(1).nonzero().flatten()
        if len(outside):
            raise ConfigError(f"{where}: palette colour {int(outside[0])} is {palette[outside[0]].tolist()}, "
                              "outside the pixel range [-1, 1]")
        back = nearest_colour(palette, palette)
        wrong = (back != torch.arange(len(palette), device=back.device)).nonzero().flatten()
        if len(wrong):
            i = int(wrong[0])
            raise ConfigError(f"{where}: palette colour {i} encodes as colour {int(back[i])} (the same or a nearer "
                              f"colour): each of the {len(palette)} colours must be distinct; fit the palette again")

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, h, w) -> indices (B, h, w) int64 of their nearest palette colours."""
        self._check_latents(z)
        B, C, h, w = z.shape
        return nearest_colour(z.permute(0, 2, 3, 1).reshape(-1, C), self.palette).view(B, h, w)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> colours (B, C, h, w)."""
        return self.palette[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Pixels (B, C, h, w) -> QuantizerOutput(colours, indices, zero loss, usage / perplexity)."""
        indices = self.lookup(z)
        counts = code_counts(indices, self.codebook_size)
        return QuantizerOutput(self.codes_from_indices(indices).to(z.dtype), indices, z.new_zeros(()),
                               self._usage_stats(counts))


# ----------------------------------------------------------------------------- fitting


class PaletteFit(NamedTuple):
    """palette (K, C); distortion: mean squared pixel-to-colour distance after the init and each Lloyd
    iteration (len iterations + 1); counts (K,): sample pixels per colour at the end; num_pixels sampled."""

    palette: torch.Tensor
    distortion: list[float]
    counts: torch.Tensor
    num_pixels: int


def sample_pixels(data: DataConfig, num_pixels: int, pixels_per_image: int = 256, seed: int = 0,
                  batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Up to ``num_pixels`` pixels (N, C) of the training images of ``data``, read in a seeded random order,
    at most ``pixels_per_image`` random ones from each (0 = all); stops reading once it has enough."""
    dataset = build_dataset(data, "train")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen).tolist()
    taken: list[torch.Tensor] = []
    have = 0
    bar = tqdm(total=num_pixels, desc="palette: sampling pixels", unit="px", disable=not progress, dynamic_ncols=True)
    for images, _labels in readable_batches(Subset(dataset, order), batch_size):
        B, C = images.shape[:2]
        flat = images.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, H*W, C)
        per = flat.shape[1] if pixels_per_image == 0 else min(pixels_per_image, flat.shape[1])
        if per < flat.shape[1]:
            pick = torch.rand(B, flat.shape[1], generator=gen).argsort(dim=1)[:, :per]  # distinct pixels per image
            flat = flat.gather(1, pick[..., None].expand(-1, -1, C))
        chunk = flat.reshape(-1, C)[: num_pixels - have]
        taken.append(chunk)
        have += len(chunk)
        bar.update(len(chunk))
        if have >= num_pixels:
            break
    bar.close()
    if not taken:
        raise ValueError(f"no training image of {data.source} could be read to fit the palette")
    return torch.cat(taken)


def _first_distinct(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` distinct rows of ``rows`` (N, C), in order of first appearance (fewer if there are not n)."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows)).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
    return rows[first.sort().values[:n]].clone()


def _init_colours(pixels: torch.Tensor, k: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """Initial colours (k, C), distinct sampled pixels: drawn at random, or by k-means++ (D^2 sampling)."""
    shuffled = pixels[torch.randperm(len(pixels), generator=gen)]
    if how == "random":
        return _fill_distinct(_first_distinct(shuffled, k), k, gen)
    # k-means++ on a bounded frequency-weighted subsample: its k sequential passes cost O(N k)
    cand = _first_distinct(shuffled[: max(64 * k, 4096)], max(64 * k, 4096))
    if len(cand) <= k:  # fewer distinct colours than k: all of them, plus colours no pixel maps to
        return _fill_distinct(_first_distinct(shuffled, k), k, gen)
    chosen = [int(torch.randint(len(cand), (1,), generator=gen))]
    d2 = (cand - cand[chosen[0]]).pow(2).sum(-1)
    for _ in range(k - 1):
        cum = d2.cumsum(0)  # inverse-CDF draw with probability d2 / sum(d2): a tenth of multinomial's time
        nxt = min(int(torch.searchsorted(cum, torch.rand(1, generator=gen) * cum[-1], right=True)), len(cand) - 1)
        chosen.append(nxt)
        d2 = torch.minimum(d2, (cand - cand[nxt]).pow(2).sum(-1))
    return cand[chosen].clone()


def _fill_distinct(colours: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``colours`` (n <= k distinct) padded to k distinct colours with random ones in [-1, 1] (codes never hit)."""
    out = colours
    while len(out) < k:
        extra = torch.rand(k - len(out), colours.shape[1], generator=gen) * 2 - 1
        out = torch.cat([out, extra[(extra[:, None, :] != out[None]).any(-1).all(-1)]])
    return out[:k].clone()


def kmeans(pixels: torch.Tensor, k: int, iterations: int = 20, init: str = "kmeans++", seed: int = 0,
           progress: bool = True, on_iteration: Callable[[int, float], None] | None = None) -> PaletteFit:
    """k-means of ``pixels`` (N, C) into ``k`` distinct colours: init, then ``iterations`` Lloyd steps.

    An emptied cluster is re-seeded with the pixel farthest from its colour; colours that coincide are
    split the same way, so that every palette colour decodes to a colour that encodes back to it.
    ``on_iteration(i, distortion)`` sees the distortion after the init (i = 0) and each iteration.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(seed)
    pixels = pixels.float()
    colours = _init_colours(pixels, k, init, gen)
    history: list[float] = []

    def assign() -> tuple[torch.Tensor, torch.Tensor]:
        idx = nearest_code(pixels, colours)  # the fast lookup is fine here: a near-tie moves a centroid by ~0
        return idx, (pixels - colours[idx]).pow(2).sum(-1)

    idx, d2 = assign()
    history.append(float(d2.mean()))
    if on_iteration is not None:
        on_iteration(0, history[-1])
    for it in tqdm(range(1, iterations + 1), desc="palette: k-means", disable=not progress, dynamic_ncols=True):
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(colours).index_add_(0, idx, pixels)
        used = counts > 0
        colours = torch.where(used[:, None], sums / counts.clamp_min(1)[:, None], colours)
        idx, d2 = assign()
        colours, changed = _reseed(colours, idx, d2, pixels, ~used)
        if changed:
            idx, d2 = assign()
        history.append(float(d2.mean()))
        if on_iteration is not None:
            on_iteration(it, history[-1])
    colours = _distinct(colours, pixels, gen)
    final = nearest_code(pixels, colours)
    return PaletteFit(colours, history, torch.bincount(final, minlength=k), len(pixels))


def _reseed(colours: torch.Tensor, idx: torch.Tensor, d2: torch.Tensor, pixels: torch.Tensor,
            empty: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Move the colours of emptied clusters onto the pixels farthest from their colours (distinct ones)."""
    slots = empty.nonzero().flatten()
    if not len(slots):
        return colours, False
    far = d2.argsort(descending=True)
    picks = torch.unique(pixels[far[: 4 * len(slots)]], dim=0, sorted=False)
    picks = picks[(picks[:, None, :] != colours[None]).any(-1).all(-1)]  # not already a colour
    n = min(len(slots), len(picks))
    if n == 0:
        return colours, False
    colours = colours.clone()
    colours[slots[:n]] = picks[:n]
    return colours, True


def _distinct(colours: torch.Tensor, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``colours`` with exact duplicates (clusters that emptied out alike) replaced by other colours: the
    sample pixels farthest from the kept colours, then random ones."""
    kept = _first_distinct(colours, len(colours))
    if len(kept) == len(colours):
        return colours
    cand = torch.unique(pixels, dim=0)
    d2 = (cand - kept[nearest_colour(cand, kept)]).pow(2).sum(-1)
    far = cand[d2.argsort(descending=True)][d2.sort(descending=True).values > 0]
    return _fill_distinct(torch.cat([kept, far[: len(colours) - len(kept)]]), len(colours), gen)


def fit_palette(data: DataConfig, k: int, cfg: PaletteConfig, seed: int = 0, batch_size: int = 64,
                progress: bool = True, on_iteration: Callable[[int, float], None] | None = None) -> PaletteFit:
    """Fit ``k`` colours (k, C) in the images' range [-1, 1] by k-means over a sample of ``data``'s training pixels."""
    pixels = sample_pixels(data, cfg.sample_pixels, cfg.pixels_per_image, seed=seed, batch_size=batch_size,
                           progress=progress)
    return kmeans(pixels, k, iterations=cfg.iterations, init=cfg.init, seed=seed, progress=progress,
                  on_iteration=on_iteration)
