"""Many samples on many processes (``accelerate launch -m vqgpt sample --out FOLDER/ [--npz F.npz]``).

Sample i is drawn from its own generator, seeded from (run seed, i), with its own class label, so
its codes depend on neither the batch it is drawn in nor the process count. The indices are cut
into batches of ``batch_size`` consecutive indices, [0, B), [B, 2B), ..., and batch c goes to
process c % N: every sample is always drawn and decoded in the same batch, so the images are
bitwise the same on any number of processes. Each sample becomes ``FOLDER/{i:06d}.png``, written
atomically; those files are the progress record: a re-run skips every batch whose files all exist,
draws a batch with a missing file again whole (the same batch, so the same pixels) and writes only
the missing files (an empty or cut-short PNG, one that does not end in PNG's IEND chunk, counts as
missing). ``sampling.json`` in the folder records the settings and digests of the weights and of the
models' configs, and a re-run with other settings, weights or configs is refused (unless no sample
was finished yet). With ``--npz`` alone the samples go to a scratch folder ``NPZ.parts/``, which must
hold nothing but what a sampling run writes, and is removed once the npz is written; the npz records the
settings (under ``vqgpt_settings``), so that the same command after it finished draws nothing. One run
at a time: the main process holds an OS lock on ``FOLDER/.lock`` for the run's life (dropped when the
process dies, so an interrupted run resumes), and a second run into the folder fails at once. When all
processes are done, rank 0 reads the folder into one ``.npz`` in the layout of the ADM evaluator: uint8
(N, H, W, 3) under ``arr_0`` and, for a class-conditional prior, the int64 labels (N,) under ``arr_1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from stage2_prior.draw import SamplingConfig, check_sampling_args
from stage2_prior.quantize import is_quantized
from vqgpt.ground.checkpoint import check_file_place, name_listing
from vqgpt.ground.config import to_dict
from vqgpt.ground.files import replace_when_whole, write_text_whole
from vqgpt.ground.images import tensor_to_uint8
from vqgpt.training.config import launched_process_state
from vqgpt.training.run_folder import RunFolderError, RunLock, share_failures, share_main_failure
from vqgpt.training.shares import said_once
from vqgpt.workflow.pipeline import ClassLabels, VQGPTPipeline, sample_generators, sample_seed

SETTINGS_FILE = "sampling.json"
# What a run writes into its folder (the --npz scratch folder NPZ.parts/ must hold nothing else)
_OURS = re.compile(r"(\d{6,}\.png|\.\d{6,}\.png\.tmp|\.lock|" + re.escape(SETTINGS_FILE) + ")")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every whole PNG file
IMAGES_KEY, LABELS_KEY = "arr_0", "arr_1"  # the ADM evaluator's names (np.savez's positional names)
# the settings an npz was drawn with (sampling.json's), as a 0-d string array: the ADM evaluator reads arr_0 alone
NPZ_SETTINGS_KEY = "vqgpt_settings"


@dataclasses.dataclass(frozen=True)
class ManySamples:
    """What ``sample_many`` did: ``drawn`` + ``skipped`` == ``num`` (counted over all processes)."""

    num: int
    drawn: int  # samples whose batch was drawn by this run
    skipped: int  # samples whose batch was finished already
    processes: int
    folder: Path | None  # the PNG folder (None when only an npz was asked for: its scratch folder is removed)
    npz: Path | None


def class_balanced_labels(num_classes: int, per_class: int, num: int | None = None) -> torch.Tensor:
    """Labels (num_classes * per_class,): class 0 ``per_class`` times, then class 1, ...; ``num`` must agree."""
    if num_classes < 1:
        raise ValueError("--per-class needs a class-conditional prior; this one is unconditional (num_classes=0)")
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    total = num_classes * per_class
    if num is not None and num != total:
        raise ValueError(f"--num {num} disagrees with --per-class {per_class}: the prior has {num_classes} classes, "
                         f"so that is {total} samples; give --num {total} or leave --num out")
    return torch.arange(num_classes).repeat_interleave(per_class)


def _process_state() -> PartialState:
    """This process's rank among those ``accelerate launch`` started (one when run plainly)."""
    return launched_process_state("each would draw every sample")


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def batch_ranges(num: int, batch_size: int) -> list[range]:
    """Indices 0..num-1 cut into batches [0, B), [B, 2B), ...; batch c is drawn by process c % N."""
    return [range(start, min(start + batch_size, num)) for start in range(0, num, batch_size)]


def draw_images(pipe: VQGPTPipeline, indices: list[int], labels: torch.Tensor | None, grid: tuple[int, int],
                sampling: SamplingConfig, seed: int) -> torch.Tensor:
    """Samples ``indices`` of a run seeded with ``seed``, each from its own generator -> (B, 3, H, W) in [-1, 1].

    ``labels``: (B,) class labels of those samples, or None (unconditional).
    """
    codes = pipe.draw_codes(len(indices), labels, grid, sampling, generators=sample_generators(seed, indices))
    return pipe.decode_codes(codes)


def weights_digest(*modules: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of ``modules`` (names, dtypes, shapes and bytes): which models drew."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in module.state_dict().items():
            if not torch.is_tensor(tensor):
                continue
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def configs_digest(pipe: VQGPTPipeline) -> str:
    """A hash of the tokenizer's and the prior's configs: the same weights under another config (a RoPE
    base, a norm's groups) draw other images."""
    text = json.dumps([to_dict(pipe.tokenizer.config), to_dict(pipe.prior.config)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# settings keys that an earlier vqgpt did not record
_LATER_KEYS = ("compile",)


def _settings(num: int, seed: int, batch_size: int, labels: torch.Tensor | None, sampling: SamplingConfig,
              grid: tuple[int, int], prior_dtype: str, compile: bool, models: str, configs: str) -> dict:
    label_bytes = b"" if labels is None else labels.cpu().numpy().astype("<i8").tobytes()
    return {"num": num, "seed": seed, "batch_size": batch_size, "grid": list(grid),
            "labels_sha256": hashlib.sha256(label_bytes).hexdigest(), "conditional": labels is not None,
            "sampling": dataclasses.asdict(sampling), "prior_dtype": prior_dtype, "compile": compile,
            "models": models, "configs": configs}


def finished_pngs(folder: Path) -> tuple[set[str], set[str]]:
    """(every sample PNG name in ``folder``, those written whole: ending in PNG's IEND chunk). An empty or
    cut-short file is no finished sample: its batch is drawn again and the file replaced."""
    names, whole = set(), set()
    for path in folder.glob("*.png"):
        names.add(path.name)
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() >= len(PNG_END):
                    f.seek(-len(PNG_END), os.SEEK_END)
                    if f.read() == PNG_END:
                        whole.add(path.name)
        except OSError:
            pass
    return names, whole


def _check_settings(folder: Path, settings: dict, pngs: set[str], scratch_of: Path | None = None) -> bool:
    """Refuse a folder holding samples (``pngs``, its PNG names) drawn with other settings or by other weights;
    whether ``settings`` are to be (re)written: a new folder, or one whose record lacks the weights.

    ``scratch_of``: the npz whose scratch folder ``folder`` is (--npz alone): the ways out then name --npz.
    """
    path = folder / SETTINGS_FILE
    if scratch_of is None:
        where, new_place, or_new_place = f"{folder}", "give a new folder", "or give a new folder"
    else:  # the user named no folder: say which one, and how to start over
        where = f"{folder} (where --npz {scratch_of} draws its samples)"
        new_place = or_new_place = f"choose another --npz, or delete {folder}/ to start over"
    if not path.exists():
        if pngs:
            raise ValueError(f"{where} holds PNG files but no {SETTINGS_FILE}: they are not samples of this run; "
                             + ("give an empty or new folder" if scratch_of is None else new_place))
        return True
    if not pngs:
        return True  # stopped before its first sample (say, out of memory): nothing to keep consistent with
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}): it records how the samples in {where} were drawn; "
                         f"{new_place}") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is damaged (not a JSON object): {new_place}")
    # (a record from before "compile" was recorded: not known, so not compared)
    changed = [f"{key}: {old.get(key)} then, {value} now" for key, value in settings.items()
               if key not in ("models", "configs") and old.get(key, value if key in _LATER_KEYS else None) != value]
    if changed:
        raise ValueError(f"{where} holds samples drawn with other settings ({'; '.join(changed)}): resume with the "
                         f"same settings, {or_new_place}")
    if "models" not in old or "configs" not in old:
        warnings.warn(f"{path} records no weights (an earlier vqgpt drew these samples): whether this pipeline drew "
                      "them is not checked; it is recorded as theirs from now on", stacklevel=2)
        return True
    if old["models"] != settings["models"]:
        raise ValueError(f"{where} holds samples drawn by other weights (another tokenizer or prior than this "
                         f"pipeline's): resume with the pipeline that drew them, {or_new_place}")
    if old["configs"] != settings["configs"]:
        raise ValueError(f"{where} holds samples drawn by models of another config (the tokenizer's or the "
                         "prior's config.json differs, with the same weights): resume with the pipeline that "
                         f"drew them, {or_new_place}")
    return False


def check_npz_path(npz: Path) -> None:
    """Refuse, before any sampling, an ``npz`` that cannot be written (its missing folders are made later), or
    one that a sampling run did not write (a reference batch: one mistyped path replaced it)."""
    check_file_place(npz, "--npz ")
    if npz.is_file() and npz_settings(npz) is None:
        raise ValueError(f"--npz {npz} already exists and holds no record of a vqgpt sampling run (an ADM "
                         "reference batch, say, or an npz of an earlier vqgpt): it is not replaced; choose another "
                         "--npz, or move or delete it")


def _write_png(array: np.ndarray, path: Path) -> None:
    # written whole, then renamed: a killed run leaves no half PNG, a failed one no temporary file
    replace_when_whole(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def write_npz(folder: Path, num: int, labels: torch.Tensor | None, path: Path, settings: dict | None = None) -> None:
    """The PNGs 0..num-1 of ``folder`` -> ``path`` (uint8 (N, H, W, 3) under arr_0, labels under arr_1, and
    ``settings`` as JSON under NPZ_SETTINGS_KEY).

    Streamed image by image into the zip (as ``np.savez`` lays it out), so memory stays one image.
    """
    first = _read_sample(folder / png_name(0))
    shape = (num, *first.shape)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i in range(num):
                    image = first if i == 0 else _read_sample(folder / png_name(i))
                    if image.shape != first.shape:
                        raise ValueError(f"{folder / png_name(i)} is {image.shape}, not {first.shape} as sample 0")
                    f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            if labels is not None:
                with archive.open(f"{LABELS_KEY}.npy", "w") as f:
                    np.lib.format.write_array(f, labels.cpu().numpy().astype(np.int64))
            if settings is not None:
                with archive.open(f"{NPZ_SETTINGS_KEY}.npy", "w") as f:
                    np.lib.format.write_array(f, np.array(json.dumps(settings, sort_keys=True)))

    replace_when_whole(path, write)  # no half archive left beside the npz, nor in its place


def npz_settings(path: Path) -> dict | None:
    """The settings ``write_npz`` recorded in ``path``; None for an npz without them, or no readable npz."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data[NPZ_SETTINGS_KEY])) if NPZ_SETTINGS_KEY in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile):  # not there, not an npz, cut short
        return None


def _read_sample(path: Path) -> np.ndarray:
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError) as exc:  # an empty, cut-short or replaced file
        raise ValueError(f"cannot read the sample {path} ({exc}): delete it and run the same command again to "
                         "draw it again") from None


@contextmanager
def _folder_locked(state: PartialState, folder: Path, npz: Path | None) -> Iterator[None]:
    """Hold ``folder/.lock`` while the body runs: two runs into one folder would mix their samples.

    Only the main process makes the folders and locks (the processes of one launch share the
    folder); its verdict goes to every process, so all raise its error instead of waiting in a barrier.
    """
    lock, failure = RunLock(folder), None
    if state.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if npz is not None:
                npz.parent.mkdir(parents=True, exist_ok=True)
        except RunFolderError as exc:
            lock.release()
            failure = exc
            if npz is not None and folder == npz.with_name(npz.name + ".parts"):  # --npz alone: no --out to change
                holder = lock.path.read_text(errors="replace").strip() or "another process"
                failure = RunFolderError(f"{holder} is writing {npz} (its samples go to {folder}, which it locks): "
                                         "wait for that run to end or stop it, or choose another --npz")
        except Exception as exc:
            lock.release()
            failure = exc
    share_main_failure(failure, state.num_processes)
    try:
        yield
    finally:
        lock.release()


def decoding_dtype(prior: torch.nn.Module) -> str:
    """'int8', or the dtype of the prior's weights ('float32', 'bfloat16'): what its samples are drawn in."""
    return "int8" if is_quantized(prior) else str(next(prior.parameters()).dtype).removeprefix("torch.")


@torch.inference_mode()
def sample_many(pipe: VQGPTPipeline, num: int, out: str | Path | None = None, npz: str | Path | None = None,
                class_labels: ClassLabels = None, sampling: SamplingConfig | None = None, seed: int = 0,
                height: int | None = None, width: int | None = None, batch_size: int = 32,
                device: str | torch.device | None = None, progress: bool = True) -> ManySamples:
    """Draw ``num`` samples into ``out/{i:06d}.png`` and/or one ``npz``, split over the launched processes.

    ``class_labels``: one label for all, or one per sample (see ``class_balanced_labels``). A re-run
    into the same folder continues an interrupted one (see the module docstring). With ``npz`` only,
    the PNGs go to a scratch folder ``NPZ.parts/`` beside it, removed once the npz is written; the
    npz's missing folders are made. Another run sampling into the folder is an error (``RunFolderError``).
    """
    if out is None and npz is None:
        raise ValueError("give an output folder (out) and/or an npz file (npz)")
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    npz = Path(npz) if npz is not None else None
    if npz is not None and npz.suffix != ".npz":
        named = npz.name == ".npz"  # (a bare '.npz' has no suffix in pathlib's view)
        raise ValueError(f"--npz {npz} must " + ("have a name before .npz" if named else "end with .npz"))
    if npz is not None:
        check_npz_path(npz)  # now, not after all the sampling
    folder = Path(out) if out is not None else npz.with_name(npz.name + ".parts")  # type: ignore[union-attr]
    if out is None and folder.is_symlink():  # its removal at the end emptied the folder the link names
        raise ValueError(f"--npz {npz} draws its samples into {folder}/ and removes it at the end, but {folder} is a "
                         f"link (to {os.readlink(folder)}): remove the link, or choose another --npz")
    if folder.exists() and not folder.is_dir():
        if out is None:
            raise ValueError(f"--npz {npz} draws its samples into {folder}/, but that is a file: move it, or choose "
                             "another --npz")
        raise ValueError(f"--out {folder} is a file, not a folder: give a folder for one PNG per sample")
    if npz is not None and out is not None and os.path.abspath(npz) == os.path.abspath(folder):
        raise ValueError(f"--npz {npz} is the --out folder: give the npz another name (e.g. {npz.with_suffix('')}"
                         f"-samples.npz)")
    if out is None and folder.is_dir():  # --npz alone: its scratch folder is removed at the end
        foreign = sorted(p.name for p in folder.iterdir() if not _OURS.fullmatch(p.name) or not p.is_file())
        if foreign:
            raise ValueError(f"--npz {npz} draws its samples into {folder}/ and removes it at the end, but it holds "
                             f"files no sampling run wrote ({name_listing(foreign, 3)}): choose another --npz, or "
                             "move them")
    sampling = sampling or SamplingConfig()
    state = _process_state()
    processes, rank = state.num_processes, state.process_index
    pipe.to(torch.device(device) if device is not None else state.device)
    grid = pipe.grid_for_pixels(height, width)
    labels = pipe.labels_tensor(class_labels, num)
    # what the draw would refuse (guidance this prior cannot give, a seed out of range): before the folder is made
    check_sampling_args(pipe.prior, sampling)
    sample_generators(seed, [])
    # int8 weights sample other images than the float ones, and a compiled step (bf16: its products round
    # elsewhere) other images than an eager one: a resumed folder must keep the same
    settings = _settings(num, seed, batch_size, labels, sampling, grid, decoding_dtype(pipe.prior),
                         pipe.compile_decode, weights_digest(pipe.tokenizer, pipe.prior), configs_digest(pipe))
    if out is None and not folder.exists() and npz_settings(npz) == settings:  # type: ignore[arg-type]
        # the same command again after it finished: its scratch folder is gone, its npz holds these very samples
        return ManySamples(num=num, drawn=0, skipped=num, processes=processes, folder=None, npz=npz)
    with _folder_locked(state, folder, npz):
        # Every process reads what is finished before any writes, so all agree on the counts.
        pngs, done = finished_pngs(folder)
        in_the_way = sorted(name for name in pngs if _OURS.fullmatch(name) and not (folder / name).is_file())
        if in_the_way:  # found at the rename, after drawing its batch
            raise FileExistsError(f"{folder}: not a file where a sample image is to be written: "
                                  f"{name_listing(in_the_way)}; move it away")
        with said_once(state):
            record = _check_settings(folder, settings, pngs, npz if out is None else None)
        batches = batch_ranges(num, batch_size)
        todo = [c for c, batch in enumerate(batches) if any(png_name(i) not in done for i in batch)]
        drawn = sum(len(batches[c]) for c in todo)
        state.wait_for_everyone()
        if state.is_main_process and record:  # a new folder, one stopped before its first sample, an old record
            write_text_whole(folder / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        state.wait_for_everyone()
        mine = [c for c in todo if c % processes == rank]
        failure = None
        try:
            for c in tqdm(mine, disable=not (progress and state.is_main_process), desc="sampling batches"):
                index = list(batches[c])
                images = tensor_to_uint8(draw_images(pipe, index, None if labels is None else labels[index], grid,
                                                     sampling, seed))  # (B, 3, H, W)
                for i, image in zip(index, images):
                    if png_name(i) not in done:  # a finished file is never rewritten
                        _write_png(image.permute(1, 2, 0).numpy(), folder / png_name(i))
        except Exception as exc:  # one process's failure (a full disk, out of memory) stops all with its reason
            failure = exc
        share_failures(failure, processes)  # (raises on every process if any failed)
        if npz is not None and state.is_main_process:
            try:
                write_npz(folder, num, labels, npz, settings)
                if out is None:  # the scratch folder held only what runs write (checked above): all of it goes
                    # Moved aside first: a run starting meanwhile makes a fresh one rather than taking this
                    # folder's lock (or making a new .lock in it) halfway through its removal.
                    gone = folder.with_name(f".{folder.name}.{os.getpid()}.removed")
                    folder.rename(gone)
                    for path in gone.iterdir():
                        if _OURS.fullmatch(path.name):
                            path.unlink()
                    gone.rmdir()
            except Exception as exc:
                failure = exc
        share_main_failure(failure, processes)
    return ManySamples(num=num, drawn=drawn, skipped=num - drawn, processes=processes,
                       folder=None if out is None else folder, npz=npz)
