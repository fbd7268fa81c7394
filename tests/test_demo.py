"""helpers.demo for real: the Gradio page served on the loopback address, called through gradio_client, answers
as helpers.predict does. Skipped where Gradio is not installed (it is an optional extra)."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import demo
from helpers.predict import load_predictor

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(trained_run):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    served = demo.serve(trained_run, port=free_port(), block=False, quiet=True, device="cpu")
    yield served
    served.close()


def test_page_answers_as_predict_does(page, trained_run, tiny_arrays, tmp_path):
    from gradio_client import Client, handle_file

    assert page.local_url.startswith("http://127.0.0.1:") and not page.share_url  # loopback, no public link
    Image.fromarray(tiny_arrays[1].images[4]).resize((96, 64)).save(tmp_path / "mine.png")
    client = Client(page.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
    label, cam, seen = client.predict(handle_file(str(tmp_path / "mine.png")), api_name="/predict")
    expected = load_predictor(trained_run, device="cpu").predict(tmp_path / "mine.png")
    assert label["label"] == expected.label
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert len(got) == 3
    for name, prob in expected.top(3):
        assert got[name] == pytest.approx(prob, abs=1e-5)
    seen_big = np.asarray(Image.open(seen).convert("RGB"))
    assert np.array_equal(seen_big[::8, ::8], expected.seen)  # the 32x32, each pixel an 8x8 square
    assert np.asarray(Image.open(cam)).shape[:2] == (256, 256)


def test_page_offers_one_test_image_per_class(page, trained_run, tmp_path):
    predictor = load_predictor(trained_run, device="cpu")
    paths, labels = demo.example_images(predictor, tmp_path)
    assert len(paths) == 10 and labels == predictor.classes
    assert Image.open(paths[0][0]).size == (32, 32)
    none = demo.example_images(predictor, tmp_path, data_dir=str(tmp_path / "absent"))
    assert none == ([], [])


def test_without_gradio_the_command_says_how_to_install_it(trained_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert demo.main([str(trained_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and 'pip install -e ".[demo]"' in err and len(err.splitlines()) == 1


def test_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert demo.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoint at") and len(err.splitlines()) == 1


def test_the_command_names_our_flag_not_gradios_keyword(trained_run, monkeypatch, capsys):
    pytest.importorskip("gradio")
    port = free_port()
    monkeypatch.setattr("gradio.Blocks.block_thread", lambda self: self.close())  # serve, then stop at once
    assert demo.main([str(trained_run), "--port", str(port), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"demo page on http://127.0.0.1:{port}/ (this machine only); add --share for a public link" in out
    assert "share=True" not in out and "launch()" not in out
