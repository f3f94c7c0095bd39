"""The workflow joined in one place: a prior trained on a tokenizer's codes becomes a pipeline folder.

`vqgpt train-prior --tokenizer` and `vqgpt demo` both call `train_prior_with_tokenizer`, so the
tokenizer's decoder (for the sample grids), its fingerprint (checked against the token shards and
recorded in the prior) and the pipeline folder are wired the same way in both. A resume without the
tokenizer at hand refreshes the run's pipeline folder through `refresh_run_pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from accelerate import PartialState

from stage1_vq.model import VQModel
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import export_fingerprint
from vqgpt.ground.tokens import META_FILE, TokenShardError, read_meta
from vqgpt.training.shares import on_main_process
from vqgpt.workflow.pipeline import VQGPTPipeline, tokenizer_code_groups

T = TypeVar("T")


def _on_main_process(work: Callable[[], T]) -> T:
    """``work()`` on the main process only; every process returns its result once it is done (or raises what
    it raised). Under accelerate launch the others would otherwise go on to read a folder not yet written."""
    return on_main_process(PartialState(), work)


def train_prior_with_tokenizer(cfg: PriorRunConfig, out: str | Path, tokenizer_dir: str | Path,
                               resume: str | None = None, overwrite: bool = False,
                               pipeline_dir: str | Path | None = None) -> Path:
    """Train a prior on ``cfg.tokens`` into RUN=``out`` with the tokenizer that made the shards, then write
    the pipeline folder (tokenizer/ + prior/; default RUN/pipeline/) and return it."""
    tokenizer = VQModel.from_pretrained(tokenizer_dir).eval()
    meta = read_meta(cfg.tokens)  # before any step: a vocabulary mismatch would surface at the first sample grid
    if meta["codebook_size"] != tokenizer.codebook_size:
        raise TokenShardError(f"{Path(cfg.tokens) / META_FILE}: the shards' codebook_size is "
                              f"{meta['codebook_size']!r}, "
                              f"but the tokenizer {tokenizer_dir} has {tokenizer.codebook_size} codes: encode with "
                              "this tokenizer, or give the one that made the shards")
    prior_dir = train_prior(cfg, out, resume=resume, decode=tokenizer.decode,
                            tokenizer_fingerprint=export_fingerprint(tokenizer_dir), overwrite=overwrite,
                            tokenizer_dir=tokenizer_dir, code_groups=tokenizer_code_groups(tokenizer))
    pipeline_dir = Path(out) / "pipeline" if pipeline_dir is None else Path(pipeline_dir)
    # one process writes it; the others return when it is whole
    return _on_main_process(lambda: VQGPTPipeline.from_parts(tokenizer_dir, prior_dir).save_pretrained(pipeline_dir))


def refresh_run_pipeline(run_dir: str | Path, prior_dir: str | Path) -> Path | None:
    """Put the prior export ``prior_dir`` into RUN/pipeline/ beside the tokenizer an earlier session of the
    run wrote there (a resume without --tokenizer), so that the pipeline is not left with an older prior;
    returns the folder, or None when RUN holds no pipeline."""
    pipeline_dir = Path(run_dir) / "pipeline"

    def refresh() -> Path | None:
        if not (pipeline_dir / "tokenizer").is_dir():
            return None
        # from_parts checks the fingerprint: the new prior must have been trained on this tokenizer's codes
        return VQGPTPipeline.from_parts(pipeline_dir / "tokenizer", prior_dir).save_pretrained(pipeline_dir)

    return _on_main_process(refresh)
