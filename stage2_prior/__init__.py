"""Stage 2: a GPT prior over integer code grids (B, h, w) and its samplers; never imports stage 1."""

from stage2_prior.config import PRESETS, GPTConfig
from stage2_prior.draw import SamplingConfig, sample_logits, top_k_filter, top_p_filter
from stage2_prior.highres import complete, extend, generate_highres
from stage2_prior.layers import KVCache, set_weight_packing
from stage2_prior.model import GPT, count_parameters
from stage2_prior.sampling import generate

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "SamplingConfig", "complete", "count_parameters", "extend",
           "generate", "generate_highres", "sample_logits", "set_weight_packing", "top_k_filter", "top_p_filter"]
