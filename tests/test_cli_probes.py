"""Clumsy-user probes replayed through the CLI (`python -m vqgpt`, subprocesses): each ends in one
clear line on stderr naming the culprit, and leaves every file the user had as it was.

Flag and file mistakes are reported before torch is imported (well under a second each); the few
probes that must load models are grouped into single runs.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgpt.cli.commands import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
NUMERIC_CLASSES = [str(i) for i in range(1, 13)]  # folders 1..12: sorted as text 1, 10, 11, 12, 2, ...


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's folder: a tokenizer, pipelines (one with classes 1..12), a prior without a fingerprint, images."""
    from test_pipeline import tiny_prior, tiny_tokenizer

    from vqgpt.ground.data import DataConfig, build_dataset
    from vqgpt.workflow.pipeline import VQGPTPipeline

    root = tmp_path_factory.mktemp("user")
    for name in NUMERIC_CLASSES:
        (root / "digits" / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (10 * int(name), 0, 0)).save(root / "digits" / name / "a.png")
    classes = build_dataset(DataConfig(source=str(root / "digits"), resolution=16), "eval").classes
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "tok")
    VQGPTPipeline(tok, tiny_prior(tok.codebook_size, num_classes=len(classes)), classes=classes).save_pretrained(
        root / "pipe")
    tiny_prior(tok.codebook_size, num_classes=3).save_pretrained(root / "stranger_prior")  # no fingerprint, no names
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "photo.png")
    (root / "empty.png").write_bytes(b"")
    noise = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise).save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "whole.png").unlink()
    (root / "album").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root -> hash of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def vqgpt(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vqgpt", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_refused(proc: subprocess.CompletedProcess, *culprits: str) -> str:
    """Exit code 2, no traceback, and stderr's last line names every culprit; returns that line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    for culprit in culprits:
        assert culprit in last, last
    return last


def probe_argv(user: Path, name: str) -> tuple[list[str], tuple[str, ...]]:
    """Probes refused before any model is loaded: (argv, what the error line must name)."""
    pipe, out = str(user / "pipe"), str(user / "out.png")
    sample = ["sample", "--pipeline", pipe, "--class-label", "2"]
    complete = ["complete", "--pipeline", pipe, "--class-label", "2", "--keep-rows", "1"]
    return {
        "sample --num -3": ([*sample, "--num", "-3", "--out", out], ("--num", "-3")),
        "complete --num -3": ([*complete, "--image", str(user / "photo.png"), "--num", "-3", "--out", out],
                              ("--num", "-3")),
        "complete --image empty": ([*complete, "--image", str(user / "empty.png"), "--out", out],
                                   ("--image", "empty.png", "empty")),
        "complete --image truncated": ([*complete, "--image", str(user / "truncated.png"), "--out", out],
                                       ("--image", "truncated.png")),
        "complete --image folder": ([*complete, "--image", str(user / "album"), "--out", out],
                                    ("--image", "album", "folder")),
        "sample --cfg-scale -1": ([*sample, "--cfg-scale", "-1", "--out", out], ("--cfg-scale", "-1")),
        "sample --out no extension": ([*sample, "--out", str(user / "grid")], ("--out", "grid", ".png", ".jpg")),
        "sample --out .txt": ([*sample, "--out", str(user / "grid.txt")], ("--out", ".txt", ".png", ".jpg")),
        "sample --pipeline --prior": ([*sample, "--prior", str(user / "stranger_prior"), "--out", out],
                                      ("--pipeline", "--prior", "not both")),
        "complete --pipeline --tokenizer": ([*complete, "--tokenizer", str(user / "tok"), "--image",
                                             str(user / "photo.png"), "--out", out], ("--pipeline", "--tokenizer")),
        "sample --cfg-scale inf": ([*sample, "--cfg-scale", "inf", "--out", out], ("--cfg-scale", "inf", "finite")),
        "eval-prior --device bogus": (["eval-prior", "--pipeline", pipe, "--device", "bogus", "--num", "2"],
                                      ("--device", "bogus")),
    }[name]


FAST_PROBES = ["sample --num -3", "complete --num -3", "complete --image empty", "complete --image truncated",
               "complete --image folder", "sample --cfg-scale -1", "sample --out no extension", "sample --out .txt",
               "sample --pipeline --prior", "complete --pipeline --tokenizer", "sample --cfg-scale inf",
               "eval-prior --device bogus"]


@pytest.mark.parametrize("name", FAST_PROBES)
def test_flag_and_file_mistakes_are_one_clear_line(user, name):
    argv, culprits = probe_argv(user, name)
    before = snapshot(user)
    assert_refused(vqgpt(*argv), *culprits)
    assert snapshot(user) == before  # nothing changed, nothing written (no out.png, no grid/)


def test_a_folder_out_may_be_named_like_an_image(user, tmp_path):
    # said with a trailing slash (or already a folder): one PNG per sample, no complaint about --npz
    proc = vqgpt("sample", "--pipeline", str(user / "pipe"), "--class-label", "2", "--num", "2", "--out",
                 str(tmp_path / "g1.png") + "/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "g1.png").glob("*.png")) == ["000000.png", "000001.png"]


def test_missing_class_label_names_the_flag_and_a_stranger_prior_is_warned(user):
    before = snapshot(user)
    proc = vqgpt("sample", "--tokenizer", str(user / "tok"), "--prior", str(user / "stranger_prior"), "--num", "1",
                 "--out", str(user / "out.png"))
    assert_refused(proc, "class-conditional", "--class-label")
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning:"))
    assert "stranger_prior" in warning and "fingerprint" in warning
    assert snapshot(user) == before


def test_set_unknown_key_is_blamed_on_the_set_flag(user, tmp_path):
    before = snapshot(user)
    proc = vqgpt("train-prior", "--config", str(ROOT / "configs/prior/tiny.yaml"), "--tokens", str(user / "codes"),
                 "--out", str(tmp_path / "run"), "--set", "train.bogus=1")
    last = assert_refused(proc, "--set train.bogus=1", "train.bogus")
    assert "tiny.yaml" not in last
    assert not (tmp_path / "run").exists() and snapshot(user) == before


def test_reconstruct_accepts_one_image_file(user, tmp_path):
    import json

    before = snapshot(user)
    proc = vqgpt("reconstruct", "--tokenizer", str(user / "tok"), "--images", str(user / "photo.png"), "--out",
                 str(tmp_path / "rec"), "--lpips", "none", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout)
    assert metrics["num_images"] == 1 and metrics["images"] == str(user / "photo.png")
    assert json.loads((tmp_path / "rec" / "metrics.json").read_text())["images"] == str(user / "photo.png")
    assert [p.name for p in (tmp_path / "rec" / "images").iterdir()] == ["00000.png"]
    assert snapshot(user) == before


def test_numeric_class_names_through_the_cli(user, tmp_path):
    before = snapshot(user)
    # "0" is no class name and the names are numbers: an index must be written index:N
    proc = vqgpt("sample", "--pipeline", str(user / "pipe"), "--num", "1", "--class-label", "0", "--out",
                 str(tmp_path / "s.png"))
    assert_refused(proc, "--class-label 0", "index:0")
    assert not (tmp_path / "s.png").exists() and snapshot(user) == before
    # "13" is no class name, and as an index out of range too (12 classes): no advice to write index:13
    from vqgpt.workflow.pipeline import VQGPTPipeline

    with pytest.raises(ValueError, match="outside 0..11") as info:
        VQGPTPipeline.from_pretrained(user / "pipe").class_index("13")
    assert "index:13" not in str(info.value)


def test_numeric_class_names_pick_the_named_class(user, tmp_path, monkeypatch):
    from vqgpt.workflow.pipeline import VQGPTPipeline

    pipe = VQGPTPipeline.from_pretrained(user / "pipe")
    assert pipe.classes[:5] == ["1", "10", "11", "12", "2"]  # text order, as the folder scan gives
    assert pipe.class_index("2") == 4 and pipe.class_index("12") == 3  # a name wins over the same index
    assert pipe.class_index("index:2") == 2 and pipe.class_index(2) == 2  # explicit indices
    with pytest.raises(ValueError, match="index:0"):
        pipe.class_index("0")  # no class is named 0, and names are numbers: ambiguous
    with pytest.raises(ValueError, match="out of range"):
        pipe.class_index("index:12")
    seen = []
    original = VQGPTPipeline.generate

    def spy(self, num, class_labels=None, **kwargs):
        seen.append(class_labels)
        return original(self, num, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(VQGPTPipeline, "generate", spy)
    for label in ("2", "index:2", "10"):
        assert main(["sample", "--pipeline", str(user / "pipe"), "--num", "1", "--class-label", label,
                     "--out", str(tmp_path / "s.png")]) == 0
    assert seen == [4, 2, 1]
    # generate / complete read string labels by the same rule
    codes = pipe.labels_tensor(["2", "index:2", 7], 3)
    assert codes.tolist() == [4, 2, 7]


def test_sampling_flags_travel_as_one_sampling_config(user, tmp_path, monkeypatch):
    from stage2_prior.draw import CFG_SCHEDULES, SamplingConfig
    from vqgpt.cli.commands import CFG_SCHEDULE_CHOICES
    from vqgpt.workflow.pipeline import VQGPTPipeline

    assert CFG_SCHEDULE_CHOICES == CFG_SCHEDULES
    seen = []
    original = VQGPTPipeline.generate

    def spy(self, num, sampling=None, **kwargs):
        seen.append(sampling)
        return original(self, num, sampling=sampling, **kwargs)

    monkeypatch.setattr(VQGPTPipeline, "generate", spy)
    assert main(["sample", "--pipeline", str(user / "pipe"), "--num", "1", "--class-label", "2", "--temperature",
                 "0.5", "--top-k", "3", "--top-p", "0.9", "--cfg-schedule", "linear",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert seen == [SamplingConfig(temperature=0.5, top_k=3, top_p=0.9, cfg_schedule="linear")]
    for command in ("sample", "complete", "eval-prior"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--cfg-schedule", "cosine"])


def test_an_unconditional_prior_refuses_a_class_label_in_one_wording(user, tmp_path, capsys):
    from test_pipeline import tiny_prior

    from stage2_prior.model import UNCONDITIONAL
    from vqgpt.workflow.pipeline import VQGPTPipeline

    pipe = VQGPTPipeline.from_pretrained(user / "pipe")
    pipe = VQGPTPipeline(pipe.tokenizer, tiny_prior(pipe.tokenizer.codebook_size, num_classes=0))
    for label in (0, "cats", "index:0", [0]):
        with pytest.raises(ValueError) as err:
            pipe.labels_tensor(label, 1) if isinstance(label, list) else pipe.class_index(label)
        assert str(err.value) == UNCONDITIONAL
    pipe.save_pretrained(tmp_path / "uncond")
    assert main(["sample", "--pipeline", str(tmp_path / "uncond"), "--num", "1", "--out",
                 str(tmp_path / "s.png")]) == 0
    capsys.readouterr()
    assert main(["sample", "--pipeline", str(tmp_path / "uncond"), "--num", "1", "--class-label", "cats",
                 "--out", str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --class-label cats: {UNCONDITIONAL}"


def test_mnist_digit_names_stay_their_indices(user):
    from vqgpt.ground.data import DataConfig, build_dataset
    from vqgpt.workflow.pipeline import VQGPTPipeline

    from test_pipeline import tiny_prior

    names = build_dataset(DataConfig(source="builtin:mnist", resolution=32), "eval").classes
    tok = VQGPTPipeline.from_pretrained(user / "pipe").tokenizer
    pipe = VQGPTPipeline(tok, tiny_prior(tok.codebook_size, num_classes=10), classes=names)  # names looked up first
    assert [pipe.class_index(str(d)) for d in range(10)] == list(range(10))  # --class-label 3 is digit 3
    letters = VQGPTPipeline.from_pretrained(user / "pipe")
    letters.classes = [chr(ord("a") + i) for i in range(12)]
    assert letters.class_index("3") == 3  # names are not numbers: a bare number is an index


def test_index_n_is_always_index_n_and_only_ascii_digits_are_numbers(user):
    """A class folder named 'index:0' took `--class-label index:0`, which the README promises is index 0;
    '²' passed str.isdigit and then failed int() with Python's own message."""
    from vqgpt.workflow.pipeline import VQGPTPipeline

    pipe = VQGPTPipeline.from_pretrained(user / "pipe")
    pipe.classes = ["apple", "index:0", "²", "٣"] + [f"c{i}" for i in range(8)]
    assert pipe.class_index("index:0") == 0 and pipe.class_index("index:1") == 1
    assert pipe.class_index("²") == 2 and pipe.class_index("٣") == 3  # names, looked up as names
    for label in ("³", "--3", "index:²"):
        with pytest.raises(ValueError) as err:
            pipe.class_index(label)
        assert "invalid literal" not in str(err.value), str(err.value)
    # a folder name in decomposed Unicode (as macOS writes it) is found by the composed name a user types
    pipe.classes[4] = "u\u0308ber"
    assert pipe.class_index("\u00fcber") == 4 and pipe.class_index("u\u0308ber") == 4


def test_every_flag_has_a_help_text():
    missing = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "vqgpt")
    assert not missing, f"flags without help: {missing}"


def test_set_values_that_yaml_reads_otherwise(tmp_path):
    from stage1_vq.train import TokenizerRunConfig
    from vqgpt.ground.config import ConfigError, load_config

    config = ROOT / "configs/tokenizer/tiny.yaml"
    for value in ("2024", "2024-01-01", "*.png", "@raw", "[a"):  # a folder name, whatever YAML makes of it
        assert load_config(TokenizerRunConfig, config, [f"data.source={value}"]).data.source == value
    with pytest.raises(ConfigError, match=r"^--set data.source=yes: .*expected a string, got True \(quote it"):
        load_config(TokenizerRunConfig, config, ["data.source=yes"])
    with pytest.raises(ConfigError, match=r"^--set model.channel_mult=\[1,2: .*expected a list"):
        load_config(TokenizerRunConfig, config, ["model.channel_mult=[1,2"])
    # a section's own check is blamed on the --set that set the field, not on the file
    with pytest.raises(ConfigError, match=r"^--set model.channels=-8: model: channels must be positive"):
        load_config(TokenizerRunConfig, config, ["model.channels=-8"])
    for override, culprit in [("train.lr=-1", "train.lr"), ("train.beta2=1.0", "train.beta2"),
                              ("train.ema_decay=1", "train.ema_decay"), ("model.quantizer.beta=-1", "beta"),
                              ("model.in_channels=1", "model.in_channels")]:
        with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: .*{culprit}"):
            load_config(TokenizerRunConfig, config, [override])


def test_config_errors_name_their_source(tmp_path):
    from stage2_prior.train import PriorRunConfig
    from vqgpt.ground.config import ConfigError, load_config

    config = ROOT / "configs/prior/tiny.yaml"
    with pytest.raises(ConfigError, match=r"^--set train\.lr=fast: train\.lr: expected a number"):
        load_config(PriorRunConfig, config, ["train.batch_size=4", "train.lr=fast"])
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(config.read_text() + "\nextra_section: 1\n")
    with pytest.raises(ConfigError, match=r"^\S*bad\.yaml: unknown config key 'extra_section'"):
        load_config(PriorRunConfig, bad_file, ["train.batch_size=4"])


def test_exit_codes(monkeypatch, capsys):
    from vqgpt.cli import commands as cli
    from vqgpt.training import NonFiniteLoss

    def raises(exc):
        def command(args):
            raise exc
        return command

    monkeypatch.setattr(cli, "cmd_config_reference", raises(NonFiniteLoss("loss is nan at step 3")))
    assert main(["config-reference"]) == 3
    monkeypatch.setattr(cli, "cmd_config_reference", raises(ValueError("bad value")))
    assert main(["config-reference"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: bad value"
    monkeypatch.setattr(cli, "cmd_config_reference", raises(NotADirectoryError("image source is a file")))
    assert main(["config-reference"]) == 2  # a file where a folder belongs is the user's to fix
    monkeypatch.setattr(cli, "cmd_config_reference", raises(KeyError("a bug")))
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(["config-reference"])


def test_one_process_commands_refuse_a_launch_before_any_work(tmp_path, monkeypatch, capsys):
    """`vqgpt shard` under accelerate launch: rank 1 found rank 0's lock, blamed 'another vqgpt shard' and the
    launcher killed rank 0 part-way; import, index and app likewise ran once per process."""
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "0.png")
    commands = [["shard", str(tmp_path / "images"), str(tmp_path / "shards"), "--per-shard", "10"],
                ["index", str(tmp_path / "images")],
                ["import", "llamagen-vq", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "tok")],
                ["app", "--pipeline", str(tmp_path / "missing")]]
    work = {"shard": "writes the shards", "index": "builds the index", "import": "converts a checkpoint",
            "app": "serves the page"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in commands:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == (f"error: vqgpt {argv[0]} {work[argv[0]]} in one process: run it "
                                                   "without accelerate launch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["a"]  # no index written beside it
