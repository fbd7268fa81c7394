"""A demo page for a trained model, served by Gradio.

    python -m helpers.demo RUN_OR_CHECKPOINT [--port P] [--share] [--host ADDRESS]

Serves http://127.0.0.1:P (this machine only; P: 7860 or the next free port) where you upload an image, or pick
one test image per class, and see the top-3 classes, the 32x32 the model saw and the GradCAM of its top class.
Images are read as `python -m helpers.predict` reads them (helpers.predict: centre square, Lanczos to 32x32), so
the page and the command line give the same answer. --share asks Gradio for a temporary public link (through
Gradio's share servers); in Colab, where the notebook's machine is not yours to browse, Gradio makes one by itself.
Gradio's usage reports are switched off (GRADIO_ANALYTICS_ENABLED=False) and the page uses the browser's own
fonts: nothing is fetched from the internet unless you ask for a share link. Every text that comes from the
checkpoint or the data (class names, settings, metrics) is shown as text, never as HTML or Markdown; an upload is
at most MAX_UPLOAD and must be an image (else the page says so); what the page stores (uploads, results, the
example images, all in process_folder()) is deleted within DELETE_AFTER seconds and when the process ends.

Gradio is an optional extra: pip install -e ".[demo]" (or pip install gradio).
"""

from __future__ import annotations

import argparse
import atexit
import html
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.cli import Parser, sigterm_as_interrupt
from helpers.data import DataError, load_dataset
from helpers.predict import DISPLAY, InputError, Predictor, load_predictor, overlay_on_square
from helpers.utils import add_version_flag, read_json, run_command, safe_text

HOST = "127.0.0.1"  # loopback: the page is reachable from this machine only, unless --host says otherwise
# small images (the 32x32s) fill their box with square pixels, not a blur
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads (a 48-megapixel phone JPEG is ~10-15 MB)
DELETE_AFTER = 600  # seconds an upload is kept (Gradio's delete_cache checks every CACHE_CHECK seconds)
CACHE_CHECK = 120
CSS = (".pixels img { image-rendering: pixelated; width: 100% !important; height: 100% !important; "
       "object-fit: contain; }")


def import_gradio():
    """gradio, with its usage reports off; a clear InputError when it is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no reports or version checks to gradio.app
    try:
        import gradio  # deferred: Gradio, an optional extra
    except ImportError:
        raise InputError('the demo page needs Gradio, which is not installed: pip install -e ".[demo]" in the '
                         "repository (or pip install gradio)") from None
    return gradio


def page_text(value) -> str:
    """`value` (text from a checkpoint or data set) as Markdown that shows it literally: control characters made
    safe (helpers.utils.safe_text), HTML's <, > and & as entities, Markdown's punctuation backslash-escaped, so a
    class name `<img src=...>` or `[x](javascript:...)` is text, never an element or a link."""
    text = html.escape(safe_text(value), quote=False)  # &lt; &gt; &amp;: no '#' for the escapes below to break
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~=:])", r"\\\1", text)


def page_error(err) -> str:
    """An error's message for Gradio's error box (which renders HTML): made safe and escaped."""
    return html.escape(safe_text(err), quote=True)


def classify(predictor: Predictor, path: str | None):
    """The page's answer for one image file: ({class: probability} of all classes, GradCAM overlay of the top
    class uint8 (DISPLAY, DISPLAY, 3), the 32x32 the model saw enlarged to DISPLAY with square pixels)."""
    gr = import_gradio()
    if path is None:
        raise gr.Error("upload an image, or pick a test image below, first")
    try:
        p = predictor.predict(path)
    except InputError as err:
        raise gr.Error(page_error(err)) from None
    cam = overlay_on_square(p, predictor.gradcam(p))
    seen = np.asarray(Image.fromarray(p.seen).resize((DISPLAY, DISPLAY), Image.Resampling.NEAREST))
    return {c: float(v) for c, v in zip(p.classes, p.probabilities)}, cam, seen


def example_images(predictor: Predictor, folder: Path, *, data_dir: str | None = None) -> tuple[list, list]:
    """(paths, class names): the first test image of each class, written as PNGs into `folder`; none when the run's
    data set (CIFAR-10, CIFAR-100 or its image folder, under its data folder or `data_dir`) is not on this machine
    or holds other classes."""
    try:
        test = load_dataset(predictor.config.dataset, data_dir or predictor.config.data_dir, train=False,
                            download=False)
    except (DataError, ValueError):
        return [], []
    if list(test.classes) != list(predictor.classes):
        return [], []
    paths, labels = [], []
    for c, name in enumerate(test.classes):
        members = np.flatnonzero(test.labels == c)
        if not len(members):
            continue
        index = int(members[0])
        path = folder / f"test_{index:05d}_{c}.png"  # no class name in a path: a folder's names are user data
        Image.fromarray(test.images[index]).save(path)
        paths.append([str(path)])
        labels.append(name)
    return paths, labels


def headline(predictor: Predictor) -> str:
    """The page's heading: the model, its epochs and, when the run folder has metrics.json, its test accuracy."""
    try:  # read_json: none is an OSError; a pipe, a huge file or bad JSON a ValueError
        m = read_json(predictor.source.parent / "metrics.json")
        score = f", {float(m['test_acc']):.2f}% right on its {int(m['test_images']):,} test images"
    except (OSError, KeyError, TypeError, ValueError, OverflowError):
        score = ""
    dataset = predictor.config.dataset
    what = {"cifar10": "CIFAR-10 ", "cifar100": "CIFAR-100 "}.get(dataset, "")
    names = [page_text(c) for c in predictor.classes]
    listed = ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + f", ... ({len(names) - 20} more)"
    return (f"## What does my {what}model see?\n**{page_text(predictor.model_name)}**, "
            f"{page_text(predictor.config.recipe)} recipe, trained {predictor.epoch} of {predictor.epochs} "
            f"epochs{score}. It knows {len(names)} classes ({listed}): anything else gets the closest of them. Your "
            "image is cut to its centre square and shrunk to 32x32 pixels, the size the model was trained on.")


def build_demo(predictor: Predictor, *, examples: tuple[list, list] = ([], [])):
    """The Gradio Blocks page: an image input with example test images (the first shown, classified, when the
    page opens), a top-3 label, the GradCAM overlay and the 32x32 the model saw. Its one API endpoint is /predict
    (image file -> label, overlay, 32x32)."""
    gr = import_gradio()
    with gr.Blocks(title=f"demo: {safe_text(predictor.model_name)}",
                   delete_cache=(CACHE_CHECK, DELETE_AFTER)) as page:
        gr.Markdown(headline(predictor))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                first = examples[0][0][0] if examples[0] else None  # the page opens with it classified
                image = image_input(gr, first, type="filepath", image_mode=None, label="Your image",
                                    sources=["upload", "clipboard"], height=320, elem_classes="pixels")
                button = gr.Button("Classify", variant="primary")
                if examples[0]:
                    gr.Examples(examples[0], inputs=image, examples_per_page=10,
                                label="Or pick a test image: " + ", ".join(map(safe_text, examples[1])))
            with gr.Column(scale=1):
                label = gr.Label(num_top_classes=3, label="Top 3 classes")
                with gr.Row():
                    cam = gr.Image(type="numpy", format="png", label="GradCAM, top class",
                                   interactive=False, height=256)
                    seen = gr.Image(type="numpy", format="png", label="What it saw (32x32)",
                                    interactive=False, height=256, elem_classes="pixels")
        # Gradio runs one call of an event at a time by default: GradCAM's hooks on the shared model never overlap
        for event in (button.click, image.upload):
            event(lambda path: classify(predictor, path), inputs=image, outputs=[label, cam, seen],
                  api_name="predict" if event == button.click else False)
        if first is not None:
            page.load(lambda path: classify(predictor, path), inputs=image, outputs=[label, cam, seen],
                      api_name=False)
        gr.Markdown("**GradCAM** (Selvaraju et al., 2017) colours where the model found evidence *for* its top "
                    "class, red strongest; each map is scaled to its own maximum, so compare where, not how hot. "
                    "**What it saw** is your image as the model's input: its centre square at 32x32 pixels.")
    return page


def image_input(gr, *args, **kwargs):
    """gr.Image(*args, **kwargs) whose upload that is not an image (a text file, a damaged one) becomes a message on
    the page: Gradio reads an upload before `classify` runs, and its failure would show an empty error. (This one
    component's preprocess is wrapped: a subclass of a Gradio component makes Gradio write a .pyi beside us.)"""
    image = gr.Image(*args, **kwargs)
    read = image.preprocess

    def preprocess(payload):
        try:
            return read(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - Pillow's errors for a file it cannot read are many
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(page_error(f"{name} is not an image this page can read: upload a PNG, JPEG, WebP, GIF, "
                                      "BMP or TIFF file")) from None

    image.preprocess = preprocess
    return image


_PROCESS_FOLDER: list[Path] = []  # process_folder's, once made


def process_folder() -> Path:
    """This process's folder for everything a demo page stores: Gradio's cache (uploads, results, copies of the
    examples) and our example images. Made once, named to Gradio through GRADIO_TEMP_DIR (inside the one you set,
    if you did; Gradio reads it on every request, so it stays set), and deleted with all it holds when the process
    ends (atexit: the command line turns SIGTERM into an interrupt so that it runs). Gradio's own clean-up on
    close keeps most files (measured with gradio 6.31: 12 of 15 left in its cache), hence ours."""
    if not _PROCESS_FOLDER:
        chosen = os.environ.get("GRADIO_TEMP_DIR")
        inside = chosen if chosen and Path(chosen).is_dir() else None  # else the system's temporary folder
        folder = Path(tempfile.mkdtemp(prefix="cifar10-demo-", dir=inside))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
        _PROCESS_FOLDER.append(folder)
    return _PROCESS_FOLDER[0]


def serve(run: str | os.PathLike, *, port: int | None = None, share: bool | None = None, host: str = HOST,
          data_dir: str | None = None, block: bool = True, quiet: bool = False, device: str = "auto"):
    """Start the page for `run` (a run folder or checkpoint) and return the Gradio Blocks (`.local_url`,
    `.share_url`; `.close()` stops it). block=False returns at once, the server running in the background."""
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"--port {port}: choose a port from 1 to 65535 (or leave it out for 7860 or the next free)")
    gr = import_gradio()
    predictor = load_predictor(run, device=device)
    folder = Path(tempfile.mkdtemp(prefix="examples-", dir=process_folder()))  # nothing written beside the run
    page = build_demo(predictor, examples=example_images(predictor, folder, data_dir=data_dir))
    theme = gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts download
    try:
        page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                    theme=theme, css=CSS, allowed_paths=[str(folder)], ssr_mode=False, footer_links=["api"],
                    max_file_size=MAX_UPLOAD)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise InputError(f"cannot serve on {host}:{port or 'default port'} ({err}): choose another --port") from None
    return page


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cifar10 demo", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder (holding checkpoint.pt) or a checkpoint")
    p.add_argument("--port", type=int, help="(default: 7860, or the next free port)")
    p.add_argument("--share", action="store_true", default=None, help="also a temporary public link, through "
                   "Gradio's share servers (Colab makes one anyway)")
    p.add_argument("--host", default=HOST, help=f"address to listen on (default: {HOST}, this machine only; "
                   "0.0.0.0: every network this machine is on)")
    p.add_argument("--data-dir", help="where the test images for the examples are (default: the run's own)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:  # Gradio's own lines are off (quiet): its "set share=True in launch()" tip is our --share
        with sigterm_as_interrupt():  # `kill` stops it as Ctrl-C does, so its files are deleted (atexit) either way
            page = serve(args.run, port=args.port, share=args.share, host=args.host, data_dir=args.data_dir,
                         device=args.device, block=False, quiet=True)
            print(serving_message(page, args.host), flush=True)
            try:
                wait_while_serving(page)
            finally:
                page.close()

    return run_command(run, interrupted=lambda err: "demo stopped")


def wait_while_serving(page) -> None:
    """Until the server stops, Ctrl-C or SIGTERM (a KeyboardInterrupt, which run_command reports with status 130);
    Gradio's block_thread would swallow the interrupt (status 0) and print a line of its own."""
    while page.is_running:
        time.sleep(0.2)


def serving_message(page, host: str) -> str:
    """Where the page is, in our flags' words."""
    where = "every network this machine is on" if host == "0.0.0.0" else "this machine only"
    public = (f"; public link (Gradio's share servers, temporary): {page.share_url}" if page.share_url
              else "; add --share for a public link")
    return f"demo page on {page.local_url} ({where}){public}. Ctrl-C stops it"


if __name__ == "__main__":
    sys.exit(main())
