"""Trust at the edges, for every command: text from files reaches the terminal made safe, inputs are bounded
(pipes, devices, image bombs), and every listed mistake ends in one `error:` line with exit status 2, checked before
the work and with nothing of the user's replaced."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cli, compare, data, predict, utils
from helpers.data import DataError, load_cifar10
from tests.conftest import REPO, hostile_run, write_cifar_folder


def one_error_line(captured) -> str:
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def no_control(text: str) -> bool:
    """No character that acts on a terminal or breaks a line (what safe_text escapes), newlines between lines aside."""
    return all(line == utils.safe_text(line) for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------------------
# One helper for text from files


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[2J", "\\x1b[2J"), ("a\nb", "a\\nb"), ("\u202eevil", "\\u202eevil"), ("bad\udcffname", "bad\\udcffname"),
    ("tab\there", "tab\\there"), ("chat 猫 café", "chat 猫 café"), ("$x$ <b>", "$x$ <b>")])
def test_safe_text_escapes_control_and_invisible_characters_only(raw, shown):
    assert utils.safe_text(raw) == shown


def test_predict_prints_class_and_file_names_made_safe(trained_run, tmp_path, capsys):
    run = hostile_run(trained_run, tmp_path / "run")
    image = tmp_path / "x\x1b]0;title\x07.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert predict.main([str(run), str(image), "--top", "10", "--class", "ship", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert no_control(out) and "\\x1b[2J\\x1b]0;pwned\\x07cat" in out and "dog\\nfrog" in out
    assert "x\\x1b]0;title\\x07.png" in out


def test_predict_draws_hostile_class_names_literally(trained_run, tmp_path, capsys):
    run = hostile_run(trained_run, tmp_path / "run")
    Image.new("RGB", (40, 40), (20, 30, 200)).save(tmp_path / "x.png")
    assert predict.main([str(run), str(tmp_path / "x.png"), "--top", "10", "--class", "**bold**", "--gradcam",
                         str(tmp_path / "g.png"), "--device", "cpu"]) == 0  # '$\notasymbol{$' is not parsed as math
    assert (tmp_path / "g.png").is_file()


def test_compare_prints_run_names_and_metrics_made_safe(trained_run, tmp_path, capsys):
    run = tmp_path / "run\x1b[2J"
    hostile_run(trained_run, run)
    (run / "history.json").write_text((trained_run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) | {"model": "m\x1b]0;x\x07", "device": "cpu\nfake row"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert compare.main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert no_control(out) and "run\\x1b[2J" in out and "cpu\\nfake row" in out
    assert len(out.strip().splitlines()) == 5  # header, rule, one row, what train s counts, curves


def test_what_was_typed_is_made_safe_in_usage_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--model", "custom_resnet", "\x1b[2Jstray"])
    assert stop.value.code == 2 and "\\x1b[2Jstray" in one_error_line(capsys.readouterr())


# ---------------------------------------------------------------------------------------------------------
# Bounded inputs


def png_header(width: int, height: int, *, bit_depth: int = 16, colour: int = 0) -> bytes:
    """A PNG whose header says width x height (16-bit gray) and whose data is cut short: what a bomb looks like
    to a reader that checks the header first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_larger_than_the_budget_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(13000, 13000))  # passes Pillow's own bomb check (169 MP < 179 MP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our one-line error only, not Pillow's DecompressionBombWarning before it
        with pytest.raises(predict.InputError, match="13000x13000 pixels, more than the 67 megapixels"):
            predict.open_image(bomb)
        with pytest.raises(predict.InputError, match="megapixels"):
            predict.as_pil(Image.new("L", (9000, 9000)))
        # a folder data set's images go through the same reader and the same budget, with their own advice
        with pytest.raises(DataError, match="13000x13000 pixels.*take it out of the folder"):
            data.read_image_file(bomb)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_pipe_a_device_or_a_folder_given_as_an_image_is_one_line_never_a_hang(trained_run, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody writes to it: reading it would block for ever
    for bad in (fifo, Path("/dev/zero"), tmp_path):
        if not bad.exists():
            continue
        done = subprocess.run([sys.executable, "-m", "helpers.predict", str(trained_run), str(bad), "--device", "cpu"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
        assert done.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# One line, never a traceback


def test_gradcam_under_a_file_or_on_a_full_disk_is_refused_before_the_work(trained_run, tmp_path, capsys,
                                                                         monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert predict.main([str(trained_run), str(tmp_path / "x.png"), "--gradcam", str(mine / "g.png")]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a folder" in one_error_line(captured) and captured.out == ""
    assert mine.read_text() == "mine"

    class Usage:
        free = 0

    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: Usage)
    assert compare.main([str(trained_run), "--out", str(tmp_path / "c.png")]) == 2
    captured = capsys.readouterr()
    assert "is full" in one_error_line(captured) and captured.out == ""


def test_a_full_disk_while_writing_a_checkpoint_says_so(tmp_path, monkeypatch):
    import torch

    from helpers.checkpoints import save_checkpoint

    (tmp_path / "checkpoint.pt").write_bytes(b"the previous one")

    def full(state, f):  # what torch.save raises when the disk fills (no errno)
        Path(f).write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1984")

    class Usage:
        free = 4096

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(utils.WriteError, match="the disk is full: free some space"):
        save_checkpoint(tmp_path / "checkpoint.pt", {})
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"the previous one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize(("metrics", "history"), [
    ("[]", None), ('{"test_acc": "high"}', None), ('{"test_acc": 1}', '{"epochs": "none"}'),
    ('{"test_acc": 1}', '{"epochs": [{"epoch": "one", "test_acc": 1, "test_loss": 1}]}'),
    ('{"test_acc": 1}', "[1, 2]"), ('{"test_images": [1]}', None)])
def test_compare_on_json_of_the_wrong_shape_or_types_is_one_line(trained_run, tmp_path, capsys, metrics, history):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(metrics)
    (run / "history.json").write_text(history or (trained_run / "history.json").read_text())
    assert compare.main([str(run)]) == 2
    assert "is damaged" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize("labels", [["cat"] * 20, [0.5] * 20, [None] * 20, [True] * 20])
def test_data_whose_labels_are_not_integers_is_one_line(tmp_path, capsys, labels):
    root = write_cifar_folder(tmp_path / "data", n_train=100, n_test=20)
    batch = root / "cifar-10-batches-py" / "test_batch"
    with open(batch, "rb") as f:
        entry = pickle.load(f)
    entry["labels"] = labels
    with open(batch, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(DataError, match="integer classes"):
        load_cifar10(root, train=False, download=False)
    code = cli.main(["--model", "depthwise_net", "--epochs", "1", "--data-dir", str(root), "--workers", "0",
                     "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")])
    assert code == 2 and "integer classes" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize("changes", [{"normalization": {"mean": [0.5], "std": [0.2, 0.2, 0.2]}},
                                     {"normalization": {"mean": "abc", "std": "def"}},
                                     {"normalization": {"mean": [0.5] * 3, "std": [0.0] * 3}},
                                     {"normalization": [1, 2]}, {"classes": [1, 2, 3]}])
def test_a_checkpoint_whose_normalisation_or_classes_are_wrong_is_one_line(trained_run, tmp_path, capsys, changes):
    run = hostile_run(trained_run, tmp_path / "run", **changes)
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    assert predict.main([str(run), str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    assert "is damaged" in one_error_line(capsys.readouterr())


def test_demo_port_out_of_range_is_one_line(trained_run, capsys):
    from helpers import demo

    assert demo.main([str(trained_run), "--port", "70000"]) == 2
    assert "--port 70000: choose a port from 1 to 65535" in one_error_line(capsys.readouterr())


def test_every_command_line_ends_through_one_function():
    """train, predict, compare, demo and sweep hand their errors to helpers.utils.run_command, none of its own."""
    for name in ("cli", "predict", "compare", "demo", "sweep"):
        source = (REPO / "helpers" / f"{name}.py").read_text()
        assert "run_command(" in source and 'print(f"error:' not in source, name


def test_run_command_maps_errors_to_one_line_and_a_status(capsys):
    def raising(err):
        def body():
            raise err
        return body

    assert utils.run_command(raising(utils.UserError("bad\nthing \x1b[2J"))) == 2
    assert one_error_line(capsys.readouterr()) == "error: bad\\nthing \\x1b[2J"
    assert utils.run_command(raising(PermissionError(13, "Permission denied", "/x"))) == 2
    assert one_error_line(capsys.readouterr()) == "error: /x: Permission denied"
    assert utils.run_command(raising(ValueError("boom")), failures=(ValueError,)) == 1
    assert utils.run_command(raising(KeyboardInterrupt()), interrupted=lambda err: "kept") == 130
    assert capsys.readouterr().err.strip().endswith("kept")
    assert utils.run_command(lambda: None) == 0 and np.isscalar(utils.run_command(lambda: 3))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_every_json_and_yaml_we_read_refuses_a_pipe_or_a_huge_file_with_one_line(trained_run, tmp_path, monkeypatch):
    """The family of issue 23's leftover: metrics.json, history.json, a settings file (--config), trial.json and
    sweep.json all go through utils.read_text_file, so a pipe never hangs a command and a file larger than
    MAX_TEXT_BYTES is refused before it is read."""
    import shutil

    from helpers import config, sweep

    monkeypatch.setattr(utils, "MAX_TEXT_BYTES", 20_000)  # a "huge" file without writing 32 MiB
    for name in ("metrics.json", "history.json"):
        for kind in ("pipe", "huge"):
            run = tmp_path / f"{kind}-{name}"
            shutil.copytree(trained_run, run)
            (run / name).unlink()
            if kind == "pipe":
                os.mkfifo(run / name)  # nobody writes to it: reading it would wait for ever
            else:
                (run / name).write_text(json.dumps({"pad": "x" * 40_000}))
            if kind == "pipe":  # not a file: compare reads the run as a stopped one, from its checkpoint
                assert compare.read_run(run)[0]["epochs"] == "2/2 (unfinished)"
            else:
                with pytest.raises(utils.RunError, match="damaged"):
                    compare.read_run(run)
    settings = tmp_path / "config.yaml"
    os.mkfifo(settings)
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.read_config_file(settings)
    settings = tmp_path / "big.json"
    settings.write_text(json.dumps({"epochs": 1, "pad": "x" * 40_000}))
    with pytest.raises(config.ConfigError, match="more than"):
        config.read_config_file(settings)
    trial = tmp_path / "trial.json"
    os.mkfifo(trial)
    with pytest.raises(sweep.SweepError):
        sweep.read_trial(trial, {})
    with pytest.raises(ValueError, match="more than"):
        utils.read_json(settings)
    assert utils.read_json(trained_run / "metrics.json")["epochs"] == 2  # a real one still reads
    (tmp_path / "pipe-metrics.json" / "history.json").unlink()
    (tmp_path / "pipe-metrics.json" / "history.json").write_text("[]")  # history readable, metrics.json a pipe
    lock_owner = tmp_path / "pipe-metrics.json" / ".lock.owner"
    os.mkfifo(lock_owner)  # read when a second run is refused: a pipe there must not hang the refusal either
    from helpers import run as run_module

    assert run_module._owner(lock_owner.parent) == "a process that has just started"
    done = subprocess.run([sys.executable, "-m", "helpers.compare", str(tmp_path / "pipe-metrics.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # a read of the pipe would time out
    assert done.returncode == 0 and "unfinished" in done.stdout, done.stderr
