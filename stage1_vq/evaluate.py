"""Reconstruction of held-out images by a tokenizer, with PSNR / SSIM / LPIPS / codebook figures."""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from stage1_vq.model import VQModel
from vqgpt.ground.data import DataConfig, build_dataset, folder_overlap
from vqgpt.ground.files import write_json_whole, write_text_whole
from vqgpt.ground.images import save_grid, save_image, side_by_side
from vqgpt.ground.metrics import bits_per_image, code_histogram, codebook_stats, psnr, ssim
from vqgpt.training.run_folder import RunFolderError, RunLock
from vqgpt.training.shares import (ONE_PROCESS, gather_in_order, on_main_process, process_device, readable_rounds,
                                  rounds_total, said_once)

# the reconstructions reconstruct() writes into OUT/images: 00000.png, 00001.png, ...
_RECONSTRUCTION_NAME = re.compile(r"\d{5,}\.png")
# OUT/RECORD_NAME: how many numbered images reconstruct() wrote into OUT/images, so that the next run
# deletes those and nothing else (a folder of FFHQ's 00000.png ... is named just like them)
RECORD_NAME = ".reconstruct.json"
# OUT/SOURCES_NAME: which image of the source each reconstruction is ({"names": [...], "unreadable": [...]}:
# names[i] is the dataset name of the image behind images/{i:05d}.png and the figures' i-th image;
# unreadable names the files left out), since the numbers count readable images only
SOURCES_NAME = "sources.json"
# what reconstruct() writes into OUT itself; replaced only when OUT's record says an earlier run wrote them
_SUMMARY_NAMES = ("metrics.json", "grid.png", SOURCES_NAME)


def load_lpips(kind: str, device: torch.device) -> torch.nn.Module | None:
    """'vgg' (standard weights; downloads), 'random' (random backbone, for tests), 'none', or a local weights path."""
    if kind == "none":
        return None
    from stage1_vq.losses import LossConfig, build_perceptual

    cfg = LossConfig()
    if kind == "random":
        cfg = replace(cfg, perceptual="lpips-random")
    elif kind != "vgg":
        if not Path(kind).is_file():  # a path the user gave: a typo is theirs to fix, not a reason to report null
            raise FileNotFoundError(f"--lpips {kind}: no such weights file (give a local LPIPS weights file, "
                                    "or vgg, random, none)")
        cfg = replace(cfg, perceptual="lpips-vgg", perceptual_weights_path=kind)
    try:
        # A fixed seed: the 'random' backbone is the same network in every run (its figures compare
        # across runs, like --fid-weights random), and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_perceptual(cfg)
    except Exception as exc:  # offline machines cannot fetch the VGG weights: report, don't crash
        if kind not in ("vgg", "random"):  # a file the user named: an error, as a missing one is
            raise ValueError(f"--lpips {kind}: not usable as LPIPS weights ({type(exc).__name__}: {exc})") from None
        # the download's own error, not build_perceptual's advice (it names training's config keys)
        cause = exc.__cause__ if kind == "vgg" and exc.__cause__ is not None else exc
        warnings.warn(f"LPIPS unavailable ({type(cause).__name__}: {cause}); reporting lpips as null. "
                      "Pass --lpips PATH to local weights, or --lpips none.")
        return None
    return net.to(device).eval() if net is not None else None


def check_out_apart(images: str, out: str | Path) -> None:
    """Refuse an ``out`` that is the folder ``images``, lies inside it or holds it: the next run would read
    this run's reconstructions and grid back as held-out images (and clearing them could hit the inputs)."""
    where = folder_overlap(images, out)
    if where is not None:
        raise ValueError(f"--out {out} and --images {images} overlap (--out {where} the image folder): reconstruct "
                         f"would read its own output back as images; choose an --out outside {images}")


def _read_record(out: Path) -> tuple[int, frozenset[str]]:
    """(how many numbered reconstructions (00000.png ...) an earlier run recorded writing into out/images,
    which of out's _SUMMARY_NAMES are reconstruct's own). A folder of a vqgpt that kept no record is
    reconstruct's when its metrics.json is; its images count when that names exactly as many images as
    out/images numbers from 00000.png on. A record owns a sources.json when it says so (a vqgpt before
    sources.json wrote none, so one beside its record is the user's); a folder without a record (e.g.
    copied without its dot-files) when it has the form reconstruct writes and names as many images as
    its metrics.json."""
    for path, key in ((out / RECORD_NAME, "images"), (out / "metrics.json", "num_images")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or (path.name == "metrics.json"
                                            and not {"tokenizer", "codebook_size", "psnr"} <= record.keys()):
            continue  # damaged, or some other program's metrics.json
        count = record.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            if path.name == RECORD_NAME:
                return count, frozenset(_SUMMARY_NAMES if record.get("sources") is True else _SUMMARY_NAMES[:2])
            owned = frozenset(_SUMMARY_NAMES if _is_sources(out / SOURCES_NAME, count) else _SUMMARY_NAMES[:2])
            names = {p.name for p in (out / "images").glob("*.png") if _RECONSTRUCTION_NAME.fullmatch(p.name)}
            return (count if names == {f"{i:05d}.png" for i in range(count)} else 0), owned
    return 0, frozenset()


def _is_sources(path: Path, count: int) -> bool:
    """Whether ``path`` is a sources.json reconstruct wrote, naming ``count`` images."""
    try:
        sources = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(sources, dict) and set(sources) == {"names", "unreadable"}
            and isinstance(sources["names"], list) and isinstance(sources["unreadable"], list)
            and len(sources["names"]) == count)


def _write_record(out: Path, count: int) -> None:
    tmp = out / f"{RECORD_NAME}.tmp"
    # "sources": this run writes (or wrote) out/SOURCES_NAME, so the next run may replace it
    tmp.write_text(json.dumps({"images": count, "sources": True}) + "\n")
    os.replace(tmp, out / RECORD_NAME)  # atomic: a run killed midway leaves the old record or the new one


def _listing(names: list[str] | tuple[str, ...]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _clear_previous_run(out: Path, will_write: int) -> None:
    """Delete what an earlier run recorded writing into ``out``: its metrics.json and sources.json (first,
    so that a run that fails midway leaves no figures or names of other images behind) and its numbered
    reconstructions in ``out/images``; then record the ``will_write`` reconstructions this run may write.
    Any other file there is the user's and stays: a numbered PNG that no run recorded (the user's own
    00000.png, ...) makes a run that writes images refuse, and a metrics.json, grid.png or sources.json
    that no run wrote makes every run refuse, before anything is deleted."""
    folder = out / "images"
    recorded, owned = _read_record(out)
    theirs = [name for name in _SUMMARY_NAMES if name not in owned and (out / name).exists()]
    if theirs:
        raise RunFolderError(f"{out} holds {_listing(theirs)} that this command did not write; it "
                             f"writes its own {_listing(_SUMMARY_NAMES)} there and would replace "
                             f"{'them' if len(theirs) > 1 else 'it'}: choose another --out")
    ours = {f"{i:05d}.png" for i in range(recorded)}
    present = sorted(p.name for p in folder.iterdir()
                     if _RECONSTRUCTION_NAME.fullmatch(p.name) and p.is_file()) if folder.is_dir() else []
    foreign = [name for name in present if name not in ours]
    if foreign and will_write:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFolderError(f"{folder} holds images this command did not write ({shown}); writing its "
                             f"reconstructions there would replace them: choose another --out")
    (out / "metrics.json").unlink(missing_ok=True)
    (out / SOURCES_NAME).unlink(missing_ok=True)  # names the images deleted next
    for name in present:
        if name in ours:
            (folder / name).unlink()
    _write_record(out, will_write)


@contextmanager
def _claim(out: Path, will_write: int) -> Iterator[Path | None]:
    """``out`` locked and cleared of the earlier run's output (see _clear_previous_run), for the run's life;
    None on the other processes of an ``accelerate launch`` that does not split the batches (``reconstruct``
    without a ``state``): each runs the whole reconstruction and the first alone writes, so that they neither
    race in ``out`` nor lock each other out. Split over them, see ``_claim_for_all``."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()  # a second run into out would delete this one's images and mix its own in
    try:
        _clear_previous_run(out, will_write)
        (out / "images").mkdir(exist_ok=True)
        yield out
    finally:
        lock.release()


class BatchRows(NamedTuple):
    """Per-image rows a caller of ``reconstruct`` computes from each batch (e.g. rFID features), gathered from
    every process of an ``accelerate launch`` and handed back in image order, batch by batch, on every process."""

    score: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # (originals, recons) -> rows (B, ...)
    take: Callable[[dict[str, torch.Tensor]], None]  # each batch's rows (B, ...) on the CPU, in image order
    blank: Callable[[int, int], dict[str, torch.Tensor]]  # (height, width) -> rows (0, ...): a share of no images


@contextmanager
def _claim_for_all(out: Path, will_write: int, state: Any) -> Iterator[tuple[Path | None, Path | None]]:
    """(the folder the summary files go to, the folder this process writes its reconstructions to) for the run.

    One process: ``_claim`` (under a launch whose batches are not split, only the first process writes:
    (None, None) on the others). Split over N processes: the first claims ``out`` and says whether it could
    before any process writes (the others raise its error rather than wait for it); each then writes the
    reconstructions it made into out/images, and the first alone the summary files.
    """
    if state.num_processes == 1:
        with _claim(out, will_write) as dest:
            yield dest, dest / "images" if dest is not None else None
        return
    with ExitStack() as stack:
        dest = on_main_process(state, lambda: stack.enter_context(_claim(out, will_write)))
        yield (dest if state.is_main_process else None), out / "images"


@torch.inference_mode()
def reconstruct(tokenizer_dir: str | Path, images: str, out: str | Path, num_images: int | None = None,
                resolution: int | None = None, batch_size: int = 32, lpips: str = "vgg",
                save_images: bool = True, device: str | None = None, progress: bool = True,
                on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                rows: BatchRows | None = None, state: Any = None, data_options: dict[str, Any] | None = None) -> dict:
    """Reconstruct the evaluation images of ``images``; write PNGs + grid + metrics.json; return the metrics.
    ``data_options``: further DataConfig fields of the source (an hf: source's hf_image_column, ...).

    ``num_images``: the first that many readable images (an undecodable file is left out and not
    counted). The reconstructions of an earlier run into ``out`` (those it recorded in out/.reconstruct.json)
    are deleted first, so that the folder holds one run's images beside its metrics.json; numbered images
    that no run recorded are the user's, and the run is refused rather than write over them. ``out`` is
    locked for the run's life (out/.lock) and may not overlap a folder ``images``: refused before
    anything is written or deleted.
    ``on_batch(originals, reconstructions)``, both (B, 3, H, W) in [-1, 1], sees every batch this process
    reconstructs (e.g. rFID features); ``rows``: per-image rows of every batch, from every process (BatchRows).
    out/sources.json names, in output order, the image of ``images`` behind each reconstruction (as
    ``dataset.name(i)`` gives it) and the files left out as unreadable: see SOURCES_NAME.

    ``state`` (``launched_process_state``) of the N processes of an ``accelerate launch``: the batches are
    split over them (batch r * N + p of the loader by process p); each writes the reconstructions it made
    (the same files, numbered alike, as one process writes), and the per-image figures and code counts are
    gathered in image order, batch by batch, so every process returns the one-process metrics, bit for bit;
    the first writes grid, sources.json and metrics.json. None (or one process): this process reconstructs
    every image, and under a launch only the first process writes.
    """
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num must be >= 1, got {num_images}")
    out = Path(out)
    check_out_apart(images, out)
    model_dir = Path(tokenizer_dir).expanduser()
    if model_dir.is_dir() and out.expanduser().is_dir() and out.expanduser().resolve() == model_dir.resolve():
        # (it wrote images/, grid.png, metrics.json and its lock among the model's files; encode refuses such an out)
        raise ValueError(f"--out {out} is the tokenizer's own folder: the reconstructions, grid and metrics would be "
                         "written among the model's files; choose another --out")
    state = state or ONE_PROCESS
    device = process_device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), state)
    model = VQModel.from_pretrained(tokenizer_dir).to(device).eval()
    resolution = resolution or model.config.resolution
    grid_shape = model.grid_shape(resolution, resolution)  # a size it cannot encode: refused before --out is touched
    dataset = build_dataset(DataConfig(source=images, resolution=resolution, random_crop=False, hflip=False,
                                       **(data_options or {})), "eval")
    # --num counts readable images; ``used``/``left_out``: which dataset item each image is, and the items skipped
    used: list[int] = []
    left_out: list[int] = []
    wanted = len(dataset) if num_images is None else min(num_images, len(dataset))
    with said_once(state):  # (an LPIPS network that cannot be loaded: every process would say so)
        perceptual = load_lpips(lpips, device)
    # residual VQ: PSNR of the reconstruction from the first d of the D codes per position, d < D
    depths = range(1, model.codes_per_position)
    # the rows of a process that holds no batch in a round (of N > 1 processes): the others' kinds, none of them
    no_rows: dict[str, torch.Tensor] = {}
    if state.num_processes > 1:
        no_rows = {key: torch.zeros(0) for key in ("psnr", "ssim", *(f"psnr{d}" for d in depths))}
        no_rows.update({"lpips": torch.zeros(0)} if perceptual is not None else {})
        no_rows.update({f"rows:{key}": t for key, t in rows.blank(resolution, resolution).items()} if rows else {})
    no_pairs = {key: torch.zeros(0, 3, resolution, resolution) for key in ("original", "recon")}

    with _claim_for_all(out, wanted if save_images else 0, state) as (dest, folder):
        psnrs, ssims, lpipss = [], [], []
        coarse: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
        counts = torch.zeros(model.codebook_size, dtype=torch.long)
        originals, recons = [], []  # the grid's: the first 16 images
        count = 0
        rounds = readable_rounds(state, dataset, batch_size, limit=num_images, indices=used,
                                  unreadable_indices=left_out)
        for round_ in tqdm(rounds, desc="reconstruct", total=rounds_total(wanted, batch_size, state),
                           disable=not progress or not state.is_main_process):
            figures, pairs, histogram = no_rows, no_pairs, torch.zeros(0, model.codebook_size, dtype=torch.long)
            numbers = round_.image_index()
            if round_.images is not None:
                batch = round_.images.to(device)
                codes = model.encode(batch)                                  # (B, h, w)
                recon = model.decode(codes).clamp(-1, 1)                     # (B, 3, H, W)
                if on_batch is not None:
                    on_batch(batch, recon)
                histogram = code_histogram(codes, model.codebook_size)[None]
                figures = {"psnr": psnr(batch, recon), "ssim": ssim(batch, recon)}
                for d in depths:
                    partial = model.decode_latents(model.quantize.codes_from_indices(codes, depths=d)).clamp(-1, 1)
                    figures[f"psnr{d}"] = psnr(batch, partial)
                if perceptual is not None:
                    figures["lpips"] = perceptual(batch, recon).flatten().float()
                if rows is not None:
                    figures.update({f"rows:{key}": t for key, t in rows.score(batch, recon).items()})
                first = int((numbers < 16).sum())  # of the grid's images
                pairs = {"original": batch[:first], "recon": recon[:first]}
                if save_images and folder is not None:
                    for number, img in zip(numbers.tolist(), recon.cpu()):
                        save_image(img, folder / f"{number:05d}.png")
            # every process's, in image order (one process: its own, on the CPU)
            figures = gather_in_order(state, numbers, figures, start=round_.batches[0].start)
            counts += gather_in_order(state, round_.batch_index(), {"n": histogram}, start=round_.first)["n"].sum(0)
            if round_.batches[0].start < 16:
                pairs = gather_in_order(state, numbers[numbers < 16], pairs, start=round_.batches[0].start)
                originals.append(pairs["original"])
                recons.append(pairs["recon"])
            at = 0
            for batch_range in round_.batches:  # batch by batch, as one process takes them
                part = {key: t[at:at + len(batch_range)] for key, t in figures.items()}
                at += len(batch_range)
                psnrs.append(part["psnr"])
                ssims.append(part["ssim"])
                for d in depths:
                    coarse[d].append(part[f"psnr{d}"])
                if perceptual is not None:
                    lpipss.append(part["lpips"])
                if rows is not None:
                    rows.take({key[len("rows:"):]: t for key, t in part.items() if key.startswith("rows:")})
            count = round_.batches[-1].stop
        if not count:
            raise ValueError(f"no images to reconstruct in {images}")
        stats = codebook_stats(counts)
        metrics = {
            "tokenizer": str(tokenizer_dir),
            "images": images,
            "num_images": int(sum(len(p) for p in psnrs)),
            "resolution": resolution,
            "grid": list(grid_shape),
            "codebook_size": model.codebook_size,
            "psnr": float(torch.cat(psnrs).mean()),
            "ssim": float(torch.cat(ssims).mean()),
            "lpips": float(torch.cat(lpipss).mean()) if lpipss else None,
            "codebook_usage": stats["usage"],
            "num_tokens": int(counts.sum()),  # usage counts codes hit among these: few tokens undercount it
            "perplexity": stats["perplexity"],
            # log2 of the codes one grid cell can hold: residual VQ's cells hold one depth's codebook_size each
            "bits_per_image": bits_per_image(grid_shape, model.config.quantizer.codebook_size),
        }
        if coarse:
            metrics["psnr_by_depth"] = [float(torch.cat(coarse[d]).mean()) for d in coarse] + [metrics["psnr"]]
        if dest is not None:
            save_grid(side_by_side(torch.cat(originals)[:16], torch.cat(recons)[:16]), dest / "grid.png", nrow=8)
            sources = {"names": [dataset.name(i) for i in used], "unreadable": [dataset.name(i) for i in left_out]}
            write_text_whole(dest / SOURCES_NAME, json.dumps(sources, indent=2) + "\n")
            write_json_whole(dest / "metrics.json", metrics)
            _write_record(dest, count if save_images else 0)
        return metrics
