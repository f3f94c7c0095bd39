import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    readme_test_command = readme_line("pytest")
    assert readme_test_command in ci_lines, "README's test command is not a line of .ci/run"
    # and it is the first thing CI runs after setting up: nothing installs or runs before it
    first = next(l for l in ci_lines if l and not l.startswith(("#", "set ", "cd ", "export ", "rm -rf .venv")))
    assert first == readme_test_command, first


def test_readme_config_reference_is_current():
    from vqgpt.cli.commands import config_reference_text

    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert section == config_reference_text(), "README config reference is stale: run `vqgpt config-reference`"


def readme_line(word: str) -> str:
    """The README's one-line ``python3 -m venv ...`` command that contains ``word``."""
    found = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python3 -m venv") and word in line]
    assert len(found) == 1, f"expected one README command line with {word!r}, found {found}"
    return found[0]


def readme_command(word: str) -> list[str]:
    """The steps (split at ``&&``) of the README command line that contains ``word``."""
    return [step.strip() for step in readme_line(word).split("&&")]


def test_readme_demo_command_installs_and_runs_the_demo():
    """Each piece of the README's demo command exists: the tested command's pinned install, an install
    of this project, the `vqgpt` script that install puts beside Python, and its `demo --out` subcommand."""
    import importlib.metadata
    import shlex
    import subprocess
    import sys
    import sysconfig

    from vqgpt.cli.commands import build_parser, cmd_demo, main

    demo, tested = readme_command("vqgpt demo"), readme_command("pytest")
    # the same fresh venv and the same pinned torch / torchvision as the command CI runs
    assert demo[:3] == tested[:3]
    assert re.fullmatch(r"pip install -q torch==\S+ torchvision==\S+", demo[2]), demo[2]
    assert demo[3] == "pip install -q -e ." and tested[3] == 'pip install -q -e ".[test]"'
    # that install declares the `vqgpt` script as vqgpt.cli:main ...
    scripts = re.search(r"^\[project\.scripts\]\n((?:[^\[\n].*\n)*)", (ROOT / "pyproject.toml").read_text(), re.M)
    assert scripts and 'vqgpt = "vqgpt.cli:main"' in scripts.group(1).splitlines()
    (entry,) = [e for e in importlib.metadata.distribution("vqgpt").entry_points if e.name == "vqgpt"]
    assert entry.group == "console_scripts" and entry.load() is main
    # ... and the demo step is a `vqgpt demo` call that the parser routes to the demo
    program, *argv = shlex.split(demo[4])
    assert program == "vqgpt" and len(demo) == 5
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the README's `{demo[4]}` does not parse")
    assert args.func is cmd_demo and args.out == "runs/demo" and not args.quick
    # the installed script runs and knows the subcommand
    script = Path(sysconfig.get_path("scripts")) / "vqgpt"
    assert script.is_file(), f"{script}: no `vqgpt` script beside {sys.executable} (pip install -e . installs it)"
    shown = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--out" in shown.stdout and "--quick" in shown.stdout, shown.stderr[-2000:]


# Top-level folders of the checkout that are not part of the project (environments, build and run outputs).
NOT_PROJECT = {".git", ".venv", "venv", "build", "dist", "runs", "outputs", ".pytest_cache", "__pycache__"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP_LEVEL_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_]*\.md)\b")  # README.md, DESIGN.md, CONTRIBUTING.md, ...


def _project_dirs() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name not in NOT_PROJECT and not p.name.endswith(".egg-info"))


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def cited_paths(path: Path) -> list[tuple[str, Path, str]]:
    """(as written, resolved path, anchor) for each repository file that ``path`` links or names."""
    text = path.read_text()
    found = []
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same file
            file, _, anchor = target.partition("#")
            found.append((target, (path.parent / file).resolve(), anchor))
        text = LINK.sub(lambda m: m.group(0).split("](")[0] + "]", text)  # targets done: keep the link text
    # Paths written out in text or code spans: anything under a project folder, and top-level notes.
    repo_path = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*)" % "|".join(re.escape(d) for d in _project_dirs()))
    for written in repo_path.findall(text):
        written = written.rstrip(".")
        # A folder ("configs/accelerate/") or a file, not prose such as "tests/offline smoke runs".
        if written.endswith("/") or "." in written.rsplit("/", 1)[-1]:
            found.append((written, ROOT / written, ""))
    for written in TOP_LEVEL_DOC.findall(text):
        found.append((written, ROOT / written, ""))
    return found


def citing_files() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    code = [p for d in ("vqgpt", "stage1_vq", "stage2_prior", "benchmarks", "configs")
            for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts]
    return [*docs, *code]


def missing_citations(path: Path) -> list[str]:
    """What ``path`` links or names that does not exist (or a heading anchor its target lacks)."""
    missing = []
    for written, target, anchor in cited_paths(path):
        if not target.exists():
            missing.append(written)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
            missing.append(f"{written} (no such heading)")
    return missing


def test_every_file_the_readme_docs_and_code_cite_exists():
    files = citing_files()
    assert ROOT / "docs" / "architecture.md" in files
    missing = [f"{path.relative_to(ROOT)}: {written}" for path in files for written in missing_citations(path)]
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_citation_check_finds_links_paths_notes_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A real heading\n")
    note = tmp_path / "note.md"
    note.write_text("See [the notes](DESIGN.md), `configs/prior/tiny.yaml`, `configs/prior/nope.yaml`,\n"
                    "[a](docs/a.md#a-real-heading), [a](docs/a.md#nope), [web](https://example.com) and [up](#top).\n"
                    "Also NOTES.md.\n")
    assert missing_citations(note) == ["DESIGN.md", "docs/a.md#nope (no such heading)", "configs/prior/nope.yaml",
                                       "NOTES.md"]


def readme_benchmark_commands() -> list[list[str]]:
    """Every ``python benchmarks/X.py FLAGS`` the README gives (in tables and code blocks), as argv lists."""
    import shlex

    found = re.findall(r"python (benchmarks/\w+\.py[^|`\n#]*)", (ROOT / "README.md").read_text())
    return sorted({tuple(shlex.split(command)) for command in found})


def test_every_benchmark_command_of_the_readme_parses():
    """The README's benchmark commands name flags their scripts have (parsed as the script parses its own
    argv; nothing is measured: parsing stops the script)."""
    import argparse
    import runpy
    import sys

    commands = readme_benchmark_commands()
    assert len(commands) >= 10 and {c[0] for c in commands} >= {"benchmarks/sampling.py", "benchmarks/train_speed.py",
                                                                "benchmarks/tokenizer.py"}

    class Parsed(Exception):
        pass

    def parse_then_stop(parser, args=None, namespace=None):  # argparse's own parse, then stop before any work
        parsed, extra = argparse.ArgumentParser.parse_known_args(parser, args, namespace)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        raise Parsed(parsed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        for script, *argv in commands:
            patch.setattr(sys, "argv", [script, *argv])
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except Parsed:
                continue
            except SystemExit as exc:
                pytest.fail(f"README: `python {script} {' '.join(argv)}` does not parse (exit {exc.code})")
            pytest.fail(f"README: `python {script} {' '.join(argv)}` ran without parsing its flags")
