"""The README's promises hold, and its reference page's (GUIDE.md): every command they show parses, every file and
section they link exists, the README's test command is CI's.

Fast: nothing trains; each `cifar10 X ...` and `python -m helpers.X ...` line goes through that module's argparse
parser.
"""

from __future__ import annotations

import importlib
import re
import shlex

import nbformat
import pytest

from .conftest import REPO

README = (REPO / "README.md").read_text()
DOCS = {name: (REPO / name).read_text() for name in ("README.md", "GUIDE.md")}  # what a user reads to run it
OURS = ("helpers", "benchmarks")
# modules whose command line lives elsewhere (`python -m helpers.train` runs helpers.cli)
PARSER_HOME = {"helpers.train": "helpers.cli"}


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _shell_commands() -> list[str]:
    """Every command in the README and GUIDE.md: the bash blocks' lines and inline code, split at `&&`."""
    lines = []
    for text in DOCS.values():
        lines += [line for lang, body in _fenced_blocks(text) if lang in ("bash", "sh") for line in body.splitlines()]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        lines += re.findall(r"`([^`\n]+)`", prose)
    commands = [part.strip() for line in lines for part in line.split("&&")]
    return [c for c in commands if c.startswith(("python ", "python3 ", "bash ", "papermill ", "cifar10 "))]


def _module_commands() -> list[list[str]]:
    """Every command of ours as [python, -m, module, args...]: `cifar10 X args` is `python -m <X's module> args`."""
    from helpers.cli import COMMANDS

    commands = []
    for argv in (shlex.split(c, comments=True) for c in _shell_commands()):
        rest = argv[1:] if argv[0] == "cifar10" else argv[3:] if argv[1:3] == ["-m", "helpers"] else None
        if rest is not None:  # the one command line: cifar10 X / python -m helpers X (X a placeholder: skipped)
            argv = ["python", "-m", COMMANDS[rest[0]][0], *rest[1:]] if rest and rest[0] in COMMANDS else ["-"]
        if argv[0].startswith("python") and argv[1] == "-m" and argv[2].startswith(OURS):
            commands.append(argv)
    return commands


def _parser(module: str):
    home = importlib.import_module(PARSER_HOME.get(module, module))
    assert hasattr(home, "build_parser"), f"{module}: no build_parser() to check the README's command against"
    return home.build_parser()


def test_the_readme_shows_the_training_commands():
    shown = [" ".join(a) for a in _module_commands()]
    assert "python -m helpers.cli --epochs 2 --subset-train 2000 --subset-test 1000" in shown  # the CPU run
    assert any(c.startswith("python -m helpers.cli --model custom_resnet") for c in shown)  # the GPU run


def test_the_readme_uses_the_installed_command_with_commands_that_exist():
    from helpers.cli import COMMANDS

    shown = [shlex.split(c, comments=True) for c in _shell_commands() if c.startswith("cifar10 ")]
    assert {a[1] for a in shown} == set(COMMANDS) | {"COMMAND"}  # each command shown, and no other


@pytest.mark.parametrize("argv", _module_commands(), ids=lambda a: " ".join(a[2:])[:60])
def test_every_python_m_command_parses(argv, tmp_path):
    parser = _parser(argv[2])
    if "--config" in argv:  # the file it names is read as the flags are parsed: one like a run folder's
        from helpers.config import TrainConfig, config_file_name, config_text

        argv = list(argv)
        argv[argv.index("--config") + 1] = str(tmp_path / config_file_name())
        (tmp_path / config_file_name()).write_text(config_text(TrainConfig()))
    try:
        parser.parse_args(argv[3:])
    except SystemExit as stop:  # --help exits 0; a bad flag exits 2 after printing the reason
        assert stop.code == 0, f"{' '.join(argv)} does not parse"


def test_every_script_and_notebook_command_names_what_exists():
    for command in _shell_commands():
        argv = shlex.split(command, comments=True)
        if argv[0] == "bash":
            assert (REPO / argv[1]).is_file(), command
        elif argv[0] == "papermill":
            notebook = nbformat.read(REPO / argv[1], as_version=4)
            parameters = next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
            for name in argv[argv.index("-p") + 1::3] if "-p" in argv else []:
                assert re.search(rf"^{name}\s*=", parameters, flags=re.MULTILINE), f"{command}: no {name}"


def _slug(heading: str) -> str:  # GitHub's anchor for a heading
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("name", DOCS)
def test_every_linked_file_image_and_anchor_exists(name):
    text = DOCS[name]
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img [^>]*src="([^"]+)"', text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    if name == "README.md":
        assert any(t.startswith("assets/") and t.endswith(".png") for t in local), "the first screen shows a figure"
    for target in local:
        file, _, anchor = target.partition("#")
        if file:
            assert (REPO / file).exists(), f"{name} links to a missing file: {target}"
        if anchor:
            linked = DOCS[name] if not file else (REPO / file).read_text()
            assert anchor in _anchors(linked), f"{name} links to a missing section: {target}"
    assert "../shared" not in text


def test_the_readme_stays_short_and_leads_to_the_reference():
    """The README is what a student reads top to bottom (issue 26: ~220 lines); the reference lives in GUIDE.md."""
    assert len(README.splitlines()) <= 225
    assert "](GUIDE.md)" in README


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if line.startswith("# ---") and "README's test command" in line)
    ci_command = ci[marker + 1].strip()
    blocks = [body for lang, body in _fenced_blocks(README) if lang == "bash"]
    assert any(ci_command in body.splitlines() for body in blocks), f"README lacks .ci/run's line: {ci_command}"


def test_install_lines_pin_the_tested_torch_and_give_a_cpu_build():
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)", (REPO / "requirements-dev.txt").read_text(), re.M))
    installs = [c for c in _shell_commands() + [line for _, b in _fenced_blocks(README) for line in b.splitlines()]
                if "pip install" in c and "torch==" in c]
    assert installs
    for line in installs:
        assert f"torch=={pins['torch']}" in line and f"torchvision=={pins['torchvision']}" in line, line
    assert any("--index-url https://download.pytorch.org/whl/cpu" in line for line in installs), "a CPU-only install"


QUICK = "python -m helpers.train --epochs 2 --subset-train 2000 --subset-test 1000"


def test_the_quick_start_numbers_are_its_commands():
    """Every accuracy the README quotes for the quick start's CPU command is that command's, as its run recorded it
    (assets/runs/cli_quick_start.json is the metrics.json it wrote), not another recipe's."""
    import json

    from helpers import cli

    metrics = json.loads((REPO / "assets" / "runs" / "cli_quick_start.json").read_text())
    given = cli.given_settings(cli.build_parser().parse_args(QUICK.split()[3:]))
    assert {k: metrics["requested"][k] for k in given} == given and metrics["settings"]["model"] == "custom_resnet"
    accuracy = f"{metrics['test_acc']:.2f}%"
    quoted = [p for p in README.split("\n\n") if not p.lstrip().startswith("|") and "quick start" in p.lower()
              and re.search(r"\d+\.\d\d%", p)]
    quoted += [line for line in README.splitlines() if line.startswith("|") and "the quick start's CPU command" in line]
    assert len(quoted) >= 3
    for text in quoted:
        assert set(re.findall(r"\d+\.\d\d%", text)) == {accuracy}, text
