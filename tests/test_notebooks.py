"""The five notebooks run top to bottom (papermill, SMOKE mode, tiny real-format data, CPU) and stay stripped."""

from __future__ import annotations

import ast
import json
import os
import re

import nbformat
import pytest

from .conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURES = {
    "01": ["dataset_stats.png", "samples.png", "class_grid.png", "channels.png", "augment_davidnet.png"],
    "02": ["lr_finder.png", "lr_sweep.png"],
    "03": ["lr_finder.png", "curves.png", "misclassified.png"],
    "04": ["curves.png", "confusion_matrix.png", "misclassified.png"],
    "05": ["confusion_matrix.png", "class_accuracy.png", "confused_pairs.png", "misclassified.png", "gradcam.png"],
}


def test_there_are_five_notebooks():
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_is_committed_stripped_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs: nbstripout"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for node in ast.parse(tagged[0].source).body:  # papermill reads literal assignments only
        assert isinstance(node, ast.Assign), f"parameters cell: only NAME = value lines, got {ast.unparse(node)}"
        ast.literal_eval(node.value)  # raises on `os.environ...`, `x if SMOKE else y`, names
    assert not [line for line in tagged[0].source.splitlines() if "=" in line.partition("  # ")[2]], (
        "papermill cannot parse a parameter whose comment holds '='")
    after = code[code.index(tagged[0]) + 1].source
    assert 'SMOKE = os.environ.get("SMOKE") == "1"' in after, "read SMOKE in the cell after the parameters"
    assert "colab-badge.svg" in nb.cells[0].source
    for cell in code:  # logic lives in helpers
        assert not any(line.lstrip().startswith(("def ", "class ")) for line in cell.source.splitlines())
    uncommented = [line for line in tagged[0].source.splitlines() if "=" in line and "  # " not in line]
    assert not uncommented, f"give every parameter a one-line comment: {uncommented}"
    first = nb.cells[0].source
    assert "CIFAR_DIR" in first and "SMOKE" in first, "the first cell says what CIFAR_DIR and SMOKE do"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_names_the_write_ups_not_seeds(path):
    """'seed 001' reads like --seed 1: the write-ups are named by what they are."""
    text = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
    assert not re.search(r"seed[ _]?00\d", text, flags=re.IGNORECASE)


@pytest.fixture(scope="module")
def executed(tiny_data, tmp_path_factory):
    """Run all five in order (05 explains 04's checkpoint); returns {prefix: output folder}."""
    papermill = pytest.importorskip("papermill")
    root = tmp_path_factory.mktemp("notebooks")
    outputs = {}
    os.environ["SMOKE"] = "1"
    try:
        for path in NOTEBOOKS:
            prefix = path.name[:2]
            out = root / prefix
            params = {"DATA_DIR": str(tiny_data), "OUT_DIR": str(out)}
            if "DEVICE = " in path.read_text():  # papermill warns of a parameter a notebook does not have
                params["DEVICE"] = "cpu"
            if prefix == "05":
                params["CHECKPOINT"] = str(outputs["04"] / "checkpoint.pt")
            papermill.execute_notebook(str(path), str(root / path.name), parameters=params, cwd=str(REPO),
                                       kernel_name="python3", progress_bar=False, execution_timeout=1200)
            outputs[prefix] = out
    finally:
        os.environ.pop("SMOKE", None)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("prefix", list(FIGURES))
def test_notebook_runs_and_writes_figures_and_results(executed, prefix):
    out = executed[prefix]
    for name in FIGURES[prefix]:
        assert (out / name).stat().st_size > 1000, name
    results = json.loads((out / "results.json").read_text())
    assert results
    if prefix in ("03", "04", "05"):
        assert 0 <= results["test_acc"] <= 100
    if prefix == "02":
        assert results["suggested_lr"] > 0
        assert set(results["suggestions"]) == {"steepest", "decade_below_min", "min_loss"}
        assert results["batch_size"] == 8  # SMOKE's, read back from the config
        sweep = results["sweep"]  # SMOKE turns section 3 on: one peak and both rules' picks, one epoch each
        assert list(sweep["runs"]) == ["0.001", "steepest", "decade_below_min", "min_loss"] and sweep["epochs"] == 1
        trials = list((out / "sweep").glob("*/results.csv"))  # on Ray Tune (SWEEP_ENGINE "ray"), a folder per run
        assert len(trials) == 1 and len(list(trials[0].parent.glob("trials/*/checkpoint.pt"))) >= 2
    if prefix == "04":
        assert results["fp32_timing"] is None  # the fp32 comparison runs on CUDA only
        assert results["warmup_seconds"] >= 0 and results["mode"] == "eager"
    if prefix == "05":
        assert results["source"].endswith("checkpoint.pt")  # notebook 04's, passed as CHECKPOINT


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_setup_cell_runs_in_colab_without_a_gpu(path, monkeypatch, capsys):
    """Colab's CPU runtime has no nvidia-smi: the first cell must not call it, and says which device torch uses."""
    import subprocess
    import sys
    import types

    setup = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
    ran = []

    def run(cmd, **kwargs):  # git and pip succeed; any other program is missing, as on a CPU runtime
        ran.append(cmd[0])
        if cmd[0] not in ("git", sys.executable):
            raise FileNotFoundError(2, "No such file or directory", cmd[0])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "chdir", lambda path: None)
    monkeypatch.setattr(os.path, "isdir", lambda path: True)  # the clone is there already
    exec(compile(setup, path.name, "exec"), {})
    assert ran == [sys.executable]  # pip install -r requirements.txt, nothing else
    assert re.search(r"torch will use: cpu \(\d+ cores; no CUDA GPU\)", capsys.readouterr().out)
def test_a_parameter_of_the_wrong_kind_fails_in_the_parameters_check(tmp_path):
    """papermill -p SEED x: the notebook stops at its parameters check, with a message naming the parameter."""
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError, match="notebook parameter SEED = 'x': it takes int"):
        papermill.execute_notebook(str(REPO / "notebooks" / "01_data_exploration.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"SEED": "x"}, cwd=str(REPO), kernel_name="python3", progress_bar=False)


def test_check_parameters_takes_none_ints_as_floats_and_refuses_bools_as_ints():
    from helpers.utils import UserError, check_parameters

    check_parameters({"A": None, "B": 3, "C": (1,)}, A=(int, None), B=float, C=(tuple, list))
    with pytest.raises(UserError, match="notebook parameter A = True: it takes int or None"):
        check_parameters({"A": True}, A=(int, None))
