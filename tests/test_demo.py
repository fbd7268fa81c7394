"""helpers.demo for real: the Gradio page served on the loopback address, called through gradio_client, answers
as helpers.predict does. Skipped where Gradio is not installed (it is an optional extra)."""

from __future__ import annotations

import http.server
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import demo
from helpers.predict import load_predictor
from tests.conftest import REPO, hostile_run

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
    monkeypatch.setattr(demo, "wait_while_serving", lambda page: None)  # serve, then stop at once
    assert demo.main([str(trained_run), "--port", str(port), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"demo page on http://127.0.0.1:{port}/ (this machine only); add --share for a public link" in out
    assert "share=True" not in out and "launch()" not in out
# ---------------------------------------------------------------------------------------------------------
# Text from a checkpoint or a data set, uploads


def test_page_text_shows_html_and_markdown_literally():
    assert demo.page_text("<img src=x>") == "&lt;img src\\=x&gt;"
    assert demo.page_text("[a](http://x)") == "\\[a\\]\\(http\\://x\\)"
    assert demo.page_text("**b** \x1b[2J") == "\\*\\*b\\*\\* \\\\x1b\\[2J"


def hostile_data(tmp_path, port: int):
    """A tiny CIFAR-10 folder whose batches.meta names the classes with HOSTILE_CLASSES."""
    from tests.conftest import HOSTILE_CLASSES, write_cifar_folder

    root = write_cifar_folder(tmp_path / "data", n_train=20, n_test=20)
    meta = root / "cifar-10-batches-py" / "batches.meta"
    with open(meta, "wb") as f:
        pickle.dump({"label_names": [c.replace("{port}", str(port)) for c in HOSTILE_CLASSES]}, f, protocol=2)
    return root


def test_example_images_are_named_by_index_whatever_the_class_names(trained_run, tmp_path):
    from tests.conftest import hostile_run

    predictor = load_predictor(hostile_run(trained_run, tmp_path / "run", port=9), device="cpu")  # its data's names
    (tmp_path / "ex").mkdir()
    paths, labels = demo.example_images(predictor, tmp_path / "ex", data_dir=str(hostile_data(tmp_path, 9)))
    assert len(paths) == 10 and "a/b\\c" in labels
    assert all(Path(p[0]).parent == tmp_path / "ex" and Path(p[0]).is_file() for p in paths)


def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        pytest.skip("no headless Chromium here (Debian: apt-get install chromium)")
    return found


def test_no_text_from_a_checkpoint_makes_an_element_or_a_request_in_a_browser(trained_run, tmp_path):
    """The page, rendered by headless Chromium, with a checkpoint and data set whose class names are HTML and
    Markdown pointing at a server of ours: the names show as text, and that server is never asked for anything."""
    browser = chromium()
    pytest.importorskip("gradio")
    asked = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    port = recorder.server_address[1]
    run = hostile_run(trained_run, tmp_path / "run", port=port)
    served = demo.serve(run, port=free_port(), block=False, quiet=True, device="cpu",
                        data_dir=str(hostile_data(tmp_path, port)))
    try:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
                              served.local_url], capture_output=True, text=True, timeout=300).stdout
    finally:
        served.close()
        recorder.shutdown()
    assert "What does my CIFAR-10 model see?" in dom  # the page rendered, headline included
    assert "&lt;img src=http://127.0.0.1:" in dom  # the name, as text
    assert f'src="http://127.0.0.1:{port}' not in dom and f'href="http://127.0.0.1:{port}' not in dom
    assert asked == []


def test_an_upload_that_is_not_an_image_gets_a_message(page, tmp_path):
    from gradio_client import Client, handle_file

    (tmp_path / "notes.png").write_text("not an image at all")
    client = Client(page.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
    with pytest.raises(Exception, match="is not an image"):  # gradio_client's AppError carries the page's message
        client.predict(handle_file(str(tmp_path / "notes.png")), api_name="/predict")


def test_uploads_are_bounded_and_deleted(page):
    assert page.max_file_size == 20 * 1024**2
    assert page.delete_cache == (demo.CACHE_CHECK, demo.DELETE_AFTER)
    from tests.conftest import REPO

    assert not list((REPO / "helpers").glob("*.pyi"))  # nothing written beside the package (Gradio stubs)


def test_what_the_page_stores_lives_in_the_process_folder(page):
    """Gradio's cache (uploads, results) and the examples go into demo.process_folder(), deleted at exit."""
    folder = demo.process_folder()
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder / "gradio")
    assert list(folder.glob("examples-*/*.png"))  # one test image per class, shown under the input


@pytest.mark.slow
def test_a_stopped_demo_leaves_no_upload_behind(trained_run, tmp_path):
    """`cifar10 demo` stopped with SIGTERM (as `kill` or a scheduler stops it) deletes everything its page stored:
    an upload, the results and the example images (Gradio's own clean-up keeps most of them)."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file

    temp = tmp_path / "tmp"
    temp.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "upload.png")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"} | {"TMPDIR": str(temp), "TQDM_DISABLE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "helpers.demo", str(trained_run), "--port", str(port), "--device",
                               "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = None
        for _ in range(600):  # up to 5 minutes for Gradio to start on a loaded machine
            if server.poll() is not None:
                pytest.fail(f"the demo ended early: {server.stderr.read()[-2000:]}")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "got"))
                break
            except Exception:  # noqa: BLE001 - not serving yet
                time.sleep(0.5)
        assert client is not None, "the demo never served"
        client.predict(handle_file(str(tmp_path / "upload.png")), api_name="/predict")
        (folder,) = temp.glob("cifar10-demo-*")
        assert [p.name for p in folder.rglob("upload.png")] == ["upload.png"]  # the upload, in the process folder
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 130 and server.stderr.read().strip() == "demo stopped"  # as Ctrl-C
        assert not folder.exists(), sorted(str(p) for p in folder.rglob("*"))
        assert not [p for p in temp.rglob("*") if p.is_file()]  # nothing else left in the temporary folder either
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_the_headline_shows_names_as_text_and_reads_no_pipe(trained_run, tmp_path):
    run = hostile_run(trained_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    os.mkfifo(run / "metrics.json")  # reading it would wait for ever
    text = demo.headline(load_predictor(run, device="cpu"))
    assert "right on its" not in text and "&lt;img src\\=http\\://127\\.0\\.0\\.1\\:9/x&gt;" in text
