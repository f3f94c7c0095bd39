"""The `vqgpt` command: each subcommand builds a config and calls one library function."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from vqgpt.ground.files import check_can_make_file, finite_or_null, write_json_whole, write_text_whole

# stage2_prior.draw.CFG_SCHEDULES, spelled out so that parsing flags imports no torch (a test keeps them equal)
CFG_SCHEDULE_CHOICES = ("constant", "linear")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable; the value is read as YAML: "
                        "quote text that YAML would read otherwise, --set 'data.source=\"yes\"')")
    p.add_argument("--out", required=True, help="run folder (config, metrics, samples, checkpoints, export/)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue the run in --out from its newest complete checkpoint ('auto'; starts afresh "
                        "when there is none yet) or from a checkpoint folder; only the keys listed in the README "
                        "(train.steps, logging, ...) may differ from the run's config")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run --out already holds: its checkpoints, metrics, samples and export are "
                        "deleted before training starts (without --resume or --overwrite, a run folder that "
                        "holds a run is an error)")


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from stage1_vq.train import TokenizerRunConfig, train_tokenizer
    from vqgpt.ground.config import load_config

    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    train_tokenizer(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high``; argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # inf would pass a bound of inf; NaN passes no comparison
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if not (value > low if low_open else value >= low) or not value <= high:
            bounds = (f"> {low:g}" if low_open else f">= {low:g}") + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _torch_device(text: str) -> str:
    """An argparse type: a torch device that exists here (checked before any model loads)."""
    from vqgpt.ground.checkpoint import usable_device

    try:
        usable_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _emit_json(args: argparse.Namespace, document: dict) -> None:
    """Hand the command's one JSON document to main(), which prints it on the real stdout."""
    args.json_document = document


def _first_process() -> bool:
    """Not a later process of an ``accelerate launch``: where a command's report is said (once, not per process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _launched() -> bool:
    """Under ``accelerate launch`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _add_hf_flags(p: argparse.ArgumentParser) -> None:
    """The data.hf_* options of an hf: image source, for the commands that read one but take no config."""
    g = p.add_argument_group("hf: sources (a Hugging Face dataset)")
    g.add_argument("--hf-image-column", default="", help="the image column (data.hf_image_column; default: the first "
                   "column of Image type, else one named image or img)")
    g.add_argument("--hf-label-column", default="", help="the class column (data.hf_label_column; default: the first "
                   "ClassLabel column, else one named label, labels or cls, else one class; none: one class)")
    g.add_argument("--hf-split", default="train", help="the train split (data.hf_split; the eval split is "
                   "validation, else test, else this one)")


def _hf_options(args: argparse.Namespace) -> dict[str, str]:
    """The DataConfig fields that ``_add_hf_flags`` set."""
    return {"hf_image_column": args.hf_image_column, "hf_label_column": args.hf_label_column,
            "hf_split": args.hf_split}


def _refuse_launch(command: str, work: str) -> None:
    """A command that runs in one process, under ``accelerate launch`` with several: one clear error before
    any work, not a lock or port that every process but one fails to take part-way."""
    if _launched():
        raise ValueError(f"vqgpt {command} {work} in one process: run it without accelerate launch")


def _check_image_file(path_text: str, flag: str) -> Path:
    """Decode one image file with Pillow alone (no torch); a folder, empty or damaged file is one clear error."""
    from PIL import Image

    path = Path(path_text)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give one image file")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {path} is an empty file (0 bytes): give an image file")
    try:
        with Image.open(path) as img:
            img.load()  # the whole file: a truncated one fails here
    except Exception as exc:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"{flag} {path} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    return path


@contextlib.contextmanager
def _image_source(source: str, flag: str) -> Iterator[str]:
    """A folder or builtin:* as is; one image file as a temporary one-image folder (a link to it)."""
    path = Path(source)
    if not path.is_file():
        yield source
        return
    from vqgpt.ground.images import IMAGE_EXTENSIONS

    _check_image_file(source, flag)  # a damaged file is reported under the user's path, not the temporary one
    with tempfile.TemporaryDirectory(prefix="vqgpt-image-") as tmp:
        # the folder scan lists known extensions only; Pillow reads the file by its content
        link = Path(tmp) / (path.name if path.suffix.lower() in IMAGE_EXTENSIONS else path.name + ".png")
        try:
            link.symlink_to(path.resolve())
        except OSError:  # no symlinks here (e.g. Windows without the privilege)
            shutil.copy2(path, link)
        yield tmp


def _image_out_extensions() -> list[str]:
    """File extensions of the image formats Pillow can write here, PNG first."""
    from PIL import Image

    registered = Image.registered_extensions()
    return [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff") if registered.get(e) in Image.SAVE]


# In the folder of `--save-each`: the names the last --save-each wrote there, so that a re-run replaces its
# own images and nothing else
SAVE_EACH_RECORD = ".vqgpt-save-each.json"


def _save_each_written(folder: Path) -> set[str]:
    """Names an earlier --save-each recorded writing into ``folder`` (with the record itself), else empty."""
    try:
        names = json.loads((folder / SAVE_EACH_RECORD).read_text())
    except (OSError, ValueError):
        return set()
    if not (isinstance(names, list) and all(isinstance(n, str) and re.fullmatch(r"\d{4,}\.png", n) for n in names)):
        return set()  # not a record of ours (or edited): nothing in the folder counts as written by us
    return {*names, SAVE_EACH_RECORD}


def _check_image_out(path_text: str, save_each: bool = False, inputs: dict[str, str] | None = None) -> None:
    """Refuse an --out (and the --save-each folder beside it) that cannot be written, or would replace an
    input or files vqgpt did not write, before any work is done."""
    accepted = _image_out_extensions()
    path = Path(path_text)
    if path.suffix.lower() not in accepted:
        what = ("has no file extension" if not path.suffix
                else f"has the extension {path.suffix}, not one vqgpt writes images in")
        raise ValueError(f"--out {path_text} {what}: end it with one of {', '.join(accepted)} "
                         f"(e.g. {path.with_suffix('.png') if path.name else 'samples.png'})")
    if path.is_dir():
        raise ValueError(f"--out {path_text} is a folder: give an image file name such as {path / 'samples.png'}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {path_text}: {parent} is a file, so no folder can be made there")
    if parent is not None:
        check_can_make_file(parent, f"--out {path_text}")
    for flag, given in (inputs or {}).items():
        # as written (symlinks) and with "dir/.." taken away (the folders --out names are made before writing)
        same = [p for p in (path, Path(os.path.abspath(path))) if p.exists() and Path(given).exists()]
        if any(os.path.samefile(p, given) for p in same):
            raise ValueError(f"--out {path_text} is the {flag} image: the result would replace it; give another --out")
    if save_each:
        folder = path.with_suffix("")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--save-each writes one PNG per image into {folder}/, but {folder} is a file: "
                             f"choose another --out")
        for flag, given in (inputs or {}).items():  # its images are replaced, and files it wrote before removed
            if folder.resolve() in Path(given).resolve().parents:
                raise ValueError(f"{flag} {given} lies in {folder}/, where --save-each writes this run's images (and "
                                 "removes those an earlier one wrote): copy it elsewhere, or choose another --out")
        theirs = sorted(set(os.listdir(folder)) - _save_each_written(folder)) if folder.is_dir() else []
        if theirs:
            # an earlier vqgpt's --save-each kept no record: its images are told from the user's by a name only
            unrecorded = (not (folder / SAVE_EACH_RECORD).exists()
                          and all(re.fullmatch(r"\d{4,}\.png", name) for name in theirs))
            shown = f"{', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}"
            raise ValueError(f"--save-each writes one PNG per image into {folder}/, which holds files no earlier "
                             f"--save-each recorded writing ({shown})"
                             + (" (an earlier vqgpt's --save-each kept no record: if they are its images, delete "
                                "them)" if unrecorded else "") + ": choose another --out, or empty that folder")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from stage1_vq.evaluate import SOURCES_NAME, check_out_apart, reconstruct
    from vqgpt.training.config import launched_process_state

    check_out_apart(args.images, args.out)  # here too: one image file is read through a temporary folder
    # under accelerate launch the processes split the batches: each writes its reconstructions, the first the rest
    state = launched_process_state("each would reconstruct every image")
    with _image_source(args.images, "--images") as source:
        metrics = reconstruct(args.tokenizer, source, args.out, num_images=args.num, resolution=args.resolution,
                              batch_size=args.batch_size, lpips=args.lpips, progress=not args.json, state=state,
                              data_options=_hf_options(args))
    if not _first_process():  # every process holds the metrics; the first wrote the summary and says so
        return 0
    if source != args.images:  # one image file: the user's path
        metrics["images"] = args.images
        write_json_whole(Path(args.out) / "metrics.json", metrics)
        # and its own name, not the temporary link's (which may have gained a .png)
        sources = {"names": [Path(args.images).name], "unreadable": []}
        write_text_whole(Path(args.out) / SOURCES_NAME, json.dumps(sources, indent=2) + "\n")
    if args.json:
        _emit_json(args, metrics)
    else:
        lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
        print(f"{metrics['num_images']} images at {metrics['resolution']}px -> grid {metrics['grid']}\n"
              f"PSNR {metrics['psnr']:.2f} dB | SSIM {metrics['ssim']:.4f} | LPIPS {lp} | "
              f"{metrics['bits_per_image']:.0f} bits/image\n"
              f"codebook usage {metrics['codebook_usage']:.1%} of {metrics['codebook_size']} codes over "
              f"{metrics['num_tokens']:,} tokens (perplexity {metrics['perplexity']:.1f})"
              + (" - under 10 tokens per code, so usage undercounts: pass more images"
                 if metrics["num_tokens"] < 10 * metrics["codebook_size"] else "")
              + f"\nwrote {args.out}/grid.png, images/, {SOURCES_NAME} (the input behind each image), metrics.json")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from stage1_vq.model import EXPORT_KIND, VQModelConfig
    from vqgpt.ground.checkpoint import read_export_config, resolve_model_dir
    from vqgpt.ground.data import DataConfig
    from vqgpt.workflow.encode import encode_dataset

    if args.flip and args.augment not in ("none", "flip"):
        raise ValueError(f"--flip is --augment flip, but --augment is {args.augment}: give one of them")
    if args.crop_range is not None and args.augment != "ten-crop":  # (it was dropped without a word)
        raise ValueError(f"--crop-range {args.crop_range} sets the crops of --augment ten-crop; --augment is "
                         f"{'flip' if args.flip else args.augment}")
    # (the folder checked first: a missing one is said to be missing, not to lack config.json)
    resolution = args.resolution or read_export_config(resolve_model_dir(args.tokenizer), EXPORT_KIND,
                                                       VQModelConfig).resolution
    data = DataConfig(source=args.data, resolution=resolution, num_workers=args.num_workers, **_hf_options(args))
    try:
        out = encode_dataset(args.tokenizer, data, args.out, batch_size=args.batch_size, split=args.split,
                             overwrite=args.overwrite, augment="flip" if args.flip else args.augment,
                             **({"crop_range": args.crop_range} if args.crop_range is not None else {}))
    except KeyboardInterrupt:
        if _first_process():  # (it ended without a word)
            from vqgpt.ground.tokens import DEFAULT_SHARD_SIZE

            print(f"encode interrupted: the same command continues it from its last finished shard in {args.out} "
                  f"(a shard holds {DEFAULT_SHARD_SIZE:,} images: an encode stopped in its first starts over)",
                  file=sys.stderr)
        raise
    if _first_process():  # under accelerate launch, say it once
        print(f"token shards written to {out}")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    from stage2_prior.train import PriorRunConfig, train_prior
    from vqgpt.ground.config import load_config

    given = [o for o in args.overrides if o.split("=", 1)[0].strip() == "tokens"]
    if given:  # (--tokens, last, silently replaced it)
        raise ValueError(f"--set {given[0]}: the token folder is --tokens ({args.tokens}); give it once")
    # quoted (JSON is YAML): a folder named yes, null, [x] or 'a: b' is a path, not YAML's true / None / list
    cfg = load_config(PriorRunConfig, args.config, [*args.overrides, f"tokens={json.dumps(args.tokens)}"])
    if not args.tokenizer:
        if cfg.train.sample_every and _first_process():  # asked for grids that cannot be drawn
            print(f"warning: train.sample_every={cfg.train.sample_every} writes no image grids without --tokenizer "
                  "(a prior's codes need the tokenizer to become images); give --tokenizer DIR to get them",
                  file=sys.stderr)
        export_dir = train_prior(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
        from vqgpt.workflow.chain import refresh_run_pipeline

        # a resume without --tokenizer: an earlier session's RUN/pipeline/ must not keep the older prior
        pipeline_dir = refresh_run_pipeline(args.out, export_dir)
        if pipeline_dir is not None and _first_process():  # said once
            print(f"pipeline (tokenizer + prior) in {pipeline_dir} updated with the new prior")
        return 0
    from vqgpt.workflow.chain import train_prior_with_tokenizer

    pipeline_dir = train_prior_with_tokenizer(cfg, args.out, args.tokenizer, resume=args.resume,
                                              overwrite=args.overwrite)
    if _first_process():  # under accelerate launch, say it once
        print(f"pipeline (tokenizer + prior) written to {pipeline_dir}")
    return 0


def _check_pipeline_args(args: argparse.Namespace) -> None:
    """Exactly one of --pipeline or --tokenizer with --prior (checked before anything is loaded)."""
    if args.pipeline and (args.tokenizer or args.prior):
        extra = " and ".join(flag for flag, value in (("--tokenizer", args.tokenizer), ("--prior", args.prior))
                             if value)
        raise ValueError(f"give --pipeline DIR or --tokenizer DIR with --prior DIR, not both: --pipeline "
                         f"{args.pipeline} already holds a tokenizer and a prior, so {extra} would be ignored")
    if not args.pipeline and not (args.tokenizer and args.prior):
        raise ValueError("give --pipeline DIR, or both --tokenizer DIR and --prior DIR")


def _load_pipeline(args: argparse.Namespace):
    _check_pipeline_args(args)
    from vqgpt.workflow.pipeline import VQGPTPipeline

    if args.pipeline:
        pipe = VQGPTPipeline.from_pretrained(args.pipeline)
    else:
        pipe = VQGPTPipeline.from_parts(args.tokenizer, args.prior)
    pipe.set_decoding(prior_dtype=getattr(args, "prior_dtype", None), compile=getattr(args, "compile", None))
    return pipe


def _class_label(pipe, args: argparse.Namespace) -> int | None:
    """--class-label -> a class index; the pipeline's error, prefixed with the flag (a conditional prior needs one)."""
    try:
        if args.class_label is None:
            pipe.labels_tensor(None, 1)  # refuses a class-conditional prior
            return None
        return pipe.class_index(args.class_label)
    except ValueError as exc:
        if args.class_label is not None:
            raise ValueError(f"--class-label {args.class_label}: {exc}") from None
        names = ", ".join(pipe.classes[:10]) + (", ..." if len(pipe.classes) > 10 else "")
        raise ValueError(f"--class-label: {exc}: pass --class-label NAME or --class-label index:N"
                         + (f" (classes: {names})" if names else "")) from None


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", help="pipeline folder (tokenizer/ + prior/) or a Hub id owner/name; or give "
                                        "--tokenizer and --prior")
    p.add_argument("--tokenizer", help="tokenizer export folder or Hub id (with --prior, instead of --pipeline)")
    p.add_argument("--prior", help="prior export folder or Hub id (with --tokenizer, instead of --pipeline)")


_MAX_CFG_SCALE = 1e4  # stage2_prior.draw.MAX_CFG_SCALE, written out: the CLI parses its options without torch


def _add_sampling_knobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-scale", type=_float_in(0.0, _MAX_CFG_SCALE), default=1.0,
                   help="classifier-free guidance scale, 0 to 10000 (1 = off; larger follows the class more "
                        "closely; 1.5-4 is usual)")
    p.add_argument("--temperature", type=_float_in(0.0), default=1.0,
                   help="softmax temperature, >= 0 (1 = the model's distribution, lower = safer, 0 = greedy)")
    p.add_argument("--top-k", type=int_at_least(1), default=None,
                   help="sample among the k most likely codes only (default: all)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling: the smallest set of codes whose probability reaches p, 0 < p <= 1 "
                        "(default: off)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULE_CHOICES, default="constant",
                   help="guidance scale along the raster order: constant, or linear rising from about 1 (the "
                        "first position: 1 + (scale - 1) / positions) to --cfg-scale")
    # the range torch.Generator.manual_seed takes: said now, not after a folder or the reference features
    p.add_argument("--seed", type=int_at_least(-(2**63), 2**64 - 1), default=0,
                   help="random seed: the same seed gives the same images (image i "
                   "has its own seed, from --seed and i: it does not depend on how many are drawn with it)")


def _sampling(args: argparse.Namespace):
    """The sampling flags -> a SamplingConfig."""
    from stage2_prior.draw import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule)


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    """--prior-dtype and --compile: how the prior decodes (sample, complete, eval-prior)."""
    p.add_argument("--prior-dtype", choices=["float32", "bfloat16", "int8"], default="float32",
                   help="prior weights while sampling: bfloat16 reads half the bytes per token (faster at batch 8 "
                        "and up on CPUs with bf16 units, and on GPUs); int8 is weight-only int8 with per-channel "
                        "scales for the linear layers, a quarter of the bytes (fastest at small batches); the "
                        "tokenizer stays float32")
    p.add_argument("--compile", action="store_true",
                   help="run the prior's one-token decode step under torch.compile (a CUDA graph on a GPU); "
                        "the first batch pays the compile time (up to a minute or two), later batches reuse it")


def _add_sampling_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The flags of sample and complete; ``many``: --out may also be a folder (sample's many-samples mode)."""
    p.add_argument("--class-label", default=None, metavar="NAME|index:N",
                   help="class of a conditional prior: its name (the sub-folder name, e.g. cats or 3), or its index "
                        "written index:N (a bare number that is no class name is an index only when no class name "
                        "is a number)")
    _add_sampling_knobs(p)
    _add_decoding_args(p)
    grid_help = "output image file: a grid of the images (.png; also .jpg, .jpeg, .webp, .bmp, .tif, .tiff)"
    p.add_argument("--out", required=not many,
                   help=grid_help + ("; or a folder (ending in /, e.g. samples/): one PNG per sample, {i:06d}.png, "
                                     "on every launched process, resumable" if many else ""))
    p.add_argument("--save-each", action="store_true",
                   help="also write each image as PNG into a folder beside the grid (--out without its extension)")


def _save_outputs(images, args: argparse.Namespace, nrow: int) -> None:
    from vqgpt.ground.images import save_grid, save_image

    out = Path(args.out)
    save_grid(images, out, nrow=nrow)
    if args.save_each:
        folder = out.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"{i:04d}.png" for i in range(len(images))]
        for stale in _save_each_written(folder) - {*names, SAVE_EACH_RECORD}:  # an earlier, larger --num's
            (folder / stale).unlink(missing_ok=True)
        # before the images: a crash keeps them ours
        write_text_whole(folder / SAVE_EACH_RECORD, json.dumps(names) + "\n")
        for name, img in zip(names, images):
            save_image(img, folder / name)
    print(f"wrote {out}" + (f" and {out.with_suffix('')}/" if args.save_each else ""))


def cmd_sample(args: argparse.Namespace) -> int:
    # A folder is said with a trailing slash (or exists): a bare name without extension is more likely a typo.
    if args.npz is not None or (args.out is not None and (args.out.endswith(("/", os.sep)) or Path(args.out).is_dir())):
        return _sample_many(args)
    if args.out is None:
        raise ValueError("give --out F.png (one grid), or --out FOLDER/ and/or --npz F.npz (one file per sample)")
    if not Path(args.out).suffix:
        raise ValueError(f"--out {args.out} has no file extension: end it with one of "
                         f"{', '.join(_image_out_extensions())} for one grid (e.g. {args.out}.png), or with / for a "
                         f"folder of one PNG per sample (e.g. {args.out}/)")
    if args.per_class is not None:
        raise ValueError(f"--per-class draws one file per sample: give --out FOLDER/ or --npz F.npz, not --out {args.out}")
    if args.batch_size is not None:  # (it was ignored: 100,000 samples went into one batch)
        raise ValueError(f"--batch-size belongs to --out FOLDER/ and --npz, which draw batch by batch; --out "
                         f"{args.out} draws its --num samples in one batch: for many samples give --out FOLDER/")
    if _launched():  # every process would draw the same grid into the same file
        raise ValueError(f"--out {args.out} (one grid) is drawn by one process: run it without accelerate launch, or "
                         "give --out FOLDER/ to split the samples over the processes")
    args.num = 16 if args.num is None else args.num
    # flag mistakes are reported before torch is even imported
    _check_image_out(args.out, save_each=args.save_each)
    _check_pipeline_args(args)
    import torch

    pipe = _load_pipeline(args)
    label = _class_label(pipe, args)
    height, width = pipe.tokenizer.image_shape(*pipe.grid_for_pixels(args.height, args.width))
    _check_grid_size(args.num, height, width, f"--num {args.num} images of {height}x{width} in one grid (--out "
                     f"{args.out})", advice="give --out FOLDER/ (one PNG per sample, drawn batch by batch) or "
                                            "--npz F.npz, or a smaller --num")
    if torch.cuda.is_available():
        pipe.to("cuda")
    images = pipe.generate(args.num, class_labels=label, height=args.height, width=args.width,
                           sampling=_sampling(args), seed=args.seed)
    _save_outputs(images.cpu(), args, nrow=min(8, args.num))
    return 0


def _check_grid_size(count: int, height: int, width: int, given: str, advice: str) -> None:
    """Refuse, before drawing, a grid picture of ``count`` images of ``height`` x ``width`` (nrow 8, as the
    command writes it) with more pixels than PIL reads back without calling it a decompression bomb:
    `sample --num 100000 --out g.png` (and `complete --num ...`) drew every image in one batch and held them
    all in memory, to write a picture no viewer opens."""
    from vqgpt.ground.images import check_pixel_limit, grid_pixels

    check_pixel_limit(*grid_pixels(count, height, width, nrow=min(8, count)), given, verb="make a",
                      what="picture", advice=advice)


def _sample_many(args: argparse.Namespace) -> int:
    """`sample --out FOLDER/ [--npz F.npz]`: one PNG per sample, split over the processes `accelerate launch` started."""
    _check_pipeline_args(args)
    said_folder = args.out is not None and (args.out.endswith(("/", os.sep)) or Path(args.out).is_dir())
    if args.out is not None and not said_folder and Path(args.out).suffix.lower() in _image_out_extensions():
        raise ValueError(f"with --npz, --out is the folder of one PNG per sample, not an image file: "
                         f"give --out {Path(args.out).with_suffix('')}/ or leave --out out")
    if args.npz is not None and Path(args.npz).suffix != ".npz":  # a bare '.npz' has no suffix in pathlib's view
        raise ValueError(f"--npz {args.npz} must " + ("have a name before .npz" if Path(args.npz).name == ".npz"
                                                      else "end with .npz"))
    if args.save_each:
        raise ValueError("--save-each belongs to --out F.png: a folder --out already holds one PNG per sample")
    if args.per_class is not None and args.class_label is not None:
        raise ValueError("give --class-label (one class for all) or --per-class K (K of each class), not both")
    from vqgpt.workflow.sample_many import class_balanced_labels, sample_many

    pipe = _load_pipeline(args)
    if args.per_class is not None:
        labels = class_balanced_labels(pipe.prior.config.num_classes, args.per_class, num=args.num)
    else:
        labels = _class_label(pipe, args)
    num = len(labels) if args.per_class is not None else (16 if args.num is None else args.num)
    report = sample_many(pipe, num, out=args.out, npz=args.npz, class_labels=labels, sampling=_sampling(args),
                         seed=args.seed, height=args.height, width=args.width, batch_size=args.batch_size or 32)
    if _first_process():  # under accelerate launch, say it once
        where = " and ".join(str(p) for p in (report.folder, report.npz) if p is not None)
        print(f"drew {report.drawn} samples ({report.skipped} finished before) on {report.processes} "
              f"process{'es' if report.processes > 1 else ''} -> {where}")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    # flag and file mistakes are reported before torch is even imported
    if args.keep_rows is None and not (args.extend_right or args.extend_down):
        raise ValueError("give --keep-rows N and/or --extend-right N / --extend-down N")
    if _launched():  # every process completed the image into the same files
        raise ValueError(f"complete draws one grid ({args.out}) in one process: run it without accelerate launch")
    _check_image_out(args.out, save_each=args.save_each, inputs={"--image": args.image})
    _check_pipeline_args(args)
    _check_image_file(args.image, "--image")
    import torch

    from vqgpt.ground.images import check_pixel_limit, open_fitted

    pipe = _load_pipeline(args)
    label = _class_label(pipe, args)
    rows, columns = pipe.prior.config.grid_size
    height, width = pipe.tokenizer.image_shape(rows + args.extend_down,
                                               columns + args.extend_right * pipe.codes_per_position)
    # before drawing: one completion (as pipe.complete checks it, with the flags' names), then the grid of the
    # input and the --num completions
    check_pixel_limit(height, width, f"--extend-right {args.extend_right} --extend-down {args.extend_down}")
    _check_grid_size(args.num + 1, height, width, f"--num {args.num} completions of {height}x{width} beside the "
                     f"input in one grid (--out {args.out})", advice="give a smaller --num (each call draws its "
                     "--num completions in one batch)")
    if torch.cuda.is_available():  # as sample does (it ran on the CPU beside a GPU)
        pipe.to("cuda")
    # The image is fitted to the prior's trained size: resized to cover it, then center-cropped.
    image = open_fitted(args.image, *pipe.trained_pixels())
    images = pipe.complete(image, args.num, keep_rows=args.keep_rows, extend_right=args.extend_right,
                           extend_down=args.extend_down, class_labels=label, sampling=_sampling(args),
                           seed=args.seed).cpu()  # (from the GPU: the input beside them is made on the CPU)
    # first the input (padded to the output size with white), then the completions
    original = torch.ones_like(images[:1])
    original[..., : image.shape[1], : image.shape[2]] = image
    _save_outputs(torch.cat([original, images]), args, nrow=min(8, args.num + 1))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from vqgpt.cli.app import launch

    _refuse_launch("app", "serves the page")
    launch(args.pipeline, host=args.host, port=args.port, name=getattr(args, "hub_ids", {}).get("pipeline"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if _launched():  # every process took the demo folder's lock: all but one failed
        raise ValueError("vqgpt demo runs in one process: run it without accelerate launch; on many GPUs run its "
                         "stages (train-tokenizer, encode, train-prior) under accelerate launch (README: Many GPUs)")
    from vqgpt.cli.demo import run_demo, run_pixel_demo

    try:
        if args.tokenizer == "pixels":
            run_pixel_demo(args.out or "runs/demo-pixels", quick=args.quick)
        else:
            run_demo(args.out or "runs/demo", quick=args.quick)
    except KeyboardInterrupt:
        # the training loop's line says --resume auto, which demo does not take: it resumes by itself
        print("demo interrupted: run the same vqgpt demo command again to continue where it stopped", file=sys.stderr)
        raise
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    _refuse_launch("import", "converts a checkpoint")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty: pass --overwrite to write the import over what is there, or "
                         "choose a new folder")
    before = _folder_state(out)
    try:
        result = _import(args)
    except KeyboardInterrupt:
        # the importers read and check everything before they write: most interruptions leave --out untouched
        if _folder_state(out) == before:
            print(f"import interrupted: nothing was written (--out {out} is as it was)", file=sys.stderr)
        else:
            print(f"import interrupted while writing --out {out}: it may hold a partial import; run the command "
                  "again with --overwrite to replace it", file=sys.stderr)
        raise
    print(f"wrote {result.out} from '{result.weights}' ({result.num_tensors} tensors; dropped: {result.dropped})")
    return 0


def _folder_state(folder: Path) -> set[tuple] | None:
    """Every folder and file under ``folder`` with its identity (inode, size, modification time), or None when
    there is no such folder: two equal states mean nothing was written there in between."""
    if not folder.is_dir():
        return None
    state: set[tuple] = set()
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(root, name)
            with contextlib.suppress(OSError):
                info = path.lstat()
                state.add((str(path.relative_to(folder)), info.st_ino, info.st_size, info.st_mtime_ns))
    return state


def _import(args: argparse.Namespace) -> Any:
    from vqgpt.workflow import importers

    if args.source == "taming":
        result = importers.import_taming(args.checkpoint, args.config, args.out, weights=args.weights)
    elif args.source == "llamagen-vq":
        result = importers.import_llamagen_vq(args.checkpoint, args.out, preset=args.preset,
                                              image_size=args.image_size, weights=args.weights)
    else:
        names = None
        if args.classes:
            try:
                names = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ValueError(f"--classes {args.classes}: cannot read it ({why}); give a text file with one class "
                                 "name per line") from None
            if not names:
                raise ValueError(f"--classes {args.classes} holds no class names: give one name per line, in class "
                                 "index order")
        from vqgpt.workflow.importers.llamagen import parse_model_overrides

        result = importers.import_llamagen_gpt(args.checkpoint, args.tokenizer, args.out, preset=args.preset,
                                               image_size=args.image_size, num_classes=args.num_classes,
                                               class_names=names, weights=args.weights,
                                               model=parse_model_overrides(args.overrides))
    return result


def _print_report(report, args: argparse.Namespace) -> None:
    if not _first_process():  # under accelerate launch every process holds the report: said once
        return
    data = report.to_dict()
    if getattr(args, "json", False):
        _emit_json(args, data)
    else:
        for key, value in data.items():
            print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")


def cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    from vqgpt.training.config import launched_process_state
    from vqgpt.workflow.evaluation import eval_tokenizer

    # under accelerate launch the processes split the images (a Python caller chooses: see eval_tokenizer)
    state = launched_process_state("each would reconstruct and score every image")
    report = eval_tokenizer(args.tokenizer, args.images, fid_weights=args.fid_weights, lpips=args.lpips,
                            num_images=args.num, batch_size=args.batch_size, out=args.out, device=args.device,
                            progress=not args.json, state=state, data_options=_hf_options(args))
    _print_report(report, args)
    return 0


def cmd_eval_prior(args: argparse.Namespace) -> int:
    from vqgpt.workflow.evaluation import eval_prior

    report = eval_prior(args.pipeline, args.reference, num_samples=args.num, batch_size=args.batch_size,
                        sampling=_sampling(args), seed=args.seed, fid_weights=args.fid_weights,
                        reference_split=args.split, classifier_path=args.classifier, device=args.device,
                        progress=not args.json, prior_dtype=args.prior_dtype, compile=args.compile)
    _print_report(report, args)
    return 0


def cmd_eval_bpd(args: argparse.Namespace) -> int:
    from vqgpt.training.config import launched_process_state
    from vqgpt.workflow.evaluation import eval_bits_per_dim

    state = launched_process_state("each would score every image")  # the processes split the images
    report = eval_bits_per_dim(args.pipeline, args.images, split=args.split, num_images=args.num,
                               batch_size=args.batch_size, device=args.device, progress=not args.json, state=state,
                               data_options=_hf_options(args))
    _print_report(report, args)
    return 0


def cmd_fid_stats(args: argparse.Namespace) -> int:
    from vqgpt.training.config import launched_process_state
    from vqgpt.workflow.evaluation import fid_stats

    report = fid_stats(args.images, args.out, fid_weights=args.fid_weights, resolution=args.resolution,
                       split=args.split, num_images=args.num, batch_size=args.batch_size, device=args.device,
                       state=launched_process_state("each would extract the features of every image"),
                       data_options=_hf_options(args))
    _print_report(report, args)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Build or refresh a folder's file index; print its counts per class."""
    import time

    from vqgpt.ground.file_index import clean_source, folder_index, index_path, unicode_twins

    _refuse_launch("index", "builds the index")
    source = clean_source(args.source)
    if ":" in source.split("/", 1)[0] and not Path(source).exists():  # builtin:..., wds:..., hf:...
        raise ValueError(f"vqgpt index takes an image folder, not {source!r}: only folder sources use a file index")
    existed = index_path(source, args.index_dir).is_file()
    start = time.perf_counter()
    index = folder_index(source, args.index_dir)
    seconds = time.perf_counter() - start
    if not len(index):
        raise ValueError(f"no image files found in {source}: nothing to index")
    status = "reused" if index.reused else "rebuilt" if existed else "built"
    counts = index.class_counts()
    dangling = [path for path, size in zip(index.paths, index.sizes.tolist()) if size < 0]  # links to nothing
    document = {"root": str(index.root), "index": str(index.path) if index.path else None, "status": status,
                "total": len(index), "bytes": int(index.sizes[index.sizes > 0].sum()), "classes": counts,
                "dangling_links": dangling, "seconds": round(seconds, 3)}
    twins = unicode_twins(list(counts))  # (printed below as two lines that look the same)
    if twins:
        shown = "; ".join(f"{ascii(a)} and {ascii(b)}" for a, b in twins[:3])
        print(f"warning: the classes {shown} are the same letters in two Unicode forms (NFC / NFD), so they are "
              "separate classes that print alike: rename one to merge them", file=sys.stderr)
    if dangling:
        shown = ", ".join(dangling[:3]) + (", ..." if len(dangling) > 3 else "")
        print(f"warning: {len(dangling):,} of the {len(index):,} files are links that point nowhere ({shown}); "
              "they count here but training and evaluation leave them out", file=sys.stderr)
    written = 0 if index.path else 1  # building the index ahead is the command's work: a script must see it failed
    if args.json:
        _emit_json(args, document)
        return written
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        print(f"{name:<{width}}  {count:>10,}")
    size = document["bytes"]
    size_text = f"{size / 1e9:,.2f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB"
    print(f"total: {len(index):,} files in {len(counts):,} classes ({size_text})")
    print(f"index: {index.path or 'not written (see the warning)'} ({status} in {seconds:.2f} s)")
    return written


def cmd_shard(args: argparse.Namespace) -> int:
    import importlib.util

    _refuse_launch("shard", "writes the shards")
    if importlib.util.find_spec("webdataset") is None:  # (the shard reader, which checks what it wrote)
        raise ValueError('vqgpt shard needs the webdataset package: pip install "vqgpt[wds]"')
    from vqgpt.ground.shard_writer import write_shards

    report = write_shards(args.source, args.out, args.per_shard, split=args.split, resolution=args.resolution,
                          index_dir=args.index_dir, overwrite=args.overwrite, data_options=_hf_options(args))
    if report.unreadable:
        print(f"left out {len(report.unreadable)} items that are no image: {', '.join(report.unreadable[:5])}"
              f"{' ...' if len(report.unreadable) > 5 else ''}", file=sys.stderr)
    done = "wrote" if report.written else "already written:"
    print(f"{done} {report.count} images ({len(report.classes)} classes) into {len(report.shards)} shards in "
          f"{args.out}\ntrain on them with: --set \"data.source={report.pattern}\"")
    return 0


def config_reference_text() -> str:
    """The README's config reference, generated from the config dataclasses."""
    from stage1_vq.train import TokenizerRunConfig
    from stage2_prior.train import PriorRunConfig
    from vqgpt.ground.config import reference_markdown

    return reference_markdown({"Tokenizer (`vqgpt train-tokenizer --config`)": TokenizerRunConfig,
                               "Prior (`vqgpt train-prior --config`)": PriorRunConfig})


def cmd_config_reference(args: argparse.Namespace) -> int:  # noqa: ARG001
    print(config_reference_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="stage 1: train a VQ tokenizer; RUN/export/ is the tokenizer")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("reconstruct", help="reconstruct images; PSNR / SSIM / LPIPS / codebook usage")
    p.add_argument("--tokenizer", required=True, help="tokenizer export folder, or a Hub id owner/name")
    p.add_argument("--images", required=True,
                   help="image folder, one image file, or builtin:mnist|photos|textures (eval split)")
    p.add_argument("--out", required=True,
                   help="output folder (images/, grid.png, metrics.json), outside the image folder")
    p.add_argument("--num", type=int_at_least(1), default=None, help="at most this many images (default: all)")
    p.add_argument("--resolution", type=int_at_least(1), default=None,
                   help="pixels (default: the tokenizer's model.resolution)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per forward pass")
    p.add_argument("--lpips", default="vgg", help="vgg (standard; needs its weights), a local weights path, random, or none")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object on stdout (everything else goes to stderr)")
    p.set_defaults(func=cmd_reconstruct)
    _add_hf_flags(p)
    p = sub.add_parser("encode", help="encode a dataset into token shards for stage 2")
    p.add_argument("--tokenizer", required=True, help="tokenizer export folder, or a Hub id owner/name")
    p.add_argument("--data", required=True, help="image folder, wds:SHARDS, hf:DATASET or builtin:mnist|photos|textures")
    p.add_argument("--out", required=True, help="token shard folder")
    p.add_argument("--resolution", type=int_at_least(1), default=None,
                   help="pixels (default: the tokenizer's model.resolution)")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="split of the image source to encode")
    p.add_argument("--augment", default="none", choices=["none", "flip", "ten-crop"],
                   help="views stored per image, of which the prior trains on one per draw: none (1), flip (the "
                        "image and its mirror image: 2), ten-crop (LlamaGen's: 4 corner crops and the center crop "
                        "of a center crop --crop-range times larger, and their mirror images: 10)")
    p.add_argument("--crop-range", type=float, default=None,
                   help="ten-crop: the crops are taken from a center crop this many times the resolution (default 1.1)")
    p.add_argument("--flip", action="store_true", help="same as --augment flip")
    p.add_argument("--num-workers", type=int_at_least(0), default=0,
                   help="DataLoader worker processes decoding the images (data.num_workers)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64,
                   help="images per forward pass, per process (under accelerate launch each process encodes a "
                        "contiguous run of these batches)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the token shards already in --out and encode from scratch (without it, a re-run "
                        "continues an unfinished encode of the same images, tokenizer and options, on as many "
                        "processes as it was started with, and refuses any other)")
    p.set_defaults(func=cmd_encode)
    _add_hf_flags(p)
    p = sub.add_parser("train-prior", help="stage 2: train a GPT prior on token shards; RUN/export/ is the prior")
    _add_config_args(p)
    p.add_argument("--tokens", required=True, help="token shard folder from `vqgpt encode`")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer export: decodes periodic sample grids and writes RUN/pipeline/")
    p.set_defaults(func=cmd_train_prior)

    p = sub.add_parser("sample", help="sample images from a pipeline (larger sizes use sliding windows)")
    _add_pipeline_args(p)
    p.add_argument("--num", type=int_at_least(1), default=None,
                   help="number of images (default: 16; with --per-class K, K times the number of classes)")
    p.add_argument("--height", type=int_at_least(1), default=None,
                   help="pixels, a multiple of the tokenizer's downsampling factor (default: trained size)")
    p.add_argument("--width", type=int_at_least(1), default=None,
                   help="pixels, a multiple of the tokenizer's downsampling factor (default: trained size)")
    _add_sampling_args(p, many=True)
    p.add_argument("--npz", default=None,
                   help="also (or instead of --out FOLDER/) one .npz in the ADM evaluator's layout: uint8 images "
                        "(N, H, W, 3) under arr_0, class labels under arr_1")
    p.add_argument("--per-class", type=int_at_least(1), default=None,
                   help="class-balanced labels: K samples of each class, class by class (with --out FOLDER/ or --npz)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="samples drawn at once with --out FOLDER/ or --npz (default 32); keep it when resuming a "
                        "folder")
    p.set_defaults(func=cmd_sample)

    fid_help = ("FID network: a local Inception .pth (torch-fidelity / pytorch-fid weights), default downloads it; "
                "random[:SEED] gives figures comparable only with each other")
    device_help = "torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)"
    json_help = "print the report as one JSON object on stdout (everything else goes to stderr)"
    p = sub.add_parser("eval-tokenizer", help="PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity")
    p.add_argument("--tokenizer", required=True, help="tokenizer export folder, or a Hub id owner/name")
    p.add_argument("--images", required=True, help="image folder, wds:SHARDS, hf:DATASET or builtin:* (eval split)")
    p.add_argument("--fid-weights", default=None, help=fid_help + "; none skips rFID")
    p.add_argument("--lpips", default="vgg", help="vgg, a local weights path, random, or none")
    p.add_argument("--num", type=int_at_least(1), default=None, help="at most this many images (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per forward pass")
    p.add_argument("--out", default=None, help="also keep reconstructions, grid and metrics.json here")
    p.add_argument("--device", type=_torch_device, default=None, help=device_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_eval_tokenizer)
    _add_hf_flags(p)
    p = sub.add_parser("eval-prior", help="FID, sFID, IS, precision, recall of samples (+ class accuracy on MNIST); "
                                          "under accelerate launch every process samples")
    p.add_argument("--pipeline", required=True, help="pipeline folder (tokenizer/ + prior/) or a Hub id owner/name")
    p.add_argument("--reference", required=True,
                   help="image source, a stats .npz from `vqgpt fid-stats`, or an ADM evaluator reference batch "
                        "(.npz with arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("--num", type=int_at_least(1), default=50000,
                   help="samples to draw (published FID uses 50000; at least 2)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="samples drawn at once")
    _add_sampling_knobs(p)
    _add_decoding_args(p)
    p.add_argument("--fid-weights", default=None, help=fid_help)
    p.add_argument("--split", default="train", choices=["train", "eval"], help="split of an image-source reference")
    p.add_argument("--classifier", default=None, help="MNIST classifier file; a new path is trained and written there (default: cached, trained once)")
    p.add_argument("--device", type=_torch_device, default=None, help=device_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_eval_prior)

    p = sub.add_parser("eval-bpd", help="the prior's held-out NLL of images' codes: bits per token and bits per dim "
                                        "(per sub-pixel, as Image GPT reports it)")
    p.add_argument("--pipeline", required=True, help="pipeline folder (tokenizer/ + prior/) or a Hub id owner/name")
    p.add_argument("--images", required=True, help="image folder, wds:SHARDS, hf:DATASET or builtin:*")
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="split of the image source")
    p.add_argument("--num", type=int_at_least(1), default=None, help="at most this many images (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per forward pass")
    p.add_argument("--device", type=_torch_device, default=None, help=device_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_eval_bpd)
    _add_hf_flags(p)
    p = sub.add_parser("fid-stats", help="reference statistics (mu, sigma, features) of an image source, once")
    p.add_argument("--images", required=True, help="image folder, wds:SHARDS, hf:DATASET or builtin:mnist|photos|textures")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--fid-weights", default=None, help=fid_help)
    p.add_argument("--resolution", type=int_at_least(1), default=32,
                   help="pixels the images are scored at (default 32): the size of the samples they will be "
                        "compared with (eval-prior warns when they differ)")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="split of the image source")
    p.add_argument("--num", type=int_at_least(1), default=None, help="at most this many images (default: all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per forward pass")
    p.add_argument("--device", type=_torch_device, default=None, help=device_help)
    p.set_defaults(func=cmd_fid_stats)
    _add_hf_flags(p)
    p = sub.add_parser("index", help="build (or refresh) an image folder's file index ahead of training; "
                                     "prints the files per class")
    p.add_argument("source", metavar="SRC", help="image folder (class = sub-folder name)")
    p.add_argument("--index-dir", default=None,
                   help="folder for the index file, as data.index_dir (default: $VQGPT_CACHE/index, else "
                        "$XDG_CACHE_HOME/vqgpt/index, else ~/.cache/vqgpt/index)")
    p.add_argument("--json", action="store_true",
                   help="print the counts as one JSON object on stdout (everything else goes to stderr)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("import", help="convert taming-transformers / LlamaGen checkpoints into vqgpt exports")
    isub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    q = isub.add_parser("taming", help="a taming VQGAN (last.ckpt + its model.yaml) -> a tokenizer export")
    q.add_argument("--checkpoint", required=True,
                   help="taming checkpoint (last.ckpt, or a .safetensors of its weights)")
    q.add_argument("--config", required=True, help="the checkpoint's model YAML")
    q.add_argument("--out", required=True, help="tokenizer export folder to write")
    q.add_argument("--overwrite", action="store_true", help="write over an export already in --out")
    q.add_argument("--weights", default=None, help="entry of the checkpoint holding the weights (default: state_dict)")
    q.set_defaults(func=cmd_import)
    q = isub.add_parser("llamagen-vq", help="a LlamaGen VQ tokenizer (.pt) -> a tokenizer export")
    q.add_argument("--checkpoint", required=True, help="LlamaGen VQ checkpoint, e.g. vq_ds16_c2i.pt")
    q.add_argument("--out", required=True, help="tokenizer export folder to write")
    q.add_argument("--overwrite", action="store_true", help="write over an export already in --out")
    q.add_argument("--preset", default=None, help="VQ-16 or VQ-8 (a cross-check; shapes are read from the weights)")
    q.add_argument("--image-size", type=int_at_least(1), default=None,
                   help="training image size in pixels (default: the checkpoint's args, else 256)")
    q.add_argument("--weights", default=None, help="ema or model (default: ema when present)")
    q.set_defaults(func=cmd_import)
    q = isub.add_parser("llamagen-gpt", help="a LlamaGen class-to-image GPT (.pt) + an imported tokenizer -> a pipeline")
    q.add_argument("--checkpoint", required=True, help="LlamaGen class-to-image GPT checkpoint, e.g. c2i_B_256.pt")
    q.add_argument("--tokenizer", required=True, help="the imported LlamaGen tokenizer export")
    q.add_argument("--out", required=True, help="pipeline folder (tokenizer/ + prior/)")
    q.add_argument("--overwrite", action="store_true", help="write over an export already in --out")
    q.add_argument("--preset", default=None,
                   help="GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-3B (default: the one the checkpoint records "
                        "in args.gpt_model); depth, width, vocabulary and classes are read from the weights")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="architecture of a non-preset model, e.g. --set model.n_head=16 (repeatable; checked "
                        "against the weights)")
    q.add_argument("--image-size", type=int_at_least(1), default=None,
                   help="image size in pixels the GPT was trained for (default: the checkpoint's args, else 256)")
    q.add_argument("--num-classes", type=int_at_least(0), default=None,
                   help="default: the checkpoint's args.num_classes, else the class table's rows minus the null row")
    q.add_argument("--classes", default=None, help="text file with one class name per line")
    q.add_argument("--weights", default=None, help="model or ema")
    q.set_defaults(func=cmd_import)

    p = sub.add_parser("shard", help="write an image source as tar shards (webdataset layout) for data.source=wds:...")
    p.add_argument("source", help="image folder, wds:SHARDS, hf:DATASET or builtin:mnist|photos|textures")
    p.add_argument("out", help="folder for shard-000000.tar, shard-000001.tar, ...")
    p.add_argument("--per-shard", type=int_at_least(1), required=True, help="images per shard")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="split of the image source")
    p.add_argument("--resolution", type=int_at_least(1), default=32,
                   help="pixels of a built-in source's images (stored as PNG); files and dataset rows are copied "
                        "as they are stored, never re-encoded")
    p.add_argument("--index-dir", default="", help="where the shards' indexes are cached (default: data.index_dir's)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards already in OUT, finished or left by an interrupted run, and write them "
                        "from scratch (without it, a re-run continues an interrupted run of the same source and "
                        "options, and refuses any other)")
    p.set_defaults(func=cmd_shard)
    _add_hf_flags(p)
    p = sub.add_parser("config-reference", help="print every config key with its type, default and meaning")
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("complete", help="complete an image from its first code rows, or extend it right / down")
    _add_pipeline_args(p)
    p.add_argument("--image", required=True, help="input image (fitted to the prior's trained size)")
    p.add_argument("--keep-rows", type=int_at_least(0), default=None,
                   help="code rows of the image to keep (default: all)")
    p.add_argument("--extend-right", type=int_at_least(0), default=0, help="code columns to add on the right")
    p.add_argument("--extend-down", type=int_at_least(0), default=0, help="code rows to add below")
    p.add_argument("--num", type=int_at_least(1), default=4, help="number of completions")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("app", help='a local web page to sample, complete and reconstruct (pip install "vqgpt[app]")')
    p.add_argument("--pipeline", required=True, help="pipeline folder (tokenizer/ + prior/) or a Hub id owner/name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int_at_least(1, 65535), default=None,
                   help="port (default: 7860, or the next free one)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("demo", help="the whole workflow on built-in MNIST digits, on a CPU")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo-pixels)")
    p.add_argument("--quick", action="store_true",
                   help="a shorter version (fewer steps; about 4-5 minutes on 2 CPU cores)")
    p.add_argument("--tokenizer", default="vq", choices=["vq", "pixels"],
                   help="vq: a trained VQ tokenizer and a class-conditional prior (default); pixels: Image GPT's pixel "
                        "tokens (a k-means colour palette), an unconditional prior, samples, half-image completions "
                        "and bits per dim")
    p.set_defaults(func=cmd_demo)
    return parser


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever is written to stdout meanwhile (print, or C code writing to fd 1) to stderr."""
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 / fd 2 (e.g. an embedded interpreter): Python-level redirection still holds
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.stdout, sys.__stdout__):
            if stream is not None:
                stream.flush()  # while fd 1 still points at stderr
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _run_json(args: argparse.Namespace) -> int:
    """Run a --json command: its one JSON document goes to stdout, everything else (libraries too) to stderr."""
    with _stdout_to_stderr():
        code = int(args.func(args) or 0)
    document = getattr(args, "json_document", None)
    if document is not None:
        unusable: list[str] = []
        document = finite_or_null(document, "", unusable)
        if unusable:  # JSON has no NaN or Infinity: a figure that is not a number is null, as an absent one is
            warnings.warn(f"not finite, printed as null: {', '.join(unusable)}", stacklevel=1)
        print(json.dumps(document, allow_nan=False), flush=True)
    return code


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    format_warning = warnings.formatwarning
    warnings.formatwarning = _format_warning  # a user reads "warning: ...", not a source line
    try:
        return _run(args)
    finally:
        warnings.formatwarning = format_warning


def _out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's refusal."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)))


def _exit_code(exc: Exception) -> int | None:
    """3 for a non-finite loss (or weights a run was about to save), 2 for a user error (ConfigError is a
    ValueError), None for a bug."""
    # vqgpt.training imports torch and timm (seconds): look it up only if the command imported it,
    # so that flag mistakes are reported at once.
    training = sys.modules.get("vqgpt.training")
    if training is not None and isinstance(exc, training.NonFiniteLoss):
        return 3
    checkpoint = sys.modules.get("vqgpt.ground.checkpoint")
    if checkpoint is not None and isinstance(exc, checkpoint.NonFiniteWeights):
        return 3  # a run that diverged without a non-finite loss (an EMA copy, a buffer): the same exit
    # a path that is missing, of the wrong kind, or not writable: the message names it
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
                        ValueError)):
        return 2
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG):
        return 2  # the disk, not the code: full, read-only, over quota, or a file size limit (ulimit -f)
    if isinstance(exc, OSError) and exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return 2  # a path the user gave: a name over the file system's limit, or links that loop
    fid = sys.modules.get("vqgpt.ground.fid")
    if fid is not None and isinstance(exc, fid.FeatureNetworkUnavailable):
        return 2  # offline without the FID weights: the message says where to put them
    return None


# argparse attribute -> flag, for every flag that takes an export or pipeline folder
EXPORT_FLAGS = {"tokenizer": "--tokenizer", "prior": "--prior", "pipeline": "--pipeline"}


def _resolve_hub_flags(args: argparse.Namespace) -> None:
    """Export-folder flags given a Hub id ``owner/name`` (or ``owner/name/FOLDER``, a folder of the repository)
    -> that snapshot's local folder (download or cache). ``--tokenizer`` / ``--prior`` given a pipeline's
    repository take its tokenizer/ or prior/. What the snapshot lacks is said of the id, not of the cache path.

    A value that exists on disk, or is no Hub id, is left for the command to check as before.
    """
    for attr, flag in EXPORT_FLAGS.items():
        value = getattr(args, attr, None)
        if not isinstance(value, str) or "/" not in value or value.startswith((".", "~", "/")) or Path(value).exists():
            continue
        from vqgpt.ground.checkpoint import hub_part_missing, is_hub_id, resolve_model_dir

        repo_id, part = _hub_parts(value)
        if not repo_id or not is_hub_id(repo_id) or (part and Path(repo_id).exists()):  # (a local folder's part)
            continue
        try:
            folder = resolve_model_dir(repo_id, subfolder=part or None)
            if attr == "pipeline":
                missing = next((name for name in ("tokenizer", "prior") if not (folder / name).is_dir()), None)
                if missing is not None:
                    raise FileNotFoundError(hub_part_missing(value, None, missing))
            elif not (folder / "config.json").is_file():
                if not part and (folder / attr / "config.json").is_file():  # a pipeline's repository
                    folder = folder / attr
                else:
                    raise FileNotFoundError(f"Hub repository {value}: its snapshot ({folder}) holds no config.json, "
                                            f"so it is no {attr} export; for a pipeline's, give {repo_id}/{attr}")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{flag} {exc}") from None
        setattr(args, attr, str(folder))
        args.hub_ids = {**getattr(args, "hub_ids", {}), attr: value}  # for messages that name the model


def _hub_parts(value: str) -> tuple[str, str]:
    """'owner/name/tokenizer' -> ('owner/name', 'tokenizer') (likewise prior: a pipeline's parts);
    'owner/name' -> ('owner/name', ''); anything else -> ('', '') (a local path, as 'runs/a/export' is)."""
    pieces = value.split("/")
    if len(pieces) == 3 and pieces[2] in ("tokenizer", "prior"):
        return "/".join(pieces[:2]), pieces[2]
    return (value, "") if len(pieces) == 2 else ("", "")


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (``vqgpt index SRC | head -3``)."""
    try:
        import select

        poll = select.poll()
        poll.register(1, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no fd 1
        return False


def _run(args: argparse.Namespace) -> int:
    try:
        _resolve_hub_flags(args)
        if getattr(args, "json", False) and sys.stdout is None:
            raise ValueError("--json: stdout is closed, so the JSON document would be lost; leave stdout open or "
                             "redirect it to a file")
        return _run_json(args) if getattr(args, "json", False) else int(args.func(args) or 0)
    except KeyboardInterrupt:
        # a second Ctrl-C while a training run finished its step and wrote its checkpoint: it stopped at once
        if sys.modules.get("vqgpt.training.loop") is not None and sys.modules["vqgpt.training.loop"].aborted():
            print("stopped at once by a second interrupt: the checkpoint the first one asked for may not have been "
                  "written; --resume auto continues from the last complete one (a single Ctrl-C stops after the "
                  "step, with a checkpoint)", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            # the reader of stdout stopped reading: end quietly, as a tool that SIGPIPE ends does (128 + 13)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the interpreter's last flush of stdout then goes nowhere, not failing again
            os.close(devnull)
            return 141
        if _out_of_memory(exc) and not os.environ.get("VQGPT_DEBUG"):
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: out of memory ({said}): a smaller --num, --batch-size or image size needs less "
                  f"(VQGPT_DEBUG=1 shows where it ran out)", file=sys.stderr)
            return 1
        inner = getattr(exc, "inner_exception", None)  # what failed inside torch.compile (its InductorError)
        if isinstance(inner, OSError) and _exit_code(inner) == 2 and not os.environ.get("VQGPT_DEBUG"):
            print(f"error: torch.compile could not write its files ({inner}): point TORCHINDUCTOR_CACHE_DIR at a "
                  f"writable folder, or leave out --compile", file=sys.stderr)
            return 2
        code = _exit_code(exc)
        if code is None or os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
