"""The `vqgpt` command: each subcommand builds a config and calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--out", required=True, help="run folder (config, metrics, samples, checkpoints, export/)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint ('auto') or a checkpoint folder")


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from stage1_vq.train import TokenizerRunConfig, train_tokenizer
    from vqgpt.config import load_config

    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    train_tokenizer(cfg, args.out, resume=args.resume)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from stage1_vq.evaluate import reconstruct

    metrics = reconstruct(args.tokenizer, args.images, args.out, num_images=args.num, resolution=args.resolution,
                          batch_size=args.batch_size, lpips=args.lpips, progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
        print(f"{metrics['num_images']} images at {metrics['resolution']}px -> grid {metrics['grid']}\n"
              f"PSNR {metrics['psnr']:.2f} dB | SSIM {metrics['ssim']:.4f} | LPIPS {lp} | "
              f"{metrics['bits_per_image']:.0f} bits/image\n"
              f"codebook usage {metrics['codebook_usage']:.1%} of {metrics['codebook_size']} codes over "
              f"{metrics['num_tokens']:,} tokens (perplexity {metrics['perplexity']:.1f})"
              + (" - under 10 tokens per code, so usage undercounts: pass more images"
                 if metrics["num_tokens"] < 10 * metrics["codebook_size"] else "")
              + f"\nwrote {args.out}/grid.png, images/, metrics.json")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from vqgpt.checkpoint import read_export_meta
    from vqgpt.data import DataConfig
    from vqgpt.encode import encode_dataset

    resolution = args.resolution or read_export_meta(args.tokenizer, "vq_tokenizer")["config"]["resolution"]
    data = DataConfig(source=args.data, resolution=resolution)
    out = encode_dataset(args.tokenizer, data, args.out, batch_size=args.batch_size, flip=args.flip, split=args.split)
    print(f"token shards written to {out}")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    from stage2_prior.train import PriorRunConfig, train_prior
    from vqgpt.config import load_config

    cfg = load_config(PriorRunConfig, args.config, [*args.overrides, f"tokens={args.tokens}"])
    decode = fingerprint = None
    if args.tokenizer:
        from stage1_vq.model import VQModel
        from vqgpt.encode import tokenizer_fingerprint

        tokenizer = VQModel.from_pretrained(args.tokenizer).eval()
        fingerprint = tokenizer_fingerprint(args.tokenizer)
        decode = tokenizer.decode
    export = train_prior(cfg, args.out, resume=args.resume, decode=decode, tokenizer_fingerprint=fingerprint)
    if args.tokenizer:
        from vqgpt.pipeline import VQGPTPipeline

        pipe = VQGPTPipeline.from_parts(args.tokenizer, export)
        pipe.save_pretrained(Path(args.out) / "pipeline")
        print(f"pipeline (tokenizer + prior) written to {Path(args.out) / 'pipeline'}")
    return 0


def _load_pipeline(args: argparse.Namespace):
    from vqgpt.pipeline import VQGPTPipeline

    if args.pipeline:
        pipe = VQGPTPipeline.from_pretrained(args.pipeline)
    elif args.tokenizer and args.prior:
        pipe = VQGPTPipeline.from_parts(args.tokenizer, args.prior)
    else:
        raise SystemExit("error: give --pipeline DIR, or both --tokenizer DIR and --prior DIR")
    if getattr(args, "prior_dtype", "float32") != "float32":
        import torch

        pipe.prior.to(getattr(torch, args.prior_dtype))
    return pipe


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", help="pipeline folder (tokenizer/ + prior/)")
    p.add_argument("--tokenizer", help="tokenizer export folder (with --prior)")
    p.add_argument("--prior", help="prior export folder (with --tokenizer)")


def _add_sampling_knobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-label", default=None, help="class index or name (conditional priors)")
    _add_sampling_knobs(p)
    p.add_argument("--prior-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="prior weights while sampling: bfloat16 reads half the bytes per token (faster at batch 8 "
                        "and up on CPUs with bf16 units, and on GPUs); the tokenizer stays float32")
    p.add_argument("--out", required=True, help="output PNG (a grid)")
    p.add_argument("--save-each", action="store_true", help="also write each image beside the grid")


def _save_outputs(images, args: argparse.Namespace, nrow: int) -> None:
    from vqgpt.images import save_grid, tensor_to_pil

    out = Path(args.out)
    save_grid(images, out, nrow=nrow)
    if args.save_each:
        folder = out.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            tensor_to_pil(img).save(folder / f"{i:04d}.png")
    print(f"wrote {out}" + (f" and {out.with_suffix('')}/" if args.save_each else ""))


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    pipe = _load_pipeline(args)
    label = pipe.class_index(args.class_label) if args.class_label is not None else None
    if torch.cuda.is_available():
        pipe.to("cuda")
    images = pipe.generate(args.num, class_labels=label, height=args.height, width=args.width,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           cfg_scale=args.cfg_scale, seed=args.seed)
    _save_outputs(images.cpu(), args, nrow=min(8, args.num))
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    import torch
    from torchvision.transforms.v2 import functional as TF

    from vqgpt.images import open_rgb, pil_to_tensor

    pipe = _load_pipeline(args)
    label = pipe.class_index(args.class_label) if args.class_label is not None else None
    height, width = pipe.trained_pixels()
    # The image is fitted to the prior's trained size: shorter side resized, then center-cropped.
    image = pil_to_tensor(open_rgb(args.image))
    image = TF.center_crop(TF.resize(image, min(height, width), antialias=True), [height, width])
    if args.keep_rows is None and not (args.extend_right or args.extend_down):
        raise SystemExit("error: give --keep-rows N and/or --extend-right N / --extend-down N")
    images = pipe.complete(image, args.num, keep_rows=args.keep_rows, extend_right=args.extend_right,
                           extend_down=args.extend_down, class_labels=label, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale, seed=args.seed)
    # first the input (padded to the output size with white), then the completions
    original = torch.ones_like(images[:1])
    original[..., : image.shape[1], : image.shape[2]] = image
    _save_outputs(torch.cat([original, images.cpu()]), args, nrow=min(8, args.num + 1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vqgpt.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from vqgpt import importers

    if args.source == "taming":
        result = importers.import_taming(args.checkpoint, args.config, args.out, weights=args.weights)
    elif args.source == "llamagen-vq":
        result = importers.import_llamagen_vq(args.checkpoint, args.out, preset=args.preset,
                                              image_size=args.image_size, weights=args.weights)
    else:
        names = None
        if args.classes:
            names = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
        result = importers.import_llamagen_gpt(args.checkpoint, args.tokenizer, args.out, preset=args.preset,
                                               image_size=args.image_size, num_classes=args.num_classes,
                                               class_names=names, weights=args.weights)
    print(f"wrote {result.out} from '{result.weights}' ({result.num_tensors} tensors; dropped: {result.dropped})")
    return 0


def _print_report(report, as_json: bool) -> None:
    data = report.to_dict()
    if as_json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")


def cmd_eval_tokenizer(args: argparse.Namespace) -> int:
    from vqgpt.evaluation import eval_tokenizer

    report = eval_tokenizer(args.tokenizer, args.images, fid_weights=args.fid_weights, lpips=args.lpips,
                            num_images=args.num, batch_size=args.batch_size, out=args.out, device=args.device,
                            progress=not args.json)
    _print_report(report, args.json)
    return 0


def cmd_eval_prior(args: argparse.Namespace) -> int:
    from vqgpt.evaluation import eval_prior

    report = eval_prior(args.pipeline, args.reference, num_samples=args.num, batch_size=args.batch_size,
                        cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, fid_weights=args.fid_weights, reference_split=args.split,
                        classifier_path=args.classifier, device=args.device, progress=not args.json)
    _print_report(report, args.json)
    return 0


def cmd_fid_stats(args: argparse.Namespace) -> int:
    from vqgpt.evaluation import fid_stats

    report = fid_stats(args.images, args.out, fid_weights=args.fid_weights, resolution=args.resolution,
                       split=args.split, num_images=args.num, batch_size=args.batch_size, device=args.device)
    _print_report(report, False)
    return 0


def config_reference_text() -> str:
    """The README's config reference, generated from the config dataclasses."""
    from stage1_vq.train import TokenizerRunConfig
    from stage2_prior.train import PriorRunConfig
    from vqgpt.config import reference_markdown

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
    p.add_argument("--tokenizer", required=True, help="tokenizer export folder")
    p.add_argument("--images", required=True, help="image folder or builtin:mnist|photos|textures (eval split)")
    p.add_argument("--out", required=True, help="output folder (images/, grid.png, metrics.json)")
    p.add_argument("--num", type=int, default=None, help="at most this many images")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the tokenizer's training size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lpips", default="vgg", help="vgg (standard; needs its weights), a local weights path, random, or none")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("encode", help="encode a dataset into token shards for stage 2")
    p.add_argument("--tokenizer", required=True, help="tokenizer export folder")
    p.add_argument("--data", required=True, help="image folder or builtin:mnist|photos|textures")
    p.add_argument("--out", required=True, help="token shard folder")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the tokenizer's training size)")
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--flip", action="store_true", help="also encode mirrored images (augmentation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train-prior", help="stage 2: train a GPT prior on token shards; RUN/export/ is the prior")
    _add_config_args(p)
    p.add_argument("--tokens", required=True, help="token shard folder from `vqgpt encode`")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer export: decodes periodic sample grids and writes RUN/pipeline/")
    p.set_defaults(func=cmd_train_prior)

    p = sub.add_parser("sample", help="sample images from a pipeline (larger sizes use sliding windows)")
    _add_pipeline_args(p)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--height", type=int, default=None, help="pixels (default: trained size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: trained size)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_sample)

    fid_help = ("FID network: a local Inception .pth (torch-fidelity / pytorch-fid weights), default downloads it; "
                "random[:SEED] gives figures comparable only with each other")
    p = sub.add_parser("eval-tokenizer", help="PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--images", required=True, help="image folder or builtin:* (eval split)")
    p.add_argument("--fid-weights", default=None, help=fid_help + "; none skips rFID")
    p.add_argument("--lpips", default="vgg", help="vgg, a local weights path, random, or none")
    p.add_argument("--num", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="also keep reconstructions, grid and metrics.json here")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_tokenizer)

    p = sub.add_parser("eval-prior", help="FID, IS, precision, recall of samples (+ class accuracy on MNIST)")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--reference", required=True, help="image source or a stats .npz from `vqgpt fid-stats`")
    p.add_argument("--num", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=64)
    _add_sampling_knobs(p)
    p.add_argument("--fid-weights", default=None, help=fid_help)
    p.add_argument("--split", default="train", choices=["train", "eval"], help="split of an image-source reference")
    p.add_argument("--classifier", default=None, help="MNIST classifier file (default: cached / trained once)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_prior)

    p = sub.add_parser("fid-stats", help="reference statistics (mu, sigma, features) of an image source, once")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--fid-weights", default=None, help=fid_help)
    p.add_argument("--resolution", type=int, default=32, help="must match the tokenizer's image size")
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--num", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser("import", help="convert taming-transformers / LlamaGen checkpoints into vqgpt exports")
    isub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    q = isub.add_parser("taming", help="a taming VQGAN (last.ckpt + its model.yaml) -> a tokenizer export")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--config", required=True, help="the checkpoint's model YAML")
    q.add_argument("--out", required=True)
    q.add_argument("--weights", default=None, help="entry of the checkpoint holding the weights (default: state_dict)")
    q.set_defaults(func=cmd_import)
    q = isub.add_parser("llamagen-vq", help="a LlamaGen VQ tokenizer (.pt) -> a tokenizer export")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--preset", default=None, help="VQ-16 or VQ-8 (a cross-check; shapes are read from the weights)")
    q.add_argument("--image-size", type=int, default=None)
    q.add_argument("--weights", default=None, help="ema or model (default: ema when present)")
    q.set_defaults(func=cmd_import)
    q = isub.add_parser("llamagen-gpt", help="a LlamaGen class-to-image GPT (.pt) + an imported tokenizer -> a pipeline")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--tokenizer", required=True, help="the imported LlamaGen tokenizer export")
    q.add_argument("--out", required=True, help="pipeline folder (tokenizer/ + prior/)")
    q.add_argument("--preset", default="GPT-B", help="GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-3B")
    q.add_argument("--image-size", type=int, default=None)
    q.add_argument("--num-classes", type=int, default=None)
    q.add_argument("--classes", default=None, help="text file with one class name per line")
    q.add_argument("--weights", default=None, help="model or ema")
    q.set_defaults(func=cmd_import)

    p = sub.add_parser("config-reference", help="print every config key with its type, default and meaning")
    p.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("complete", help="complete an image from its first code rows, or extend it right / down")
    _add_pipeline_args(p)
    p.add_argument("--image", required=True, help="input image (fitted to the prior's trained size)")
    p.add_argument("--keep-rows", type=int, default=None, help="code rows of the image to keep (default: all)")
    p.add_argument("--extend-right", type=int, default=0, help="code columns to add on the right")
    p.add_argument("--extend-down", type=int, default=0, help="code rows to add below")
    p.add_argument("--num", type=int, default=4)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("demo", help="the whole workflow on built-in MNIST digits, on a CPU")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a 1-2 minute version")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from vqgpt.config import ConfigError
    from vqgpt.training import NonFiniteLoss

    try:
        return int(args.func(args) or 0)
    except NonFiniteLoss as exc:
        if os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
