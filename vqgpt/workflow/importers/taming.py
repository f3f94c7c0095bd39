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

import numbers
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

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


def _model_section(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str]:
    """(taming's model section, where it came from, its dotted key: 'model' or '' for a bare section)."""
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
    model, key = (data["model"], "model") if "model" in data else (data, "")
    if not isinstance(model, Mapping) or "target" not in model:
        raise ConfigError(f"{where}: no 'model.target' found (expected taming's model: {{target, params}})")
    return model, where, key


def _section(value: Any, key: str, where: str) -> dict[str, Any]:
    """The YAML mapping at dotted ``key`` (null: empty), else an error naming the file and the key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key}: expected a mapping of keys to values, got {value!r}")
    return dict(value)


def _integer(value: Any, key: str, where: str, low: int | None = 1) -> int:
    """An integer at dotted ``key`` (at least ``low``); YAML floats (256.0 too) and booleans are refused,
    as the project's own configs refuse them (a numpy integer from a Python mapping is an integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{where}: {key}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _integers(value: Any, key: str, where: str, low: int | None = 1, empty: bool = True) -> list[int]:
    """A YAML list (or a tuple, from a Python mapping) of integers at dotted ``key``; each item is named by its
    index when wrong."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or (not empty and not value):
        kind = "a list of integers" if empty else "a non-empty list of integers"
        raise ConfigError(f"{where}: {key}: expected {kind}, e.g. [1, 2], got {value!r}")
    return [_integer(item, f"{key}[{i}]", where, low) for i, item in enumerate(value)]


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
    return float(value)


def taming_config(source: str | Path | Mapping[str, Any]) -> TamingSpec:
    """Read taming's YAML (``model.target``, ``model.params.{ddconfig, n_embed, embed_dim}``; the
    lossconfig is ignored) into a ``VQModelConfig``; unsupported models and options are refused, and a
    value of the wrong type is an error naming the file and the dotted key."""
    model, where, top = _model_section(source)

    def key(*parts: str) -> str:
        return ".".join([top, *parts] if top else parts)

    target = str(model["target"])
    if target in REFUSED_TARGETS:
        raise ConfigError(f"{where}: {key('target')} {target} is not supported: {REFUSED_TARGETS[target]}")
    if target not in SUPPORTED_TARGETS:
        raise ConfigError(f"{where}: unknown {key('target')} {target!r} (supported: {', '.join(SUPPORTED_TARGETS)})")
    unknown_top = sorted(set(model) - {"target", "params", "base_learning_rate"})
    if unknown_top:
        raise ConfigError(f"{where}: unknown key(s) {[key(k) for k in unknown_top]} in a taming model section")
    params = _section(model.get("params"), key("params"), where)
    for name, why in _NONE_ONLY_PARAMS.items():
        if params.get(name) is not None:
            raise ConfigError(f"{where}: {key('params', name)}={params[name]!r} is not supported: {why}")
    known = {"ddconfig", "n_embed", "embed_dim", *_IGNORED_PARAMS, *_NONE_ONLY_PARAMS}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[key('params', k) for k in unknown]} for {target}")
    for name in ("ddconfig", "n_embed", "embed_dim"):
        if name not in params:
            raise ConfigError(f"{where}: {key('params', name)} is missing")
    if params["ddconfig"] is None:
        raise ConfigError(f"{where}: {key('params', 'ddconfig')}: expected a mapping of keys to values, got None")
    dd = _section(params["ddconfig"], key("params", "ddconfig"), where)

    def dd_key(name: str) -> str:
        return key("params", "ddconfig", name)

    for name, value in _FIXED_DDCONFIG.items():
        if name in dd and dd[name] != value:
            raise ConfigError(f"{where}: {dd_key(name)}={dd[name]!r} is not supported (only {value!r})")
    unknown_dd = sorted(set(dd) - set(_REQUIRED_DDCONFIG) - set(_FIXED_DDCONFIG) - {"dropout"})
    if unknown_dd:
        raise ConfigError(f"{where}: unknown key(s) {[dd_key(k) for k in unknown_dd]}")
    missing = [k for k in _REQUIRED_DDCONFIG if k not in dd]
    if missing:
        raise ConfigError(f"{where}: {key('params', 'ddconfig')} is missing {missing}")
    ints = {name: _integer(dd[name], dd_key(name), where)
            for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "resolution", "z_channels")}
    mult = _integers(dd["ch_mult"], dd_key("ch_mult"), where, empty=False)
    attn = _integers(dd["attn_resolutions"], dd_key("attn_resolutions"), where, low=None)
    dropout = _number(dd.get("dropout", 0.0), dd_key("dropout"), where)
    n_embed = _integer(params["n_embed"], key("params", "n_embed"), where)
    embed_dim = _integer(params["embed_dim"], key("params", "embed_dim"), where)

    resolution = ints["resolution"]
    sizes = [resolution // 2**level for level in range(len(mult))]
    notes = [] if SUPPORTED_TARGETS[target] else [_LEGACY_BETA_NOTE]
    # taming silently gives no attention for sizes that never occur; vqgpt's config refuses them.
    unused = [r for r in attn if r not in sizes]
    if unused:
        notes.append(f"attn_resolutions {unused} match no feature-map size {sizes} (no attention there in taming "
                     "either) and were left out")
    try:
        quantizer = QuantizerConfig(kind="vq", codebook_size=n_embed, codebook_dim=embed_dim, beta=0.25,
                                    ema=SUPPORTED_TARGETS[target])
        config = VQModelConfig(
            in_channels=ints["in_channels"], out_channels=ints["out_ch"], channels=ints["ch"], channel_mult=mult,
            num_res_blocks=ints["num_res_blocks"], attn_resolutions=list(dict.fromkeys(r for r in attn if r in sizes)),
            resolution=resolution, z_channels=ints["z_channels"], dropout=dropout, norm_groups=32,
            quantizer=quantizer)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key('params')} cannot be represented: {exc}") from None
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
