"""Training driven from Python in one long-lived process (a notebook): a run leaves the caller's random
generators as it found them, and its progress bar is closed however it ends."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm

import stage2_prior.train as prior_train
from stage1_vq.train import train_tokenizer
from stage2_prior.train import train_prior
from test_hostile_runs import tokenizer_config
from test_run_integrity import prior_config, tokens  # noqa: F401 (fixture)


def _draws() -> tuple[float, float, float]:
    return torch.rand(1).item(), random.random(), float(np.random.rand())


def _seeded_draws(seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    return _draws()


@pytest.mark.parametrize("stage", ["tokenizer", "prior"])
def test_a_run_leaves_the_callers_random_generators_as_they_were(stage, tokens, tmp_path):
    # the run seeds every generator itself (train.seed 0): a notebook that seeded 1234, trained, then drew
    # got seed 0's draws whatever seed it chose
    expected = _seeded_draws(1234)
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    if stage == "tokenizer":
        train_tokenizer(tokenizer_config("train.steps=2"), tmp_path / "run")
    else:
        train_prior(prior_config(tokens, "train.steps=2"), tmp_path / "run")
    assert _draws() == expected


def test_a_run_that_raises_closes_its_bar_and_restores_the_generators(tokens, tmp_path, monkeypatch):
    calls = []

    def interrupted(logits, targets):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. from a callback, or a second Ctrl-C
        return real(logits, targets)

    real = prior_train.next_token_loss
    monkeypatch.setattr(prior_train, "next_token_loss", interrupted)
    expected = _seeded_draws(7)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with pytest.raises(KeyboardInterrupt) as caught:
        train_prior(prior_config(tokens, "train.steps=4"), tmp_path / "run")
    assert _draws() == expected
    # a notebook keeps the traceback (and with it the run's frames): the bar must be closed all the same,
    # or every later run's bar is drawn a row lower and the next print lands on its line
    assert caught.value.__traceback__ is not None
    assert not [bar for bar in tqdm._instances if getattr(bar, "desc", "") == "prior"]
