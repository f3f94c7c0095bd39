"""The workflow joined in one place: a prior trained on a tokenizer's codes becomes a pipeline folder.

`vqgpt train-prior --tokenizer` and `vqgpt demo` both call `train_prior_with_tokenizer`, so the
tokenizer's decoder (for the sample grids), its fingerprint (checked against the token shards and
recorded in the prior) and the pipeline folder are wired the same way in both.
"""

from __future__ import annotations

from pathlib import Path

from stage1_vq.model import VQModel
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import export_fingerprint
from vqgpt.workflow.pipeline import VQGPTPipeline


def train_prior_with_tokenizer(cfg: PriorRunConfig, out: str | Path, tokenizer_dir: str | Path,
                               resume: str | None = None, overwrite: bool = False,
                               pipeline_dir: str | Path | None = None) -> Path:
    """Train a prior on ``cfg.tokens`` into RUN=``out`` with the tokenizer that made the shards, then write
    the pipeline folder (tokenizer/ + prior/; default RUN/pipeline/) and return it."""
    tokenizer = VQModel.from_pretrained(tokenizer_dir).eval()
    prior_dir = train_prior(cfg, out, resume=resume, decode=tokenizer.decode,
                            tokenizer_fingerprint=export_fingerprint(tokenizer_dir), overwrite=overwrite)
    pipeline_dir = Path(out) / "pipeline" if pipeline_dir is None else Path(pipeline_dir)
    return VQGPTPipeline.from_parts(tokenizer_dir, prior_dir).save_pretrained(pipeline_dir)
