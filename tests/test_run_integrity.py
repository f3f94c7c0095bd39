"""Run folders never lose, mix or silently corrupt work: a finished run is not replaced without
--overwrite, a forged checkpoint runs no code, two runs cannot share a folder, a resume refuses a
changed architecture before touching anything, and metrics list each step once after a resume."""

import fcntl
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_check import make_token_shards
from stage1_vq.train import TokenizerRunConfig, train_tokenizer
from stage2_prior.model import GPT
from stage2_prior.train import PriorRunConfig, train_prior
from vqgpt.ground.checkpoint import CheckpointError, check_checkpoint, list_checkpoints
from vqgpt.cli import main
from vqgpt.ground.config import ConfigError, load_config
from vqgpt.training import RESUMABLE_KEYS, RunFolderError, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
# EMA on, so that the checkpoint holds accelerate's custom_checkpoint_0.pkl (loaded with weights_only=False)
RUN = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.log_every=1",
       "train.batch_size=8", "train.warmup_steps=2", "train.ema_decay=0.9"]


def prior_config(tokens: Path, *overrides: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, ROOT / "configs/prior/tiny.yaml", [*RUN, *overrides, f"tokens={tokens}"])


def read_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_shards(tmp_path_factory.mktemp("integrity") / "tokens")


@pytest.fixture(scope="module")
def finished(tokens, tmp_path_factory) -> Path:
    """A finished 4-step prior run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train_prior(prior_config(tokens), run)
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run that a test may change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


# ----------------------------------------------------------------------------- re-runs and --overwrite


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(run, tokens):
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoints, export, metrics.jsonl\): "
                                             r"pass --resume auto to continue it, --overwrite to replace it"):
        train_prior(prior_config(tokens, "train.steps=2"), run)
    assert snapshot(run) == before


def test_overwrite_removes_the_old_run_first(run, tokens):
    old_export = (run / "export/model.safetensors").read_bytes()
    train_prior(prior_config(tokens, "train.steps=3", "train.checkpoint_every=0", "train.ema_decay=0"), run,
                overwrite=True)
    # the old step-2/4 checkpoints are gone: retention can no longer keep them over the new run's own
    assert [step for step, _ in list_checkpoints(run)] == [3]
    assert read_steps(run) == [1, 2, 3]
    assert (run / "export/model.safetensors").read_bytes() != old_export
    assert not (run / ".replaced").exists()  # the replaced run is gone once the new one started
    with pytest.raises(RunFolderError, match="exclude each other"):
        train_prior(prior_config(tokens), run, resume="auto", overwrite=True)


def test_a_deletion_of_the_replaced_run_cut_short_is_finished_by_the_next_command(run, tokens, monkeypatch):
    """The replaced run was deleted in place: a kill part-way left a half-deleted .replaced (checkpoints
    without their files), which the next command called a whole run and advised moving back."""
    import vqgpt.training.run_folder as run_folder

    removed = []
    real = run_folder._remove
    monkeypatch.setattr(run_folder, "_remove", lambda path: removed.append(path.name) or real(path))
    train_prior(prior_config(tokens, "train.steps=3", "train.checkpoint_every=0", "train.ema_decay=0"), run,
                overwrite=True)
    assert removed == [".replaced-removing"]  # renamed in one step, then deleted
    monkeypatch.undo()
    # killed part-way through that deletion: what is left goes at the next command, which goes ahead
    half = run / ".replaced-removing" / "checkpoints" / "step-00000004"
    half.mkdir(parents=True)
    (half / "COMPLETE").write_text("")
    before = {k: v for k, v in snapshot(run).items() if not k.startswith(".replaced-removing")}
    train_prior(prior_config(tokens, "train.steps=3", "train.checkpoint_every=0", "train.ema_decay=0"), run,
                resume="auto")
    assert not (run / ".replaced-removing").exists() and snapshot(run) == before


def test_overwrite_whose_setup_fails_or_is_stopped_keeps_the_old_run(run, tokens, tmp_path, monkeypatch):
    """--overwrite deleted the old run before the new one's own checks: a batch larger than the data, a
    source that does not exist, a tracker that does not start, or a Ctrl-C then cost the old run."""
    import stage2_prior.train as prior_train

    before = snapshot(run)
    with pytest.raises(ConfigError, match="larger than the"):
        train_prior(prior_config(tokens, "train.batch_size=4096"), run, overwrite=True)
    assert snapshot(run) == before and not (run / ".replaced").exists()
    with pytest.raises(FileNotFoundError, match="image source not found"):
        train_tokenizer(load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                                    [f"data.source={tmp_path / 'typo'}"]), run, overwrite=True)
    assert snapshot(run) == before

    def no_tracker(*args, **kwargs):  # (wandb without a login, say; a Ctrl-C takes the same way out)
        raise RuntimeError("the tracker did not start")
    monkeypatch.setattr(prior_train, "start_trackers", no_tracker)
    with pytest.raises(RuntimeError, match="the tracker did not start"):
        train_prior(prior_config(tokens, "train.steps=3"), run, overwrite=True)
    assert snapshot(run) == before
    monkeypatch.undo()
    train_prior(prior_config(tokens), run, resume="auto")  # the old run is whole: it resumes (finished)
    # killed (no way to put it back) between the move aside and the start: the next command says where it is
    aside = run / ".replaced"
    aside.mkdir()
    for entry in [p for p in run.iterdir() if p.name not in (".lock", ".replaced")]:
        entry.rename(aside / entry.name)
    for resume in ("auto", None):
        with pytest.raises(RunFolderError, match=r"\.replaced holds the run that an --overwrite was replacing .* "
                                                 r"move its contents back"):
            train_prior(prior_config(tokens), run, resume=resume)
    assert {str(Path(".replaced") / name) for name in before} == {k for k in snapshot(run) if k != "config.yaml"}


def test_resume_auto_starts_afresh_only_where_nothing_would_be_lost(tokens, tmp_path):
    fresh = tmp_path / "new" / "run"
    train_prior(prior_config(tokens, "train.steps=2", "train.checkpoint_every=0"), fresh, resume="auto")
    assert read_steps(fresh) == [1, 2]
    # killed before its first checkpoint: config and a few metric lines, which the fresh start replaces
    shutil.rmtree(fresh / "checkpoints")
    shutil.rmtree(fresh / "export")
    train_prior(prior_config(tokens, "train.steps=3", "train.checkpoint_every=0"), fresh, resume="auto")
    assert read_steps(fresh) == [1, 2, 3]
    # an export without any checkpoint is a finished run whose state was removed: not started over silently
    shutil.rmtree(fresh / "checkpoints")
    with pytest.raises(RunFolderError, match=r"holds export but no complete checkpoint to resume from: "
                                             r"pass --overwrite"):
        train_prior(prior_config(tokens), fresh, resume="auto")


def test_resume_from_an_older_checkpoint_does_not_mix_with_later_ones(run, tokens, capsys):
    before = snapshot(run)
    older = run / "checkpoints/step-00000002"
    with pytest.raises(RunFolderError, match=r"also holds later checkpoints \(step-00000004\)"):
        train_prior(prior_config(tokens), run, resume=str(older))
    assert snapshot(run) == before
    # a longer schedule is said only of a resume that goes ahead
    longer = run.parent / "longer"
    train_prior(prior_config(tokens, "train.steps=6", "train.checkpoint_every=3"), longer)
    capsys.readouterr()
    with pytest.raises(RunFolderError, match=r"also holds later checkpoints"):
        train_prior(prior_config(tokens, "train.steps=12"), longer, resume=str(longer / "checkpoints/step-00000003"))
    assert "LR schedule" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- a forged checkpoint


class WritesMarker:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, zipped: bool) -> None:
    """Replace ``path`` with a pickle that creates ``marker`` when loaded (torch's zip format or a bare pickle)."""
    path.unlink()
    if zipped:
        torch.save({"state": WritesMarker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "bare-pickle"])
def test_a_malicious_file_in_any_place_of_the_checkpoint_never_runs(finished, tokens, tmp_path, zipped):
    names = sorted(p.name for p in (finished / "checkpoints/step-00000004").iterdir())
    assert "custom_checkpoint_0.pkl" in names and "random_states_0.pkl" in names  # EMA and RNG state covered
    for name in [*names, "extra.pkl"]:  # each file in turn, then one added beside them
        run = Path(shutil.copytree(finished, tmp_path / name / "run"))
        ckpt = run / "checkpoints/step-00000004"
        marker = tmp_path / name / "marker"
        if name == "extra.pkl":
            (ckpt / name).touch()
        plant(ckpt / name, marker, zipped)
        config_before = (run / "config.yaml").read_bytes()
        for resume in ("auto", str(ckpt)):
            with pytest.raises(CheckpointError, match=rf"{ckpt / name}: .*nothing from it was run"):
                train_prior(prior_config(tokens), run, resume=resume)
        assert not marker.exists(), f"{name}: the planted pickle ran"
        assert (run / "config.yaml").read_bytes() == config_before


def test_sharded_state_is_checked_too(tmp_path):
    """FSDP's sharded state (torch.distributed.checkpoint) pickles its index and every non-tensor entry."""
    import warnings

    import torch.distributed.checkpoint as dcp

    def sharded_checkpoint(name: str, extra: object) -> Path:
        ckpt = tmp_path / name
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text('{"step": 1}\n')
        (ckpt / "COMPLETE").write_text("1\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no process group: DCP says it saves as one process
            dcp.save({"weight": torch.ones(3), "param_groups": {"lr": 0.1, "extra": extra}},
                     checkpoint_id=ckpt / "pytorch_model_fsdp_0")
        return ckpt

    assert check_checkpoint(sharded_checkpoint("good", [0.9, 0.95])) == 1
    marker = tmp_path / "marker"
    bad = sharded_checkpoint("entry", WritesMarker(marker))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: .*\(entry 'param_groups.extra'\)"):
        check_checkpoint(bad)
    index = sharded_checkpoint("index", 0.5) / "pytorch_model_fsdp_0/.metadata"
    index.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))
    with pytest.raises(CheckpointError, match=r"\.metadata: not a safe sharded-state index"):
        check_checkpoint(index.parent.parent)
    assert not marker.exists()


# ----------------------------------------------------------------------------- one run per folder


def test_a_second_run_into_a_folder_in_use_fails_at_once_naming_the_holder(tokens, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Another process holds the folder, as a run would: an flock on RUN/.lock, its PID and host inside.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, socket, sys, time\n"
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode())\n"
         "print('locked', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (None, "auto"):
            with pytest.raises(RunFolderError, match=rf"{run} is in use by pid {holder.pid} on "
                                                     rf"{socket.gethostname()}"):
                train_prior(prior_config(tokens), run, resume=resume)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the OS dropped the dead holder's lock: the folder is free
    train_prior(prior_config(tokens, "train.steps=1", "train.checkpoint_every=0"), run)
    # and a run holds it while training: the lock is taken by a second descriptor only after it ended
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_run_that_fails_releases_the_folder(run, tokens, monkeypatch):
    """A run that raises mid-way must not keep the lock in a long-lived process (notebook, demo, tests)."""
    import stage2_prior.train as prior_train

    def broken(logits, tokens):
        raise RuntimeError("boom")
    monkeypatch.setattr(prior_train, "next_token_loss", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train_prior(prior_config(tokens, "train.steps=5"), run, resume="auto")
    monkeypatch.undo()
    train_prior(prior_config(tokens, "train.steps=5"), run, resume="auto")
    assert read_steps(run) == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- resume with a changed config


def test_resume_with_a_changed_architecture_is_refused_before_anything_changes(run, tokens):
    before = snapshot(run)
    # (the run's config as the checkpoint records it)
    with pytest.raises(ConfigError, match=r"changes model.dim: 64 -> 96; train.lr: 0.003 -> 0.001 \(run config "
                                          rf"{run / 'checkpoints' / 'step-00000004' / 'manifest.json'}\)"):
        train_prior(prior_config(tokens, "model.dim=96", "train.lr=1e-3", "train.steps=6"), run, resume="auto")
    assert snapshot(run) == before  # config.yaml is not rewritten


def test_resume_may_change_the_documented_keys(run, tokens):
    assert {"train.steps", "train.log_every", "train.checkpoint_every", "sample_cfg_scale"} <= set(RESUMABLE_KEYS)
    train_prior(prior_config(tokens, "train.steps=6", "train.log_every=2", "train.checkpoint_every=0",
                             "sample_cfg_scale=3.0"), run, resume="auto")
    assert read_steps(run) == [1, 2, 3, 4, 6]
    assert "steps: 6" in (run / "config.yaml").read_text()
    assert GPT.from_pretrained(run / "export").config.dim == 64


def test_readme_lists_the_keys_a_resume_may_change():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What a run folder holds"):]
    section = section[:section.index("\n## ")]
    listed = section[section.index("which may change on"):]
    assert sorted(key for key in RESUMABLE_KEYS if f"`{key}`" in listed) == sorted(RESUMABLE_KEYS)


# ----------------------------------------------------------------------------- metrics after a kill


def test_metrics_hold_each_step_once_after_a_kill_and_resume(run, tokens):
    # killed after logging step 4 (half of a fifth line written) but before step 4's checkpoint
    shutil.rmtree(run / "checkpoints/step-00000004")
    shutil.rmtree(run / "export")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    train_prior(prior_config(tokens, "train.steps=5"), run, resume="auto")
    assert read_steps(run) == [1, 2, 3, 4, 5]


def test_truncate_metrics_keeps_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"note": "x"}\n{"step": 3}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"note": "x"}\n'
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


# ----------------------------------------------------------------------------- the tokenizer and the CLI


def test_tokenizer_run_folder_is_guarded_the_same_way(tmp_path):
    def config(*overrides: str) -> TokenizerRunConfig:
        return load_config(TokenizerRunConfig, ROOT / "configs/tokenizer/tiny.yaml",
                           ["train.steps=1", "train.batch_size=4", "train.ema_decay=0.9", "train.log_every=1",
                            *overrides])

    run = tmp_path / "run"
    train_tokenizer(config(), run)
    with pytest.raises(RunFolderError, match="already holds a run"):
        train_tokenizer(config(), run)
    with pytest.raises(ConfigError, match=r"changes model.z_channels: 32 -> 16"):
        train_tokenizer(config("model.z_channels=16"), run, resume="auto")
    marker = tmp_path / "marker"
    plant(run / "checkpoints/step-00000001/custom_checkpoint_0.pkl", marker, zipped=True)
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl"):
        train_tokenizer(config("train.steps=2"), run, resume="auto")
    assert not marker.exists()
    train_tokenizer(config("train.steps=2"), run, overwrite=True)
    assert [step for step, _ in list_checkpoints(run)] == [2]


def test_cli_names_the_way_out(run, tokens, capsys):
    base = ["train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tokens),
            "--out", str(run), *[arg for item in RUN for arg in ("--set", item)]]
    assert main(base) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {run} already holds a run")
    assert main([*base, "--resume", "auto", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--set", "train.steps=1", "--set", "train.checkpoint_every=0"]) == 0
    assert read_steps(run) == [1]


@pytest.mark.slow
def test_under_accelerate_launch_every_rank_stops_when_the_folder_is_in_use(tokens, tmp_path):
    """Only the main process locks; the other ranks learn its verdict instead of waiting in a collective."""
    from test_distributed import launch_command, subprocess_env

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on elsewhere")
    try:
        proc = subprocess.run([*launch_command(2), "-m", "vqgpt", "train-prior", "--config",
                               str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(tokens), "--out", str(run)],
                              env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        os.close(fd)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert f"error: {run} is in use by pid 4242 on elsewhere" in log, log[-3000:]
    assert f"error: main process: {run} is in use by pid 4242 on elsewhere" in log, log[-3000:]


def test_without_flock_a_run_goes_on_with_a_warning(tmp_path, monkeypatch):
    """A platform without fcntl (Windows) runs unguarded, saying so, rather than not at all."""
    from vqgpt.training.run_folder import RunLock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError
    lock = RunLock(tmp_path)
    with pytest.warns(UserWarning, match="no file locking on this platform; do not start two runs"):
        lock.acquire()
    lock.release()


def test_a_refused_start_leaves_no_folder_behind(run, tokens, tmp_path):
    """A start refused before it wrote anything (here: --resume of another run's checkpoint under another
    architecture) left the new --out folder, and any parents it made, holding only the lock file."""
    checkpoint = max(list_checkpoints(run))[1]
    new = tmp_path / "made" / "for" / "it"
    with pytest.raises(ConfigError, match="model.n_layer"):
        train_prior(prior_config(tokens, "model.n_layer=3"), new, resume=str(checkpoint))
    assert not (tmp_path / "made").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before is left, as is a parent that was
    with pytest.raises(ConfigError, match="model.n_layer"):
        train_prior(prior_config(tokens, "model.n_layer=3"), tmp_path / "mine" / "run", resume=str(checkpoint))
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "run").exists()
    with pytest.raises(ConfigError, match="model.n_layer"):
        train_prior(prior_config(tokens, "model.n_layer=3"), tmp_path / "mine", resume=str(checkpoint))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [".lock"]


def test_a_start_refused_as_in_use_leaves_the_holders_folder_and_lock(tokens, tmp_path, monkeypatch):
    """Two starts into one new --out: the one refused as 'in use' removed the folder the other had just made
    and locked, lock file and all, so that a third start could lock it too."""
    from vqgpt.training.run_folder import RunLock

    new = tmp_path / "new" / "run"
    other, acquire = RunLock(new), RunLock.acquire

    def the_other_first(self):  # the other start locks between this one's look at the folder and its lock
        if self is not other:
            acquire(other)
        acquire(self)

    monkeypatch.setattr(RunLock, "acquire", the_other_first)
    with pytest.raises(RunFolderError, match="is in use by pid"):
        train_prior(prior_config(tokens), new)
    monkeypatch.setattr(RunLock, "acquire", acquire)
    try:
        assert (new / ".lock").is_file()
        with pytest.raises(RunFolderError, match="is in use by pid"):
            RunLock(new).acquire()
    finally:
        other.release()


def test_a_refused_start_into_a_dotted_out_leaves_nothing(run, tokens, tmp_path, monkeypatch):
    checkpoint = max(list_checkpoints(run))[1]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ConfigError, match="model.n_layer"):
        train_prior(prior_config(tokens, "model.n_layer=3"), Path("a/../b"), resume=str(checkpoint))
    assert list((tmp_path / "here").iterdir()) == []


_LOCK_CHURN = '''
import os, sys, time
from pathlib import Path
from vqgpt.ground.files import hold_lock

class Busy(Exception):
    pass

path, errors, got = Path(sys.argv[1]) / "folder" / ".lock", 0, 0
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        fd = hold_lock(path, Busy, "no flock")
    except Busy:
        continue
    except OSError as exc:
        errors += 1
        print(type(exc).__name__, exc, file=sys.stderr)
        continue
    got += 1
    path.unlink()  # as a finishing shard run and a refused start do: lock file and folder go, lock held
    try:
        path.parent.rmdir()
    except OSError:  # another one just made its lock file there
        pass
    os.close(fd)
print(got, errors)
'''


def test_the_lock_holds_up_while_holders_remove_it(tmp_path):
    """Holders that delete the lock file and its folder when done (vqgpt shard, a refused start): the others
    got FileNotFoundError / FileExistsError from the gap between mkdir, open and flock, not the lock."""
    script = tmp_path / "churn.py"
    script.write_text(_LOCK_CHURN)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in results]
    counts = [tuple(map(int, out.split())) for out, _ in results]
    assert sum(errors for _, errors in counts) == 0, [err[-2000:] for _, err in results]
    assert sum(got for got, _ in counts) > 20


def test_a_file_where_the_lock_folder_goes_is_named_at_once(tmp_path):
    """hold_lock retried a file standing where the lock's folder goes as if a holder were removing the folder,
    then said the lock file was 'deleted and made again as fast as it is opened'."""
    from vqgpt.ground.files import hold_lock

    (tmp_path / ".partial").write_text("not a folder")
    with pytest.raises(FileExistsError):
        hold_lock(tmp_path / ".partial" / ".lock", RuntimeError, "no flock")
