"""`vqgpt demo`: the whole workflow on the built-in real MNIST digits, on a CPU.

tokenizer -> reconstruction figures -> token shards -> class-conditional prior -> samples, one
row per digit -> class accuracy of the samples by a classifier trained on real digits -> report.
The configs it uses are the files in configs/ (`cpu_demo.yaml`); a test keeps them equal.

`vqgpt demo --tokenizer pixels` (``run_pixel_demo``) is Image GPT's version: pixel tokens (a k-means
palette of 16 grey levels, configs/tokenizer/pixels_digits.yaml) -> token shards -> an unconditional
prior over the pixels in raster order (configs/prior/pixels_digits.yaml) -> samples, half-image
completions, and the prior's bits per dim on held-out digits.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
import yaml

from stage1_vq.evaluate import reconstruct
from stage1_vq.losses import LossConfig
from stage1_vq.model import VQModelConfig
from stage1_vq.palette import PaletteConfig
from stage1_vq.quantizers import QuantizerConfig
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior import SamplingConfig
from stage2_prior.model import GPTConfig
from stage2_prior.train import PriorRunConfig
from vqgpt.workflow.classifier import class_accuracy, load_or_train_mnist_classifier
from vqgpt.ground.data import DataConfig, build_dataset
from vqgpt.workflow.encode import encode_dataset
from vqgpt.workflow.evaluation import eval_bits_per_dim
from vqgpt.ground.images import save_grid
from vqgpt.ground.checkpoint import name_listing
from vqgpt.ground.files import write_text_whole
from vqgpt.workflow.pipeline import VQGPTPipeline
from vqgpt.training import TrainConfig, cpu_has_fast_bf16
from vqgpt.training.loop import continue_hint
from vqgpt.training.run_folder import RunLock
from vqgpt.workflow.chain import train_prior_with_tokenizer


def demo_tokenizer_config(quick: bool = False) -> TokenizerRunConfig:
    """The demo's stage-1 config (equal to configs/tokenizer/cpu_demo.yaml, or its --quick variant)."""
    cfg = TokenizerRunConfig(
        model=VQModelConfig(
            channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], resolution=32,
            z_channels=32, norm_groups=8,
            quantizer=QuantizerConfig(kind="vq", codebook_size=256, ema=True, kmeans_init=True,
                                      restart_threshold=0.1),
        ),
        loss=LossConfig(reconstruction="l1", perceptual="none", perceptual_weight=0.0, gan_weight=0.0),
        data=DataConfig(source="builtin:mnist", resolution=32, hflip=False),
        train=TrainConfig(steps=1200, batch_size=32, lr=2e-3, beta1=0.5, beta2=0.9, warmup_steps=50,
                          mixed_precision="bf16", log_every=25, sample_every=400, checkpoint_every=400),
    )
    if quick:
        cfg = replace(cfg, train=replace(cfg.train, steps=200, sample_every=0, checkpoint_every=0))
    return cfg


def demo_prior_config(quick: bool = False) -> PriorRunConfig:
    """The demo's stage-2 config (equal to configs/prior/cpu_demo.yaml, or its --quick variant)."""
    cfg = PriorRunConfig(
        model=GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=64, class_dropout=0.1, dropout=0.1),
        train=TrainConfig(steps=2000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.05, beta2=0.95,
                          mixed_precision="bf16", log_every=25, sample_every=1000, checkpoint_every=1000),
        sample_cfg_scale=2.0,
    )
    if quick:
        cfg = replace(cfg, train=replace(cfg.train, steps=600, sample_every=0, checkpoint_every=0))
    return cfg


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


DEMO_RECORD = ".vqgpt-demo.json"  # in a demo's --out: which demo it holds, and its seconds per stage so far


class _Laps:
    """Seconds per demo stage (``begin(name)`` ... ``end()``) and, in ``seconds()``, the total, summed over the
    sessions of one demo folder: a demo stopped and run again reports the time its stages took in all,
    not only the rest done by the last session. Kept in ``out``'s demo record after each stage."""

    def __init__(self, record: Path, earlier: dict) -> None:
        self.record, self.kind = record, {k: earlier[k] for k in ("tokenizer", "quick", "folder")}
        self.start = time.perf_counter()
        self.earlier: dict[str, float] = dict(earlier.get("seconds", {}))
        self.timings: dict[str, float] = {}
        self.sessions = int(earlier.get("sessions", 0)) + 1
        self.current: tuple[str, float] | None = None  # the stage begun and not yet ended, and its start

    def begin(self, name: str, start: float | None = None) -> None:
        """Stage ``name`` starts now (or at ``start``, a ``time.perf_counter()`` reading)."""
        self.current = (name, time.perf_counter() if start is None else start)

    def end(self) -> None:
        """The stage begun ends (done, or the session stopped inside it: its time so far counts, as the
        total's does); the record is saved."""
        if self.current is not None:
            name, start = self.current
            self.timings[name] = self.earlier.get(name, 0.0) + time.perf_counter() - start
            self.current = None
        self.save()

    def _summed(self) -> dict[str, float]:
        total = self.earlier.get("total", 0.0) + time.perf_counter() - self.start
        return {**self.earlier, **self.timings, "total": total}

    def seconds(self) -> dict[str, float]:
        summed = self._summed()
        return {**{k: round(v, 1) for k, v in summed.items() if k != "total"}, "total": round(summed["total"], 1)}

    def save(self) -> None:
        record = {**self.kind, "sessions": self.sessions, "seconds": self._summed()}
        write_text_whole(self.record, json.dumps(record, indent=2) + "\n")


@contextmanager
def _demo_folder(out: Path, tokenizer: str, quick: bool) -> Iterator[_Laps]:
    """``out`` locked for the demo's life (out/.lock: a second demo there is refused before it touches the
    record or a run), then claimed as ``_claim_demo_folder`` says; its stage timer."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the demo")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot make the folder ({exc.strerror or exc})") from None
    lock = RunLock(out)
    lock.acquire()
    try:
        laps = _claim_demo_folder(out, tokenizer, quick)
        try:
            with continue_hint("the same vqgpt demo command continues it"):  # (it takes no --resume)
                yield laps
        except BaseException:
            laps.end()  # (the time of a stopped session counts: the report sums the sessions)
            raise
    finally:
        lock.release()


def _claim_demo_folder(out: Path, tokenizer: str, quick: bool) -> _Laps:
    """The stage timer of the demo in ``out``, after checking that ``out`` holds no other demo: a --quick run
    continued as the full one (or a vq demo as a pixel one) would resume the other's runs, mix their
    schedules, and stop at its token shards with a hint (--overwrite) the demo does not take."""
    out.mkdir(parents=True, exist_ok=True)
    record, earlier = out / DEMO_RECORD, {}

    def name(kind: str, short: bool) -> str:
        return f"{'a --quick' if short else 'a full'} {kind} demo"

    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
            holds = (earlier["tokenizer"], bool(earlier["quick"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{record} is damaged: it records which demo {out} holds; give another --out") from None
        if holds != (tokenizer, quick):
            raise ValueError(f"{out} holds {name(*holds)}, and this is {name(tokenizer, quick)}: its runs cannot "
                             f"be continued as this one's; give another --out (or delete {out})")
        made_at = earlier.get("folder")
        if made_at and made_at != str(out.resolve()) and (out / "prior_run" / "config.yaml").is_file():
            # the prior run's config names its token folder by path, and a resume refuses another one
            raise ValueError(f"{out} was made at {made_at}, and its prior run names its token shards there: the demo "
                             f"continues it only in that place; move it back, or give a new --out")
    elif present := [entry for entry in DEMO_OUTPUTS if (out / entry).exists()]:
        # No record: a demo folder of an earlier version (which wrote none), or the user's own files under
        # the names the demo writes (report.md, samples.png), which it would overwrite.
        kinds = _unrecorded_demo_kinds(out)
        if (tokenizer, quick) not in kinds:
            if len(kinds) == 1:
                raise ValueError(f"{out} holds {name(*kinds[0])} (of a version that wrote no {DEMO_RECORD}), and "
                                 f"this is {name(tokenizer, quick)}: its runs cannot be continued as this one's; "
                                 f"give another --out (or delete {out})")
            raise ValueError(f"{out} holds {name_listing(present)}, names this demo writes, but no record of a demo "
                             f"({DEMO_RECORD}): the demo would overwrite them or continue them as its own; give "
                             f"another --out")
    earlier = {**earlier, "tokenizer": tokenizer, "quick": quick, "folder": str(out.resolve())}
    laps = _Laps(record, earlier)
    laps.save()
    return laps


DEMO_OUTPUTS = ("tokenizer_run", "reconstruction", "tokens", "prior_run", "pipeline", "samples.png",
                "samples_wide.png", "completions.png", "metrics.json", "report.md")  # what the demos write in --out


def _unrecorded_demo_kinds(out: Path) -> list[tuple[str, bool]]:
    """The demos ((tokenizer, quick)) whose schedules the run folders in ``out`` were started with; a demo
    folder of a version that wrote no record is told apart by them. Empty when ``out`` holds no demo run."""
    def started(run: str) -> tuple | None:
        try:
            config = yaml.safe_load((out / run / "config.yaml").read_text())
            return config["model"]["architecture"] if run == "tokenizer_run" else None, config["train"]["steps"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None

    tokenizer_run, prior_run = started("tokenizer_run"), started("prior_run")
    if tokenizer_run is None:
        return []
    kinds = []
    for kind, quick in (("vq", True), ("vq", False), ("pixels", True), ("pixels", False)):
        tok_cfg, prior_cfg = ((demo_tokenizer_config(quick), demo_prior_config(quick)) if kind == "vq" else
                              (pixel_demo_tokenizer_config(), pixel_demo_prior_config(quick)))
        if tokenizer_run == (tok_cfg.model.architecture, tok_cfg.train.steps) and \
                prior_run in (None, (None, prior_cfg.train.steps)):
            kinds.append((kind, quick))
    return kinds


def _without_slow_bf16(cfg: TokenizerRunConfig | PriorRunConfig) -> TokenizerRunConfig | PriorRunConfig:
    """``cfg`` training in float32 where neither a GPU nor fast bf16 CPU units are present (emulated bf16
    is ~10x slower than fp32 there), else unchanged; the demos are tuned for CPUs with bf16 units."""
    if torch.cuda.is_available() or cpu_has_fast_bf16():
        return cfg
    return replace(cfg, train=replace(cfg.train, mixed_precision="no"))


def _train_pipeline(prior_cfg: PriorRunConfig, tokens_dir: Path, tokenizer_dir: Path,
                    out: Path) -> tuple[Path, VQGPTPipeline]:
    """Train the prior on ``tokens_dir`` into out/prior_run and out/pipeline; returns (pipeline dir, pipeline)."""
    pipeline_dir = train_prior_with_tokenizer(replace(prior_cfg, tokens=str(tokens_dir)), out / "prior_run",
                                              tokenizer_dir, resume="auto", pipeline_dir=out / "pipeline")
    return pipeline_dir, VQGPTPipeline.from_pretrained(pipeline_dir)


def run_demo(out: str | Path, quick: bool = False, samples_per_class: int = 50, seed: int = 0) -> dict:
    """Run the demo into ``out``; returns the metrics written to out/metrics.json."""
    out = Path(out)
    with _demo_folder(out, "vq", quick) as lap:

        _say("1/6 training the tokenizer on builtin:mnist (real digits)")
        lap.begin("tokenizer")
        tok_cfg = _without_slow_bf16(demo_tokenizer_config(quick))
        prior_cfg = _without_slow_bf16(demo_prior_config(quick))
        if prior_cfg.train.mixed_precision == "no":
            _say("this CPU has no fast bf16 units: training in float32")
        tokenizer_dir = train_tokenizer(tok_cfg, out / "tokenizer_run", resume="auto")
        lap.end()

        _say("2/6 reconstructing held-out digits")
        lap.begin("reconstruct")
        recon = reconstruct(tokenizer_dir, "builtin:mnist", out / "reconstruction", lpips="none", save_images=False)
        lap.end()

        _say("3/6 encoding the training digits into token shards")
        lap.begin("encode")
        tokens_dir = encode_dataset(tokenizer_dir, tok_cfg.data, out / "tokens")
        lap.end()

        _say("4/6 training a class-conditional prior (10% class dropout for guidance)")
        lap.begin("prior")
        pipeline_dir, pipe = _train_pipeline(prior_cfg, tokens_dir, tokenizer_dir, out)
        lap.end()

        _say("5/6 sampling one row per digit")
        lap.begin("sample")
        cfg_scale = prior_cfg.sample_cfg_scale
        labels = torch.arange(10).repeat_interleave(samples_per_class)
        sampling = SamplingConfig(cfg_scale=cfg_scale)
        images = pipe.generate(len(labels), class_labels=labels, sampling=sampling, seed=seed)
        show = images.view(10, samples_per_class, *images.shape[1:])[:, :10].flatten(0, 1)
        save_grid(show, out / "samples.png", nrow=10, row_labels=[str(i) for i in range(10)])
        highres_path = None
        try:
            f = pipe.downsample_factor
            h, w = pipe.prior.config.grid_size
            wide = pipe.generate(4, class_labels=torch.tensor([0, 3, 5, 8]), height=h * f, width=2 * w * f,
                                 sampling=sampling, seed=seed)
            highres_path = save_grid(wide, out / "samples_wide.png", nrow=1)
        except NotImplementedError:
            pass
        lap.end()

        _say("6/6 checking the samples with a digit classifier trained on real MNIST")
        lap.begin("classifier")
        classifier, heldout = load_or_train_mnist_classifier()  # cached under ~/.cache/vqgpt (or $VQGPT_CACHE)
        accuracy = class_accuracy(classifier, images, labels)
        lap.end()

        metrics = {
            "reconstruction": {k: recon[k] for k in ("psnr", "ssim", "codebook_usage", "perplexity", "grid",
                                                     "codebook_size")},
            "samples": {"num": len(labels), "cfg_scale": cfg_scale, "class_accuracy": accuracy},
            "classifier_heldout_accuracy": heldout,
            "seconds": lap.seconds(),
            "sessions": lap.sessions,
            "quick": quick,
        }
        write_text_whole(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write_report(out, metrics, highres_path)
        _say(f"done in {metrics['seconds']['total']:.0f} s: PSNR {recon['psnr']:.2f} dB, codebook usage "
             f"{recon['codebook_usage']:.0%}, class accuracy of samples {accuracy:.1%} "
             f"(classifier held-out accuracy {heldout:.1%}). Report: {out / 'report.md'}")
        _say("your own images:  vqgpt train-tokenizer --config configs/tokenizer/cpu_demo.yaml "
             "--set data.source=/path/to/images --out runs/tok  &&  vqgpt encode --tokenizer runs/tok/export "
             "--data /path/to/images --out runs/codes  &&  vqgpt train-prior --config configs/prior/cpu_demo.yaml "
             "--tokens runs/codes --tokenizer runs/tok/export --out runs/prior  &&  vqgpt sample "
             "--pipeline runs/prior/pipeline --num 16 --out samples.png  (with --class-label NAME when the images "
             "sit in class sub-folders)")
        return metrics


def _write_report(out: Path, m: dict, highres: Path | None) -> None:
    r, s = m["reconstruction"], m["samples"]
    lines = [
        "# vqgpt demo report",
        "",
        f"Tokenizer: {r['codebook_size']} codes, {r['grid'][0]}x{r['grid'][1]} grid per 32x32 digit.",
        "",
        "## Reconstruction (held-out digits; left original, right reconstruction)",
        "",
        "![reconstruction](reconstruction/grid.png)",
        "",
        f"PSNR **{r['psnr']:.2f} dB**, SSIM **{r['ssim']:.3f}**, codebook usage **{r['codebook_usage']:.0%}** "
        f"(perplexity {r['perplexity']:.1f}).",
        "",
        "## Class-conditional samples (one row per digit)",
        "",
        "![samples](samples.png)",
        "",
        f"Guidance scale {s['cfg_scale']}. A classifier trained on real digits (held-out accuracy "
        f"{m['classifier_heldout_accuracy']:.1%}) recognises **{s['class_accuracy']:.1%}** of {s['num']} samples "
        "as the digit asked for.",
        "",
    ]
    if highres is not None:
        lines += ["## Wider than trained (sliding-window sampling)", "", f"![wide]({highres.name})", "",
                  "Twice the trained width for digits 0, 3, 5, 8. A digit is not a stationary image, so the extra "
                  "width shows strokes running on rather than a wider digit; stationary images such as textures "
                  "are where larger canvases make sense (`python benchmarks/textures_canvas.py`).", ""]
    lines += ["## Time (seconds)", "", *_sessions_line(m), "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["seconds"].items()]
    write_text_whole(out / "report.md", "\n".join(lines) + "\n")


def _sessions_line(m: dict) -> list[str]:
    """A line saying that the times are summed over several runs of the demo command, when they are."""
    n = m.get("sessions", 1)
    return [] if n <= 1 else [f"Summed over the {n} runs of the demo command into this folder (a run that "
                              "was stopped, or found the work done, continued where the last one stopped).", ""]


# ---------------------------------------------------------------------------------------------- pixel tokens

PIXEL_DEMO_SIZE = 16  # digits downscaled to 16x16: 256 tokens per image keeps the prior a few CPU minutes


def pixel_demo_tokenizer_config() -> TokenizerRunConfig:
    """The pixel demo's stage-1 config (equal to configs/tokenizer/pixels_digits.yaml): a 16-colour palette."""
    return TokenizerRunConfig(
        model=VQModelConfig(architecture="pixels", resolution=PIXEL_DEMO_SIZE,
                            quantizer=QuantizerConfig(kind="vq", codebook_size=16)),
        data=DataConfig(source="builtin:mnist", resolution=PIXEL_DEMO_SIZE, hflip=False),
        palette=PaletteConfig(sample_pixels=200_000, pixels_per_image=64, iterations=20, init="kmeans++"),
        train=TrainConfig(batch_size=64),
    )


def pixel_demo_prior_config(quick: bool = False) -> PriorRunConfig:
    """The pixel demo's stage-2 config (equal to configs/prior/pixels_digits.yaml, or its --quick variant)."""
    cfg = PriorRunConfig(
        model=GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=64, dropout=0.1),
        conditional=False,
        train=TrainConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=0.05, beta2=0.95,
                          mixed_precision="bf16", log_every=25, sample_every=300, checkpoint_every=300),
    )
    if quick:
        cfg = replace(cfg, train=replace(cfg.train, steps=150, sample_every=0, checkpoint_every=0))
    return cfg


def _occluded_rows(image: torch.Tensor, keep_rows: int) -> torch.Tensor:
    """The image (3, H, W) with the rows from ``keep_rows`` on greyed out, as the prior sees it."""
    shown = image.clone()
    shown[:, keep_rows:] = 0.0
    return shown


def run_pixel_demo(out: str | Path, quick: bool = False, num_samples: int = 32, seed: int = 0) -> dict:
    """Image GPT on the built-in digits into ``out``; returns the metrics written to out/metrics.json."""
    out = Path(out)
    with _demo_folder(out, "pixels", quick) as lap:
        tok_cfg, prior_cfg = pixel_demo_tokenizer_config(), _without_slow_bf16(pixel_demo_prior_config(quick))
        if prior_cfg.train.mixed_precision == "no":
            _say("this CPU has no fast bf16 units: training in float32")
        size, colours = tok_cfg.model.resolution, tok_cfg.model.quantizer.codebook_size

        _say(f"1/6 fitting a palette of {colours} colours to the training digits' pixels (k-means)")
        lap.begin("palette")
        tokenizer_dir = train_tokenizer(tok_cfg, out / "tokenizer_run", resume="auto")
        recon = reconstruct(tokenizer_dir, "builtin:mnist", out / "reconstruction", lpips="none", save_images=False,
                            progress=False)
        lap.end()

        _say(f"2/6 encoding the training digits: one token per pixel, {size}x{size} per digit")
        lap.begin("encode")
        tokens_dir = encode_dataset(tokenizer_dir, tok_cfg.data, out / "tokens")
        lap.end()

        _say("3/6 training an unconditional prior over the pixels in raster order")
        lap.begin("prior")
        pipeline_dir, pipe = _train_pipeline(prior_cfg, tokens_dir, tokenizer_dir, out)
        lap.end()

        _say(f"4/6 sampling {num_samples} digits")
        lap.begin("sample")
        sampling = SamplingConfig()
        samples = pipe.generate(num_samples, sampling=sampling, seed=seed)
        save_grid(samples, out / "samples.png", nrow=8)
        lap.end()

        _say("5/6 completing the lower half of held-out digits (4 completions each)")
        lap.begin("complete")
        heldout = build_dataset(replace(tok_cfg.data, random_crop=False), "eval")
        per_class = len(heldout) // 10
        keep = size // 2
        rows = []
        for digit in range(10):
            image = heldout[digit * per_class][0]  # eval split: 50 digits per class, in class order
            completions = pipe.complete(image, 4, keep_rows=keep, sampling=sampling, seed=seed + digit)
            rows.append(torch.cat([_occluded_rows(image, keep)[None], completions.cpu(), image[None]]))
        save_grid(torch.cat(rows), out / "completions.png", nrow=6)
        lap.end()

        _say("6/6 bits per dim of the prior on the held-out digits")
        lap.begin("bits_per_dim")
        bpd = eval_bits_per_dim(pipeline_dir, "builtin:mnist", split="eval", progress=False)
        lap.end()

        metrics = {
            "tokenizer": {"palette_colours": colours, "resolution": size, "tokens_per_image": size * size,
                          "psnr": recon["psnr"], "codebook_usage": recon["codebook_usage"],
                          "perplexity": recon["perplexity"]},
            "prior": {"steps": prior_cfg.train.steps, **{k: v for k, v in bpd.to_dict().items()
                                                            if k in ("num_images", "nll_per_token", "bits_per_token",
                                                                     "bits_per_dim", "uniform_bits_per_dim")}},
            "samples": num_samples,
            "seconds": lap.seconds(),
            "sessions": lap.sessions,
            "quick": quick,
        }
        write_text_whole(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _write_pixel_report(out, metrics)
        _say(f"done in {metrics['seconds']['total']:.0f} s: {bpd.bits_per_dim:.3f} bits per dim on "
             f"{bpd.num_images} held-out digits ({bpd.bits_per_token:.3f} bits per pixel token; a uniform prior: "
             f"{bpd.uniform_bits_per_dim:.3f}); samples {out / 'samples.png'}, completions {out / 'completions.png'}, "
             f"report {out / 'report.md'}")
        return metrics


def _write_pixel_report(out: Path, m: dict) -> None:
    tok, prior = m["tokenizer"], m["prior"]
    lines = [
        "# vqgpt pixel-token demo (Image GPT style)",
        "",
        f"Tokenizer: a palette of {tok['palette_colours']} colours fitted by k-means to the training pixels; each "
        f"pixel of a {tok['resolution']}x{tok['resolution']} digit is one token ({tok['tokens_per_image']} per "
        f"digit). Held-out digits through the palette: PSNR **{tok['psnr']:.2f} dB**, {tok['codebook_usage']:.0%} "
        f"of the colours used.",
        "",
        "## Unconditional samples",
        "",
        "![samples](samples.png)",
        "",
        "## Half-image completions (held-out digits)",
        "",
        "Each row: the upper half given (lower half greyed), four completions, the original.",
        "",
        "![completions](completions.png)",
        "",
        "## Likelihood on held-out digits",
        "",
        f"After {prior['steps']} prior steps: **{prior['bits_per_dim']:.3f} bits per dim** "
        f"({prior['bits_per_token']:.3f} bits per pixel token over 3 sub-pixels, as Image GPT counts; a uniform "
        f"prior over the palette: {prior['uniform_bits_per_dim']:.3f}) on {prior['num_images']} digits. These are "
        "bits of the palette tokens, not of the 8-bit pixels (`vqgpt eval-bpd`).",
        "",
        "## Time (seconds)",
        "",
        *_sessions_line(m),
        "| stage | s |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in m["seconds"].items()]
    write_text_whole(out / "report.md", "\n".join(lines) + "\n")
