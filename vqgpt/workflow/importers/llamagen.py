"""LlamaGen VQ tokenizers and class-to-image GPT priors -> vqgpt exports.

Facts matched (FoundationVision/LlamaGen):
- ``tokenizer/tokenizer_image/vq_model.py``: the VQGAN math of taming under other names. Encoder
  ``conv_blocks[i].{res[j], attn[j], downsample}`` (level i, highest resolution first), ``mid`` =
  ModuleList [ResnetBlock, AttnBlock, ResnetBlock]; decoder ``conv_blocks`` built lowest resolution
  first (``conv_blocks[k]`` is level L-1-k, ``upsample`` on all but the last); attention only at the
  lowest-resolution level; GroupNorm(32, eps 1e-6); ``ch`` = 128. Quantizer: codes and latents
  l2-normalised before the lookup (``codebook_l2_norm``), codebook (16384, 8) for VQ-16; the
  ``codebook_used`` buffer (65536,) is training-time usage bookkeeping.
- ``autoregressive/models/gpt.py``: ``cls_embedding.embedding_table`` has num_classes + 1 rows when
  class_dropout_prob > 0 (row num_classes = the null class), ``tok_embeddings``, ``layers.N.
  {attention.wqkv, attention.wo, feed_forward.w1/w2/w3, attention_norm, ffn_norm}``, ``norm``,
  ``output``; ``freqs_cis`` is a plain attribute (not in the state dict; dropped after a check if
  present); 2D RoPE with cls_token_num zero rows first. Presets: GPT-B (12 layers, 12 heads, 768),
  GPT-L (24, 16, 1024), GPT-XL (36, 20, 1280), GPT-XXL (48, 24, 1536), GPT-XXXL (48, 40, 2560),
  GPT-3B (24, 32, 3200); vocab 16384, block_size = (image_size / 16)**2, cls_token_num 1. ModelArgs
  defaults: multiple_of 256, ffn_dim_multiplier None, n_kv_head None (wqkv has (n_head + 2 * n_kv_head)
  * head_dim rows), class_dropout_prob 0.1.
- Checkpoints: ``{"model", "optimizer", "steps", "args"}`` (+ "ema"); train_c2i.py's ``args`` holds
  the preset name (``gpt_model``), vocab_size, image_size, downsample_size, num_classes, dropouts.
  Their VQ demo prefers "ema" then "model"; their GPT sampler reads "model", "module" (DeepSpeed),
  "state_dict", or a bare dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from stage1_vq.model import EXPORT_KIND as VQ_KIND
from stage1_vq.model import VQModel, VQModelConfig
from stage1_vq.quantizers import QuantizerConfig
from stage2_prior.config import PRESETS, GPTConfig, find_multiple
from stage2_prior.layers import rope_table_2d
from stage2_prior.model import EXPORT_KIND as GPT_KIND
from stage2_prior.model import GPT
from vqgpt.ground.checkpoint import copy_export, export_fingerprint, read_export_meta, save_export
from vqgpt.ground.config import ConfigError, from_dict, parse_override
from vqgpt.workflow.importers import Drop, ImportResult, build_from_state, remap_state_dict, strip_wrapper_prefix, target_shapes
from vqgpt.workflow.importers.safe_load import find_state_dict, load_checkpoint
from vqgpt.workflow.pipeline import check_class_names

VQ_PRESETS = {"VQ-16": [1, 1, 2, 2, 4], "VQ-8": [1, 2, 2, 4]}
# LlamaGen class-conditional sizes (n_layer, n_head, dim); GPT-B..XXL equal stage2_prior.PRESETS.
GPT_PRESETS = {
    "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560), "GPT-3B": (24, 32, 3200),
}
VQ_WEIGHTS_ORDER = ("ema", "model", "state_dict")  # LlamaGen's vq_demo.py
GPT_WEIGHTS_ORDER = ("model", "module", "state_dict")  # LlamaGen's sample_c2i.py (then a bare dict)
# LlamaGen train_c2i.py defaults, used for fine-tuning when the checkpoint carries no `args`.
GPT_TRAIN_DEFAULTS = {"dropout_p": 0.1, "token_dropout_p": 0.1, "drop_path_rate": 0.0}

_CODEBOOK_USED_DROP = Drop("quantize.codebook_used", "training-time code-usage bookkeeping")
_FREQS_DROP = Drop("freqs_cis", "2D RoPE table; recomputed from the config (checked equal)")


def _training_args(checkpoint: Any) -> dict[str, Any]:
    """The training script's arguments stored under 'args' (an argparse.Namespace), or {}."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


# Training args that an import option replaces: named in the error when the recorded value is unusable.
_ARG_FLAGS = {"image_size": "--image-size", "num_classes": "--num-classes"}


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (int, integral float, or such text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _option_int(value: Any, name: str) -> int:
    """A given option (e.g. image_size=) as a positive whole number."""
    number = _whole(value)
    if number is None or number < 1:
        raise ConfigError(f"{name} = {value!r} must be a positive whole number")
    return number


def _arg_int(args: Mapping[str, Any], key: str, path: Any, default: Any = None) -> Any:
    """The checkpoint's training arg ``key`` as a positive whole number (``default`` when it is absent);
    an unusable value is an error naming the file, the key and the option that replaces it."""
    if key not in args:
        return default
    value, flag = args[key], _ARG_FLAGS.get(key)
    if value is None:
        hint = f"; pass {flag} N" if flag else " (expected a positive whole number)"
        raise ConfigError(f"{path}: args.{key} is None in the checkpoint's training args{hint}")
    number = _whole(value)
    if number is None or number < 1:
        hint = f" (pass {flag} N to set it)" if flag else ""
        raise ConfigError(f"{path}: args.{key} = {value!r} must be a positive whole number{hint}")
    return number


def _arg_float(args: Mapping[str, Any], key: str, path: Any, default: float) -> float:
    """The checkpoint's training arg ``key`` as a finite number (``default`` when it is absent)."""
    if key not in args:
        return default
    value = args[key]
    try:
        number = float(value) if not isinstance(value, bool) and value is not None else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{path}: args.{key} = {value!r} must be a number (the checkpoint's training args)")
    return number


def _arg_bool(args: Mapping[str, Any], key: str, path: Any, default: bool) -> bool:
    """The checkpoint's training arg ``key`` as true/false (``default`` when it is absent)."""
    if key not in args:
        return default
    value = args[key]
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigError(f"{path}: args.{key} = {value!r} must be true or false (the checkpoint's training args)")


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return sorted(found)


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Any, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{path}: not a LlamaGen {what} state dict: key '{key}' is missing "
                         f"(found e.g. {sorted(state)[:8]})")
    return tuple(state[key].shape)


# ----------------------------------------------------------------------------- VQ tokenizer


def llamagen_vq_config(state: Mapping[str, torch.Tensor], image_size: int = 256, l2_norm: bool = True,
                       beta: float = 0.25, dropout: float = 0.0, preset: str | None = None,
                       path: Any = "checkpoint") -> VQModelConfig:
    """VQModelConfig of a LlamaGen VQ state dict: widths, depth and codebook read from its shapes,
    checked against ``preset`` ('VQ-16' / 'VQ-8') when given; attention at the lowest level only."""
    channels, in_channels = _shape(state, "encoder.conv_in.weight", path, "VQ")[:2]
    levels = _indices(state, r"encoder\.conv_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{path}: not a LlamaGen VQ state dict: encoder.conv_blocks levels {levels}")
    mult = [_shape(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", path, "VQ")[0] // channels for i in levels]
    if preset is not None:
        if preset not in VQ_PRESETS:
            raise ConfigError(f"unknown LlamaGen VQ preset '{preset}' (known: {', '.join(VQ_PRESETS)})")
        if mult != VQ_PRESETS[preset]:
            raise ConfigError(f"{path}: the checkpoint has channel multipliers {mult}, but {preset} has "
                              f"{VQ_PRESETS[preset]}")
    codebook_size, codebook_dim = _shape(state, "quantize.embedding.weight", path, "VQ")
    f = 2 ** (len(levels) - 1)
    if image_size % f:
        raise ConfigError(f"{path}: image_size {image_size} is not a multiple of the downsampling factor {f}")
    return VQModelConfig(
        in_channels=in_channels, out_channels=_shape(state, "decoder.conv_out.weight", path, "VQ")[0],
        channels=channels, channel_mult=mult,
        num_res_blocks=len(_indices(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")),
        attn_resolutions=[image_size // f], resolution=image_size,
        z_channels=_shape(state, "encoder.conv_out.weight", path, "VQ")[0], dropout=dropout, norm_groups=32,
        quantizer=QuantizerConfig(kind="vq", codebook_size=codebook_size, codebook_dim=codebook_dim,
                                  l2_norm=l2_norm, beta=beta))


_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def llamagen_vq_key(key: str, num_levels: int) -> str | Drop:
    """LlamaGen VQ key -> vqgpt key: conv_blocks/res -> down|up/block, decoder levels reversed, mid.0/1/2 named."""
    if key == "quantize.codebook_used":
        return _CODEBOOK_USED_DROP
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.{_MID.get(m[2], m[2])}.{m[3]}"
    m = re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.(res|attn|downsample)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.{'block' if m[2] == 'res' else m[2]}.{m[3]}"
    m = re.fullmatch(r"decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.(.+)", key)
    if m:  # built lowest resolution first: list position k is level L-1-k
        return f"decoder.up.{num_levels - 1 - int(m[1])}.{'block' if m[2] == 'res' else m[2]}.{m[3]}"
    return key


def import_llamagen_vq(checkpoint: str | Path, out: str | Path, preset: str | None = None,
                       image_size: int | None = None, l2_norm: bool | None = None,
                       weights: str | None = None) -> ImportResult:
    """Convert a LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt) into a tokenizer export at ``out``.

    Options left as None come from the checkpoint's training ``args`` when present, else LlamaGen's
    defaults (image_size 256, l2-normalised codebook, beta 0.25).
    """
    ckpt = load_checkpoint(checkpoint)
    args = _training_args(ckpt)
    source, entry = find_state_dict(ckpt, VQ_WEIGHTS_ORDER, checkpoint, weights)
    source = strip_wrapper_prefix(source)
    if preset is None and isinstance(args.get("vq_model"), str) and args["vq_model"] in VQ_PRESETS:
        preset = args["vq_model"]
    config = llamagen_vq_config(
        source, image_size=(_option_int(image_size, "image_size") if image_size is not None
                            else _arg_int(args, "image_size", checkpoint, 256)),
        l2_norm=_arg_bool(args, "codebook_l2_norm", checkpoint, True) if l2_norm is None else bool(l2_norm),
        beta=_arg_float(args, "commit_loss_beta", checkpoint, 0.25),
        dropout=_arg_float(args, "dropout_p", checkpoint, 0.0), preset=preset, path=checkpoint)
    levels = len(config.channel_mult)
    state, dropped = remap_state_dict(source, lambda k: llamagen_vq_key(k, levels), target_shapes(VQModel, config),
                                      f"{checkpoint} (LlamaGen VQ) -> vqgpt VQModel")
    model = build_from_state(VQModel, config, state)
    extra = {"imported_from": {"format": "LlamaGen VQ", "preset": preset, "checkpoint": Path(checkpoint).name,
                               "weights": entry, "dropped": dropped}}
    save_export(out, VQ_KIND, config, model, extra)
    return ImportResult(Path(out), entry, len(state), dropped)


# ----------------------------------------------------------------------------- class-to-image GPT


# What LlamaGen's ModelArgs use when a preset leaves them open.
LLAMAGEN_FFN_DEFAULTS: dict[str, Any] = {"multiple_of": 256, "ffn_dim_multiplier": None}
# Fields that other options set; --set may not.
_SET_ELSEWHERE = {"grid_size": "image_size (--image-size)", "num_classes": "num_classes (--num-classes)"}
_INT_FIELDS = ("codebook_size", "n_layer", "n_head", "n_kv_head", "dim", "multiple_of")


def preset_architecture(name: str) -> dict[str, Any]:
    """The GPTConfig fields a preset fixes: LlamaGen's GPT_PRESETS first, then stage2_prior.PRESETS."""
    if name in GPT_PRESETS:
        n_layer, n_head, dim = GPT_PRESETS[name]
        return {"n_layer": n_layer, "n_head": n_head, "dim": dim}
    if name in PRESETS:
        return dict(PRESETS[name])
    raise ConfigError(f"unknown GPT preset '{name}' (known: {', '.join(dict.fromkeys([*GPT_PRESETS, *PRESETS]))})")


def parse_model_overrides(items: list[str] | None) -> dict[str, Any]:
    """``['model.n_head=16', ...]`` (the CLI's --set) -> {'n_head': 16}; values are parsed as YAML."""
    valid = sorted(f.name for f in dataclasses.fields(GPTConfig))
    model: dict[str, Any] = {}
    for item in items or []:
        path, value = parse_override(item)
        if len(path) != 2 or path[0] != "model" or path[1] not in valid:
            raise ConfigError(f"--set {item}: expected model.KEY=VALUE with KEY one of {', '.join(valid)}")
        model[path[1]] = value
    return model


Given = dict[str, tuple[Any, str]]  # field -> (value, where it came from), for the error messages


def _given_architecture(preset: str | None, model: Mapping[str, Any] | None, train_args: Mapping[str, Any],
                        path: Any) -> Given:
    """The fields fixed by the preset (given, else recorded in args.gpt_model), args.vocab_size and ``model``."""
    recorded = train_args.get("gpt_model")
    recorded = recorded if isinstance(recorded, str) else None
    known = {*GPT_PRESETS, *PRESETS}
    if preset is not None and recorded in known and preset != recorded:
        raise ConfigError(f"{path}: preset {preset} was given, but the checkpoint records gpt_model={recorded} "
                          "in its training args; leave the preset out to use the recorded one")
    name = preset if preset is not None else (recorded if recorded in known else None)
    given: Given = {}
    if name is not None:
        origin = f"preset {name}" + (" (the checkpoint's args.gpt_model)" if preset is None else "")
        given.update({k: (v, origin) for k, v in preset_architecture(name).items()})
    if "vocab_size" in train_args:
        given["codebook_size"] = (_arg_int(train_args, "vocab_size", path), "the checkpoint's args.vocab_size")
    for key, value in (model or {}).items():
        if key in _SET_ELSEWHERE:
            raise ConfigError(f"model.{key} is set by {_SET_ELSEWHERE[key]}, not by --set")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key in _INT_FIELDS and not is_int and not (key == "n_kv_head" and value is None):
            raise ConfigError(f"model.{key}: expected an integer, got {value!r}")
        if key in given and given[key][0] != value:
            raise ConfigError(f"model.{key} = {value} was given, but {given[key][1]} has {given[key][0]}")
        given[key] = (value, "given")
    return given


def _heads(state: Mapping[str, torch.Tensor], given: Given, dim: int, n_layer: int, recorded: Any,
           path: Any) -> tuple[int, int | None]:
    """(n_head, n_kv_head): heads given or from a stored RoPE table (wqkv is (3 * dim, dim) however the
    width is split), key/value heads from the rows of wqkv."""
    freqs = state.get("freqs_cis")
    rope_head_dim = 2 * freqs.shape[1] if isinstance(freqs, torch.Tensor) and freqs.ndim == 3 else None
    if "n_head" in given:
        n_head, origin = given["n_head"]
        if n_head < 1 or dim % n_head:
            raise ConfigError(f"{path}: model.n_head = {n_head} ({origin}) does not divide the width {dim} "
                              "of the weights")
        if rope_head_dim is not None and dim // n_head != rope_head_dim:
            raise ConfigError(f"{path}: model.n_head = {n_head} ({origin}), head size {dim // n_head}, but the "
                              f"stored freqs_cis is for head size {rope_head_dim} (n_head = {dim // rope_head_dim})")
    elif rope_head_dim is not None and dim % rope_head_dim == 0:
        n_head = dim // rope_head_dim
    else:
        note = f"records gpt_model={recorded!r}, which vqgpt does not know" if recorded else "records no gpt_model"
        matches = [n for n, (nl, _, d) in GPT_PRESETS.items() if (nl, d) == (n_layer, dim)]
        hint = f" (its {n_layer} layers of width {dim} match preset {matches[0]})" if matches else ""
        raise ConfigError(f"{path}: model.n_head: the weights do not fix the number of attention heads and the "
                          f"checkpoint {note}; pass a preset{hint} or --set model.n_head=N")
    head_dim = dim // n_head
    qkv_rows = _shape(state, "layers.0.attention.wqkv.weight", path, "GPT")[0]
    if qkv_rows <= dim or (qkv_rows - dim) % (2 * head_dim):
        raise ConfigError(f"{path}: layers.0.attention.wqkv.weight has {qkv_rows} rows, which fits no number of "
                          f"key/value heads for width {dim} and n_head={n_head}")
    n_kv = (qkv_rows - dim) // (2 * head_dim)
    if "n_kv_head" in given and (given["n_kv_head"][0] or n_head) != n_kv:
        raise ConfigError(f"{path}: model.n_kv_head = {given['n_kv_head'][0]} ({given['n_kv_head'][1]}), "
                          f"but the weights have {n_kv} (rows of layers.0.attention.wqkv.weight)")
    return n_head, (None if n_kv == n_head else n_kv)


def _ffn(state: Mapping[str, torch.Tensor], given: Given, dim: int, n_head: int, path: Any) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier that give the weights' feed-forward width (they only round towards it)."""
    hidden = _shape(state, "layers.0.feed_forward.w1.weight", path, "GPT")[0]
    ffn = {k: given[k][0] if k in given else v for k, v in LLAMAGEN_FFN_DEFAULTS.items()}
    width = GPTConfig(dim=dim, n_head=n_head, **ffn).ffn_hidden_dim
    if width == hidden:
        return ffn
    base = int(2 * 4 * dim / 3)
    fits = [2 ** i for i in range(hidden.bit_length(), -1, -1) if find_multiple(base, 2 ** i) == hidden]
    if any(k in given for k in LLAMAGEN_FFN_DEFAULTS) or not fits:
        origins = ", ".join(given[k][1] for k in LLAMAGEN_FFN_DEFAULTS if k in given) or "LlamaGen's defaults"
        raise ConfigError(f"{path}: model.multiple_of / model.ffn_dim_multiplier: the weights have a feed-forward "
                          f"width of {hidden} (layers.0.feed_forward.w1.weight), but width {dim} with "
                          f"multiple_of={ffn['multiple_of']}, ffn_dim_multiplier={ffn['ffn_dim_multiplier']} "
                          f"({origins}) gives {width}; set them to match")
    # Nothing given: the largest power of two that rounds int(8 * dim / 3) up to the weights' width.
    return {**ffn, "multiple_of": fits[0]}


def llamagen_gpt_config(state: Mapping[str, torch.Tensor], grid_size: int, num_classes: int | None = None,
                        preset: str | None = None, model: Mapping[str, Any] | None = None,
                        train_args: Mapping[str, Any] | None = None, path: Any = "checkpoint") -> GPTConfig:
    """GPTConfig of a LlamaGen c2i state dict.

    Read from the weights: vocabulary, width, depth, key/value heads, feed-forward width, class rows
    (``num_classes`` None: all rows but the null class). Given: ``preset`` (else the checkpoint's
    recorded ``args.gpt_model``) and ``model`` (GPTConfig fields, e.g. {'n_head': 16}) for what the
    weights leave open, chiefly the number of heads. A given or recorded value that the weights
    contradict is an error naming the field.
    """
    train_args = dict(train_args or {})
    given = _given_architecture(preset, model, train_args, path)

    def from_weights(key: str, value: int, where: str) -> int:
        if key in given and given[key][0] != value:
            raise ConfigError(f"{path}: model.{key} = {given[key][0]} ({given[key][1]}), "
                              f"but the weights have {value} ({where})")
        return value

    vocab, dim = _shape(state, "tok_embeddings.weight", path, "GPT")
    layers = _indices(state, r"layers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{path}: not a LlamaGen GPT state dict: transformer layers {layers}")
    resolved: dict[str, Any] = {
        "codebook_size": from_weights("codebook_size", vocab, "rows of tok_embeddings.weight"),
        "dim": from_weights("dim", dim, "width of tok_embeddings.weight"),
        "n_layer": from_weights("n_layer", len(layers), f"layers.0 to layers.{layers[-1]}"),
    }
    resolved["n_head"], resolved["n_kv_head"] = _heads(state, given, dim, len(layers), train_args.get("gpt_model"),
                                                       path)
    resolved.update(_ffn(state, given, dim, resolved["n_head"], path))

    rows = _shape(state, "cls_embedding.embedding_table.weight", path, "GPT")[0]
    if num_classes is None:
        num_classes = rows - 1  # LlamaGen's c2i default class_dropout_prob = 0.1: the last row is the null class
    if rows == num_classes + 1:
        class_dropout = 0.1  # LlamaGen's class_dropout_prob: the extra row is the null class
    elif rows == num_classes:
        class_dropout = 0.0
    else:
        raise ConfigError(f"{path}: the class table has {rows} rows, which fits neither num_classes={num_classes} "
                          f"nor num_classes + 1 (null class); pass the right num_classes")

    args = {k: _arg_float(train_args, k, path, v) for k, v in GPT_TRAIN_DEFAULTS.items()}
    drop_path = args["drop_path_rate"]
    fields = {k: v for k, (v, _) in given.items()}
    fields.update(resolved, grid_size=[grid_size, grid_size], num_classes=num_classes)
    fields.setdefault("class_dropout", class_dropout)
    fields.setdefault("token_dropout", args["token_dropout_p"])
    fields.setdefault("dropout", 0.0 if drop_path > 0 else args["dropout_p"])  # as train_c2i.py
    fields.setdefault("drop_path", drop_path)
    return from_dict(GPTConfig, fields, prefix="model")


def _check_freqs_cis(freqs: torch.Tensor, config: GPTConfig, path: Any) -> None:
    """A stored LlamaGen freqs_cis (1 + h*w, head_dim/2, [cos, sin]) must equal our 2D RoPE table."""
    ours = rope_table_2d(tuple(config.grid_size), config.head_dim, config.rope_base)
    ours = torch.view_as_real(ours) if ours.is_complex() else ours  # (1 + h*w, head_dim/2, 2) either way
    if tuple(freqs.shape) != tuple(ours.shape):
        cells = freqs.shape[0] - 1 if freqs.ndim == 3 else -1
        side = math.isqrt(cells) if cells > 0 else 0
        hint = (f" (it is for a {side}x{side} grid: pass the image size it was trained at)"
                if side * side == cells else "")
        raise ConfigError(f"{path}: freqs_cis has shape {tuple(freqs.shape)}, expected {tuple(ours.shape)} for grid "
                          f"{config.grid_size} and head size {config.head_dim}{hint}")
    if not torch.allclose(freqs.float(), ours, atol=1e-5):
        raise ConfigError(f"{path}: the stored freqs_cis differs from LlamaGen's 2D RoPE for grid {config.grid_size} "
                          f"(max diff {(freqs.float() - ours).abs().max():.3g}); this is not a c2i LlamaGen prior")


def llamagen_gpt_key(key: str) -> str | Drop:
    """LlamaGen GPT key -> vqgpt key: only the class table is renamed."""
    if key == "cls_embedding.embedding_table.weight":
        return "class_embedding.weight"
    if key == "freqs_cis":
        return _FREQS_DROP
    return key


def _check_pipeline_paths(tokenizer: str | Path, out: str | Path) -> None:
    """Refuse a pipeline folder ``out`` that writing would tangle with the ``tokenizer`` export it copies:
    ``out`` in (or equal to) the tokenizer's folder, or the tokenizer being ``out``/prior, which the prior
    replaces. ``out``/tokenizer itself is fine: the export is already where it goes."""
    tok, pipe = Path(tokenizer).resolve(), Path(out).resolve()
    if pipe.is_relative_to(tok):
        where = "is" if pipe == tok else "is inside"
        raise ConfigError(f"--out {out} {where} the --tokenizer folder {tokenizer}: writing the pipeline there "
                          "would put the tokenizer inside its own folder; choose an --out outside it")
    prior = (pipe / "prior").resolve()  # (a link there leads where the prior is written)
    if tok == prior or tok.is_relative_to(prior):
        raise ConfigError(f"--tokenizer {tokenizer} is the prior/ folder of --out {out}, which the import writes "
                          "the prior into, replacing the tokenizer; choose another --out")


def import_llamagen_gpt(checkpoint: str | Path, tokenizer: str | Path, out: str | Path, preset: str | None = None,
                        image_size: int | None = None, num_classes: int | None = None,
                        class_names: list[str] | None = None, weights: str | None = None,
                        model: Mapping[str, Any] | None = None) -> ImportResult:
    """Convert a LlamaGen c2i GPT (e.g. c2i_B_256.pt) into a pipeline folder ``out`` = tokenizer/ + prior/.

    ``tokenizer`` is the vqgpt export of the VQ it was trained on (e.g. from ``import_llamagen_vq``);
    its downsampling factor turns ``image_size`` (default: the checkpoint's args, else 256) into the grid.
    The architecture is read from the weights where they fix it; the rest (the number of heads) comes
    from ``preset`` (default: the checkpoint's recorded ``args.gpt_model``) or ``model`` (GPTConfig
    fields such as {'n_head': 16}); see ``llamagen_gpt_config``.
    """
    _check_pipeline_paths(tokenizer, out)
    ckpt = load_checkpoint(checkpoint)
    args = _training_args(ckpt)
    source, entry = find_state_dict(ckpt, GPT_WEIGHTS_ORDER, checkpoint, weights)
    source = strip_wrapper_prefix(source)
    text = [k for k in source if k.startswith(("cls_embedding.cap_proj.", "cls_embedding.uncond_embedding"))]
    gpt_type = args.get("gpt_type", "c2i")
    if text or gpt_type != "c2i":
        what = (f"a text-to-image LlamaGen prior ({text[0]})" if text else
                f"a text-to-image LlamaGen prior (gpt_type {gpt_type})" if gpt_type == "t2i" else
                f"args.gpt_type = {gpt_type!r}, not a class-to-image prior")
        raise ConfigError(f"{checkpoint}: {what}; only class-to-image (c2i) priors can be imported")
    if _arg_int(args, "cls_token_num", checkpoint, 1) != 1:
        raise ConfigError(f"{checkpoint}: cls_token_num={args['cls_token_num']}; vqgpt priors have one prefix slot")

    tok_config = from_dict(VQModelConfig, read_export_meta(tokenizer, VQ_KIND)["config"])
    f = tok_config.downsample_factor
    if image_size is not None:
        image_size, origin = _option_int(image_size, "image_size"), "image_size"
    else:
        image_size = _arg_int(args, "image_size", checkpoint, 256)
        origin = f"{checkpoint}: args.image_size" if "image_size" in args else "image_size (default)"
    downsample = _arg_int(args, "downsample_size", checkpoint)
    if downsample is not None and downsample != f:
        raise ConfigError(f"{checkpoint} was trained on codes of a /{downsample} tokenizer, "
                          f"but {tokenizer} downsamples by {f}")
    if image_size % f:
        raise ConfigError(f"{origin} {image_size} is not a multiple of the tokenizer's downsampling factor {f}")
    if num_classes is None:
        num_classes = _arg_int(args, "num_classes", checkpoint)
    config = llamagen_gpt_config(source, image_size // f, num_classes, preset=preset, model=model, train_args=args,
                                 path=checkpoint)
    num_classes = config.num_classes
    if config.codebook_size != tok_config.quantizer.codebook_size:
        raise ConfigError(f"{checkpoint} predicts {config.codebook_size} codes, but tokenizer {tokenizer} has "
                          f"codebook_size={tok_config.quantizer.codebook_size}")
    if class_names is not None:
        try:
            check_class_names(class_names, config.num_classes)  # the rule the written pipeline loads them by
        except ValueError as exc:
            raise ConfigError(f"class names (--classes): {exc}") from None
    if "freqs_cis" in source:
        _check_freqs_cis(source["freqs_cis"], config, checkpoint)

    state, dropped = remap_state_dict(source, llamagen_gpt_key, target_shapes(GPT, config),
                                      f"{checkpoint} (LlamaGen GPT) -> vqgpt GPT")
    prior = build_from_state(GPT, config, state)
    out = Path(out)
    tokenizer_out = out / "tokenizer"
    if Path(tokenizer).resolve() != tokenizer_out.resolve():
        copy_export(tokenizer, tokenizer_out)  # its two files only, not whatever else its folder holds
    extra: dict[str, Any] = {"tokenizer_fingerprint": export_fingerprint(tokenizer_out),
                             "imported_from": {"format": "LlamaGen c2i GPT",
                                               "preset": preset or args.get("gpt_model"), "set": dict(model or {}),
                                               "checkpoint": Path(checkpoint).name, "weights": entry,
                                               "dropped": dropped}}
    if class_names is not None:
        extra["classes"] = list(class_names)
    save_export(out / "prior", GPT_KIND, config, prior, extra)
    return ImportResult(out, entry, len(state), dropped)
