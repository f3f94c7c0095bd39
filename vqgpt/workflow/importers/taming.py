"""taming-transformers VQGAN (``last.ckpt`` + its YAML) -> a vqgpt tokenizer export.

Facts matched (CompVis/taming-transformers):
- ``taming/models/vqgan.py``: ``VQModel(ddconfig, lossconfig, n_embed, embed_dim, ...)`` holds
  ``encoder``, ``decoder``, ``loss`` (training only), ``quantize`` (``VectorQuantizer2``, beta fixed
  at 0.25), ``quant_conv`` (z_channels -> embed_dim) and ``post_quant_conv``; ``EMAVQ`` swaps in an
  ``EMAVectorQuantizer``; ``GumbelVQ`` a ``GumbelQuantize``.
- ``taming/modules/diffusionmodules/model.py``: ``Encoder``/``Decoder`` module names and attention
  placement (``curr_res in attn_resolutions``) are those of ``stage1_vq.modules``; keys map 1:1.
- ``taming/modules/vqvae/quantize.py``: nearest code by ||z||^2 + ||e||^2 - 2 z.e, codebook
  ``quantize.embedding.weight`` (n_embed, embed_dim), no normalisation. The EMA quantizer keeps
  ``embedding.{weight, cluster_size, embed_avg}`` and sets weight = embed_avg / smoothed cluster
  size, which is vqgpt's EMA update (``cluster_size``, ``embed_sum``).
- PyTorch Lightning checkpoints keep the weights under ``"state_dict"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple

import yaml

from stage1_vq.model import EXPORT_KIND, VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from vqgpt.ground.checkpoint import save_export
from vqgpt.ground.config import ConfigError
from vqgpt.workflow.importers import Drop, ImportResult, build_from_state, remap_state_dict, strip_wrapper_prefix, target_shapes
from vqgpt.workflow.importers.safe_load import find_state_dict, load_checkpoint

SUPPORTED_TARGETS = {  # target -> EMA codebook
    "taming.models.vqgan.VQModel": False,
    "taming.models.vqgan.VQNoDiscModel": False,
    "taming.models.vqgan.EMAVQ": True,
}
REFUSED_TARGETS = {
    "taming.models.vqgan.GumbelVQ": (
        "its GumbelQuantize picks codes by sampling Gumbel-softmax noise over logits from a 1x1 conv "
        "(quantize.proj), not by nearest-neighbour lookup; vqgpt has no Gumbel quantizer, so encoding could "
        "not be reproduced"),
    "taming.models.vqgan.VQSegmentationModel": "it tokenizes one-hot segmentation maps, not RGB images",
    "taming.models.cond_transformer.Net2NetTransformer": (
        "it is a transformer checkpoint; extract its VQGAN first (taming's scripts/extract_submodel.py ... "
        "first_stage_model) and import that with the first_stage_config as YAML"),
}
# ddconfig keys that only have one supported value (anything else changes the architecture).
_FIXED_DDCONFIG = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False,
                   "attn_type": "vanilla", "use_linear_attn": False}
_REQUIRED_DDCONFIG = ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                      "resolution", "z_channels")
# model.params keys that do not affect the tokenizer at inference.
_IGNORED_PARAMS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "monitor", "sane_index_shape"}
_NONE_ONLY_PARAMS = {
    "remap": "index remapping (remap) changes which code an index means; import the model without it",
    "colorize_nlabels": "colorize_nlabels belongs to segmentation models",
}
_LOSS_DROP = Drop("loss.*", "training loss networks (discriminator, LPIPS) are not part of the tokenizer")
_LEGACY_BETA_NOTE = (
    "taming's VectorQuantizer2 (legacy=True) trained with ||sg(q) - z||^2 + beta ||q - sg(z)||^2 (beta on the "
    "codebook term); vqgpt weights the commitment term by beta. Encoding and decoding are identical; "
    "fine-tuning uses vqgpt's placement.")


class TamingSpec(NamedTuple):
    """config: the vqgpt tokenizer config; target: taming's model class; notes: what differs in training."""

    config: VQModelConfig
    target: str
    notes: list[str]


def _model_section(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, Mapping):
        data, where = source, "config"
    else:
        where = str(source)
        try:
            data = yaml.safe_load(Path(source).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"taming config not found: {source}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'model' section")
    model = data.get("model", data)
    if not isinstance(model, Mapping) or "target" not in model:
        raise ConfigError(f"{where}: no 'model.target' found (expected taming's model: {{target, params}})")
    return model, where


def taming_config(source: str | Path | Mapping[str, Any]) -> TamingSpec:
    """Read taming's YAML (``model.target``, ``model.params.{ddconfig, n_embed, embed_dim}``; the
    lossconfig is ignored) into a ``VQModelConfig``; unsupported models and options are refused."""
    model, where = _model_section(source)
    target = str(model["target"])
    if target in REFUSED_TARGETS:
        raise ConfigError(f"{where}: model.target {target} is not supported: {REFUSED_TARGETS[target]}")
    if target not in SUPPORTED_TARGETS:
        raise ConfigError(f"{where}: unknown model.target {target!r} (supported: {', '.join(SUPPORTED_TARGETS)})")
    unknown_top = sorted(set(model) - {"target", "params", "base_learning_rate"})
    if unknown_top:
        raise ConfigError(f"{where}: unknown key(s) model.{unknown_top} in a taming model section")
    params = dict(model.get("params") or {})
    for key, why in _NONE_ONLY_PARAMS.items():
        if params.get(key) is not None:
            raise ConfigError(f"{where}: model.params.{key}={params[key]!r} is not supported: {why}")
    known = {"ddconfig", "n_embed", "embed_dim", *_IGNORED_PARAMS, *_NONE_ONLY_PARAMS}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {['model.params.' + k for k in unknown]} for {target}")
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise ConfigError(f"{where}: model.params.{key} is missing")
    dd = dict(params["ddconfig"])
    for key, value in _FIXED_DDCONFIG.items():
        if key in dd and dd[key] != value:
            raise ConfigError(f"{where}: model.params.ddconfig.{key}={dd[key]!r} is not supported (only {value!r})")
    unknown_dd = sorted(set(dd) - set(_REQUIRED_DDCONFIG) - set(_FIXED_DDCONFIG) - {"dropout"})
    if unknown_dd:
        raise ConfigError(f"{where}: unknown key(s) {['model.params.ddconfig.' + k for k in unknown_dd]}")
    missing = [k for k in _REQUIRED_DDCONFIG if k not in dd]
    if missing:
        raise ConfigError(f"{where}: model.params.ddconfig is missing {missing}")

    resolution, levels = int(dd["resolution"]), len(dd["ch_mult"])
    sizes = [resolution // 2**level for level in range(levels)]
    attn = [int(r) for r in dd["attn_resolutions"]]
    notes = [] if SUPPORTED_TARGETS[target] else [_LEGACY_BETA_NOTE]
    # taming silently gives no attention for sizes that never occur; vqgpt's config refuses them.
    unused = [r for r in attn if r not in sizes]
    if unused:
        notes.append(f"attn_resolutions {unused} match no feature-map size {sizes} (no attention there in taming "
                     "either) and were left out")
    quantizer = QuantizerConfig(kind="vq", codebook_size=int(params["n_embed"]), codebook_dim=int(params["embed_dim"]),
                                beta=0.25, ema=SUPPORTED_TARGETS[target])
    try:
        config = VQModelConfig(
            in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]), channels=int(dd["ch"]),
            channel_mult=[int(m) for m in dd["ch_mult"]], num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=list(dict.fromkeys(r for r in attn if r in sizes)), resolution=resolution,
            z_channels=int(dd["z_channels"]), dropout=float(dd.get("dropout", 0.0)), norm_groups=32,
            quantizer=quantizer)
    except ValueError as exc:
        raise ConfigError(f"{where}: ddconfig cannot be represented: {exc}") from None
    return TamingSpec(config, target, notes)


def taming_key(key: str, ema: bool) -> str | Drop:
    """taming state-dict key -> vqgpt key (module names are shared; EMA buffers move up one level)."""
    if key.startswith("loss."):
        return _LOSS_DROP
    if ema and key == "quantize.embedding.cluster_size":
        return "quantize.cluster_size"
    if ema and key == "quantize.embedding.embed_avg":
        return "quantize.embed_sum"
    return key


def import_taming(checkpoint: str | Path, config: str | Path | Mapping[str, Any], out: str | Path,
                  weights: str | None = None) -> ImportResult:
    """Convert taming's ``last.ckpt`` (or a .safetensors of its state dict) + YAML into a tokenizer export."""
    spec = taming_config(config)
    ema = spec.config.quantizer.ema
    source, entry = find_state_dict(load_checkpoint(checkpoint), ["state_dict"], checkpoint, weights)
    source = strip_wrapper_prefix(source)
    gumbel = [k for k in source if k.startswith(("quantize.proj.", "quantize.embed."))]
    if gumbel:
        raise ConfigError(f"{checkpoint}: holds a GumbelQuantize ({gumbel[0]}, ...): "
                          f"{REFUSED_TARGETS['taming.models.vqgan.GumbelVQ']}")
    state, dropped = remap_state_dict(source, lambda k: taming_key(k, ema), target_shapes(VQModel, spec.config),
                                      f"{checkpoint} ({spec.target}) -> vqgpt VQModel")
    model = build_from_state(VQModel, spec.config, state)
    extra = {"imported_from": {"format": "taming-transformers", "target": spec.target,
                               "checkpoint": Path(checkpoint).name, "weights": entry, "dropped": dropped,
                               "notes": spec.notes}}
    save_export(out, EXPORT_KIND, spec.config, model, extra)
    return ImportResult(Path(out), entry, len(state), dropped)
