"""The quantizer's config: which kind turns latents into codes, and its options."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vqgpt.ground.config import ConfigError, changed_keys, check_number, opt
from vqgpt.ground.tokens import MAX_CODEBOOK_SIZE

QUANTIZER_KINDS = ("vq", "fsq", "lfq", "rvq")
LEARNED_KINDS = ("vq", "rvq")  # the kinds with learned codebooks, which take the vq options
DEFAULT_VQ_CODEBOOK_SIZE = 1024
MAX_LFQ_DIM = 18
# float key -> (low, low excluded, high (excluded) or None): the range its kinds require
_FLOAT_RANGES = {"beta": (0, False, None), "ema_decay": (0, True, 1), "restart_threshold": (0, False, None),
                 "entropy_weight": (0, False, None), "entropy_temperature": (0, True, None),
                 "lfq_temperature": (0, True, None), "lfq_sample_entropy_weight": (0, False, None),
                 "lfq_codebook_entropy_weight": (0, False, None)}


@dataclass
class QuantizerConfig:
    """How latents become discrete codes."""

    kind: str = opt("vq", "quantizer: 'vq' (learned codebook), 'fsq' (finite scalar quantization), 'lfq' "
                          "(lookup-free quantization, MAGVIT-2: the signs of lfq_dim channels) or 'rvq' (residual "
                          "VQ: rvq_depth learned codebooks in a row, each quantizing what the ones before left)")
    codebook_size: int | None = opt(None, "number of codes; null = 1024 for 'vq' and 'rvq' (per depth), "
                                          "prod(fsq_levels) for 'fsq', 2**lfq_dim for 'lfq' (a value set for 'fsq' "
                                          "or 'lfq' must equal that)")
    codebook_dim: int | None = opt(None, "channels of the code vectors (quant_conv maps z_channels to it); null = "
                                         "z_channels for 'vq' and 'rvq', len(fsq_levels) for 'fsq', lfq_dim for 'lfq'")
    l2_norm: bool = opt(False, "vq: l2-normalise latents and codes before the lookup (ViT-VQGAN / LlamaGen)")
    beta: float = opt(0.25, "vq, lfq: weight of the commitment loss ||z - sg(q)||^2")
    ema: bool = opt(False, "vq: update the codebook by exponential moving averages instead of a codebook loss")
    ema_decay: float = opt(0.99, "vq: decay of the EMA codebook and of the per-code usage counts")
    restart_threshold: float = opt(0.0, "vq: re-seed a code from current encoder outputs when its EMA hit count "
                                        "per step (summed over ranks) falls below this; 0 = off")
    kmeans_init: bool = opt(False, "vq: initialise the codebook by k-means on the first training batch "
                                      "(under grad_accum, its first micro-batch: give it at least codebook_size "
                                      "latents)")
    kmeans_iters: int = opt(10, "vq: Lloyd iterations of the k-means init")
    rotation_trick: bool = opt(False, "vq: pass gradients with the rotation trick (Fifty et al. 2024) "
                                      "instead of the straight-through estimator")
    simvq: bool = opt(False, "vq: SimVQ (Zhu et al. 2024): the codebook is a frozen random buffer C and the "
                             "lookup uses W(C), W a learned linear map trained by the codebook loss; keeps more "
                             "codes in use at large codebook_size. Not with ema, kmeans_init or restart_threshold")
    entropy_weight: float = opt(0.0, "vq: weight of LlamaGen's entropy penalty (its entropy_loss_ratio): mean "
                                     "per-sample entropy of softmax(-||z - c||^2 / entropy_temperature) minus the "
                                     "entropy of its batch mean (over all ranks; per micro-batch under grad_accum), so "
                                     "that usage spreads; 0 = off. "
                                     "Costs a (tokens x codebook_size) matrix per step")
    entropy_temperature: float = opt(0.01, "vq: temperature of the entropy penalty's softmax, a squared distance: "
                                           "0.01 (LlamaGen's) suits l2-normalised codes; for unnormalised ones "
                                           "take about the mean squared distance to the nearest code, the logged "
                                           "commitment x the codes' channels (0.07 for the full-dim codebook of "
                                           "the README's tokenizer leaderboard)")
    fsq_levels: list[int] = opt([8, 8, 8, 5, 5, 5], "fsq: number of levels per channel")
    lfq_dim: int = opt(10, f"lfq: bits per code d (1..{MAX_LFQ_DIM}); codebook_size = 2**d, codebook_dim = d. "
                           "The prior's vocabulary is 2**d: its token embedding and (untied) output head hold "
                           "2 * 2**d * dim weights (d=18, dim 768: 403M, 1.6 GB in fp32, four times that with "
                           "their gradients and AdamW's two moments) and its fp32 logits 4 * 2**d bytes per token "
                           "(1 MiB at d=18)")
    lfq_temperature: float = opt(0.5, "lfq: temperature of the softmax over the 2**d codes, "
                                      "softmax(-||z - c||^2 / T), that the entropy losses use. MAGVIT-2's 0.01 "
                                      "makes the probabilities one-hot for latents away from a sign boundary, so "
                                      "the entropy losses move few of them and, on batches of fewer tokens than "
                                      "codes, leave most codes unused")
    lfq_sample_entropy_weight: float = opt(0.1, "lfq: weight of the mean per-sample entropy (minimised: each "
                                                "latent commits to one code)")
    lfq_codebook_entropy_weight: float = opt(0.4, "lfq: weight of the codebook entropy, the entropy of the "
                                                  "batch-mean code distribution over all ranks (per micro-batch "
                                                  "under grad_accum; maximised: "
                                                  "codes used evenly); computed exactly at every lfq_dim. Above "
                                                  "the sample weight so that it outweighs the pull of each "
                                                  "latent back into its own code (MAGVIT-2: 0.1)")
    rvq_depth: int = opt(4, "rvq: codes per latent position D; each depth has the vq options (l2_norm only the "
                            "first: the residuals after it are not unit vectors). Codes for stage 2 are an (h, w*D) "
                            "grid, a position's D codes side by side in its row (depth 0 first), so the prior reads "
                            "position by position, depth by depth: its sequences are D times longer (attention "
                            "D^2 times the cost), and larger canvases are best sampled with windows moving D "
                            "columns at a time")
    rvq_shared_codebook: bool = opt(False, "rvq: one codebook for every depth (prior vocabulary codebook_size) "
                                           "instead of one per depth (vocabulary rvq_depth * codebook_size, depth d's "
                                           "codes numbered from d * codebook_size). Not with l2_norm")
    usage_window: int = opt(100, "training steps over which the 'usage' statistic counts a code as used")

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {list(QUANTIZER_KINDS)}, got {self.kind!r}")
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1 or null, got {self.codebook_dim}")
        # Every option's range holds whichever kind reads it: a value no kind could use (ema_decay=5 with
        # fsq) is a mistake to name, not an option to ignore (in range, another kind's option is ignored).
        # check_number is a test NaN fails (restart_threshold=NaN once turned restarts off without a word).
        for name, (low, low_open, high) in _FLOAT_RANGES.items():
            check_number(name, getattr(self, name), low, high, low_open=low_open, high_open=high is not None)
        for name in ("kmeans_iters", "rvq_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.lfq_dim <= MAX_LFQ_DIM:
            raise ValueError(f"lfq_dim must be in 1..{MAX_LFQ_DIM} (2**lfq_dim codes), got {self.lfq_dim}")
        if not self.fsq_levels or any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels must be a non-empty list of integers >= 2, got {self.fsq_levels}")
        if self.kind in LEARNED_KINDS:
            self._check_vq()
            return
        vq_only = {"l2_norm": self.l2_norm, "ema": self.ema, "kmeans_init": self.kmeans_init,
                   "rotation_trick": self.rotation_trick, "restart_threshold": self.restart_threshold > 0,
                   "simvq": self.simvq, "entropy_weight": self.entropy_weight != 0}
        bad = [name for name, on in vq_only.items() if on]
        if bad:
            # (names the field `kind`, so that a --set of either side is the one blamed, not the YAML file)
            raise ValueError(f"{', '.join(bad)} {'applies' if len(bad) == 1 else 'apply'} only to kind 'vq' and "
                             f"'rvq', not kind {self.kind!r}")
        if self.rvq_shared_codebook:
            raise ValueError(f"rvq_shared_codebook applies only to kind 'rvq', not kind {self.kind!r}")
        if self.kind == "fsq":
            if math.prod(self.fsq_levels) > MAX_CODEBOOK_SIZE:
                raise ConfigError(f"fsq_levels: {self.fsq_levels} give {math.prod(self.fsq_levels)} codes, more than "
                                  f"the {MAX_CODEBOOK_SIZE} (2**31) a token shard can store")
            dim, size, source = len(self.fsq_levels), math.prod(self.fsq_levels), f"fsq_levels {self.fsq_levels}"
        else:
            dim, size, source = self.lfq_dim, 2 ** self.lfq_dim, f"lfq_dim {self.lfq_dim}"
        if self.codebook_dim is not None and self.codebook_dim != dim:
            name = "len(fsq_levels)" if self.kind == "fsq" else "lfq_dim"
            raise ValueError(f"codebook_dim ({self.codebook_dim}) must equal {name} ({dim}) for kind {self.kind!r}")
        # Derived from the levels / bits; a value the user wrote must agree rather than be replaced.
        if self.codebook_size is not None and self.codebook_size != size:
            raise ValueError(f"codebook_size {self.codebook_size} disagrees with {source}, "
                             f"which give{'s' if self.kind == 'lfq' else ''} {size} codes; "
                             f"leave codebook_size out (or set it to {size})")
        self.codebook_size = size

    def ignored_keys(self) -> list[str]:
        """The numeric options of other kinds set away from their defaults (rvq_depth with kind vq, ...):
        each is in range (else refused above), but this kind does not read it."""
        readers = {"rvq_depth": ("rvq",), "lfq_dim": ("lfq",), "fsq_levels": ("fsq",), "beta": ("vq", "rvq", "lfq"),
                   "ema_decay": LEARNED_KINDS, "kmeans_iters": LEARNED_KINDS, "entropy_temperature": LEARNED_KINDS,
                   "lfq_temperature": ("lfq",), "lfq_sample_entropy_weight": ("lfq",),
                   "lfq_codebook_entropy_weight": ("lfq",)}
        return changed_keys(self, [key for key, kinds in readers.items() if self.kind not in kinds])

    def _check_vq(self) -> None:
        if self.codebook_size is None:
            self.codebook_size = DEFAULT_VQ_CODEBOOK_SIZE
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.codebook_size > MAX_CODEBOOK_SIZE:  # its codes would not fit the token shards' int32
            raise ConfigError(f"codebook_size: must be at most {MAX_CODEBOOK_SIZE} (2**31, the codes a token shard "
                              f"can store), got {self.codebook_size}")
        if self.kind == "rvq":
            vocabulary = self.codebook_size * (1 if self.rvq_shared_codebook else self.rvq_depth)
            if vocabulary > MAX_CODEBOOK_SIZE:  # depth d's codes are numbered from d * codebook_size
                raise ConfigError(f"codebook_size: {self.codebook_size} codes per depth x rvq_depth {self.rvq_depth} "
                                  f"give {vocabulary} tokens, more than the {MAX_CODEBOOK_SIZE} (2**31) a token "
                                  f"shard can store")
            if self.rvq_shared_codebook and self.l2_norm:
                raise ValueError("rvq_shared_codebook with l2_norm: the shared codes would be unit vectors, but the "
                                 "residuals after the first depth are not; use one codebook per depth "
                                 "(rvq_shared_codebook: false) or l2_norm: false")
        elif self.rvq_shared_codebook:
            raise ValueError(f"rvq_shared_codebook applies only to kind 'rvq', not kind {self.kind!r}")
        if self.simvq:
            # These write code vectors directly, but SimVQ's code vectors are W(C) with C frozen.
            clash = [name for name, on in {"ema": self.ema, "kmeans_init": self.kmeans_init,
                                           "restart_threshold": self.restart_threshold > 0}.items() if on]
            if clash:
                raise ValueError(f"simvq learns only the linear map over a frozen codebook; turn off "
                                 f"{', '.join(clash)} (they write code vectors directly)")

    def latent_dim(self, z_channels: int) -> int:
        """Channels the quantizer works in (the output width of quant_conv)."""
        if self.codebook_dim is not None:
            return self.codebook_dim
        return {"fsq": len(self.fsq_levels), "lfq": self.lfq_dim}.get(self.kind, z_channels)
