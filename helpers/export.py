"""A trained run's model for use outside this package, each file carrying what a reader needs to feed it:

    cifar10 export runs/x --onnx model.onnx                 # onnxruntime, any language; metadata_props
    cifar10 export runs/x --weights model.safetensors       # safetensors; its header's metadata
    cifar10 export runs/x --weights model.pt                # torch.load(weights_only=True): a dict of plain values

Every file holds the run's evaluated weights (the weight average, for recipes with one) and, as metadata, the
model's name, the class names (in logit order) and the mean and std of the normalisation (RGB, 0-1 units): the
input is (B, 3, 32, 32) float32, (image / 255 - mean) / std. `load_model` reads any of them back (and run folders),
as hubconf.py does for torch.hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from helpers.checkpoints import CheckpointError, check_weights, read_weights_file
from helpers.utils import add_version_flag, atomic_write

WEIGHT_TYPES = (".safetensors", ".pt", ".pth")
INPUT = "(B, 3, 32, 32) float32 RGB: (image / 255 - mean) / std"


class ExportError(ValueError):
    """A file to export to, or to load from, is not usable: the message says what to do."""


def metadata(predictor) -> dict[str, str]:
    """The text metadata every exported file carries (ONNX and safetensors hold strings: lists are JSON)."""
    from helpers import __version__  # deferred: the package's version, read when a file is written

    return {"model": predictor.model_name, "classes": json.dumps(list(predictor.classes)),
            "mean": json.dumps(list(predictor.mean)), "std": json.dumps(list(predictor.std)), "input": INPUT,
            "epochs": str(predictor.epoch), "exported_by": f"cifar10-helpers {__version__}"}


def _predictor(run):
    """A helpers.predict.Predictor on the CPU: `run` itself, or the one of a run folder or checkpoint."""
    from helpers.predict import Predictor, load_predictor  # deferred: PIL and the predictor, on demand

    return run if isinstance(run, Predictor) else load_predictor(run, device="cpu")


def export_onnx(run, path: str | os.PathLike) -> Path:
    """The model of `run` (a run folder, checkpoint or Predictor) as ONNX at `path` (helpers.models.export_onnx),
    with `metadata` in its metadata_props."""
    from helpers.models import export_onnx as write_onnx  # deferred: the layer above is imported on demand

    predictor = _predictor(run)
    return write_onnx(predictor.model, path, metadata=metadata(predictor))


def export_weights(run, path: str | os.PathLike) -> Path:
    """The state dict of `run` (a run folder, checkpoint or Predictor) at `path`: .safetensors (metadata in its
    header; needs the safetensors package) or .pt/.pth ({"state_dict": ..., "model", "classes", "mean", "std",
    ...}: plain values, which torch.load reads with weights_only=True)."""
    path = Path(path)
    if path.suffix not in WEIGHT_TYPES:
        raise ExportError(f"--weights {path}: end the name in .safetensors, or .pt for a PyTorch file")
    predictor = _predictor(run)
    weights = {k: v.detach().contiguous() for k, v in predictor.model.state_dict().items()}
    meta = metadata(predictor)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file  # deferred: optional (the [export] extra)
        except ImportError:
            raise ExportError("writing .safetensors needs the safetensors package: pip install safetensors, or "
                              "export a .pt file") from None
        return atomic_write(path, lambda tmp: save_file(weights, str(tmp), metadata=meta))
    plain = {k: v if k in ("model", "input", "exported_by") else json.loads(v) for k, v in meta.items()}
    return atomic_write(path, lambda tmp: torch.save({"state_dict": weights, **plain}, tmp))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata with classes/mean/std as lists) of a file written by `export_weights`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # deferred: optional (the [export] extra)

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = {k: json.loads(v) if k in ("classes", "mean", "std") else v for k, v in meta.items()}
    else:
        saved = read_weights_file(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
            raise ExportError(f"{path} is not a file written by cifar10 export: pass one, or a run folder")
        weights, meta = saved["state_dict"], {k: v for k, v in saved.items() if k != "state_dict"}
    if "model" not in meta or "classes" not in meta:
        raise ExportError(f"{path} carries no model name and classes: pass a file written by cifar10 export")
    return weights, meta


def load_model(weights: str | os.PathLike, *, model: str | None = None) -> nn.Module:
    """The model in `weights` (a run folder or checkpoint written by cifar10 train, or a file from `export_weights`),
    on the CPU in eval mode, with `classes`, `mean` and `std` attributes. model: the architecture expected (a
    different one is an error)."""
    from helpers.models import build_model  # deferred: the models, on demand
    path = Path(weights).expanduser()
    is_export = path.is_file() and (path.suffix == ".safetensors" or (path.suffix in WEIGHT_TYPES and
                                                                      _is_export(path)))
    if is_export:
        state, meta = read_weights(path)
        net = build_model(meta["model"], num_classes=len(meta["classes"]))
        check_weights(net, state, path)
        net.load_state_dict(state)
        name, classes, mean, std = meta["model"], meta["classes"], meta["mean"], meta["std"]
    else:
        predictor = _predictor(path)
        net, name, classes = predictor.model, predictor.model_name, predictor.classes
        mean, std = predictor.mean, predictor.std
    if model is not None and name != model:
        raise CheckpointError(f"{path} holds a {name}, not a {model}: load it as {name}")
    net.classes, net.mean, net.std = list(classes), tuple(mean), tuple(std)
    return net.eval()


def _is_export(path: Path) -> bool:
    """A .pt file written by `export_weights` (a checkpoint, or anything else, is not)."""
    try:
        saved = read_weights_file(path)
    except CheckpointError:
        return False  # not ours either way: load_predictor then says what it is
    return isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict) and "exported_by" in saved


# ---------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    from helpers.cli import Parser  # deferred: the command line's parser, for the command line only

    p = Parser(prog="cifar10 export", description="Write a trained run's model for use outside this package, "
               "with its class names, mean and std in the file's metadata.")
    add_version_flag(p)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder (holding checkpoint.pt) or a checkpoint")
    p.add_argument("--onnx", metavar="FILE.onnx", help="ONNX (needs onnx and onnxscript; run it with onnxruntime)")
    p.add_argument("--weights", metavar="FILE", help="the weights: FILE.safetensors (needs safetensors) or FILE.pt "
                   "(a dict holding state_dict, read with torch.load(weights_only=True))")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist")
    return p


def _new_file(path: str, flag: str, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    out = Path(path).expanduser()
    if out.suffix not in suffixes:
        raise ExportError(f"{flag} {out}: end the name in {' or '.join(suffixes)}")
    if out.is_dir() or (out.exists() and not overwrite):
        raise ExportError(f"{flag} {out} exists: choose another name, or pass --overwrite to replace it")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not (args.onnx or args.weights):
            raise ExportError("nothing to export: give --onnx FILE.onnx and/or --weights FILE.safetensors")
        onnx = _new_file(args.onnx, "--onnx", (".onnx",), args.overwrite) if args.onnx else None
        weights = _new_file(args.weights, "--weights", WEIGHT_TYPES, args.overwrite) if args.weights else None
        predictor = _predictor(args.run)  # read once; a bad run is one line before anything is written
        written = [export_weights(predictor, weights)] if weights else []
        if onnx:
            written.append(export_onnx(predictor, onnx))
    except (ExportError, CheckpointError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
