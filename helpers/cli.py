"""The command line: `cifar10 COMMAND ...` once installed, `python -m helpers COMMAND ...` from a clone
(`command_line`: train, predict, compare, demo, sweep, export; each command's flags live in its module). Training:
`cifar10 train --model custom_resnet ...` (also `python -m helpers.train`).

Argument parsing over helpers.run.train_run: every TrainConfig setting is a flag, generated from the schema
(its type, choices and help), plus where the run goes and how it reports. A user mistake (a flag, a path, a
checkpoint) ends with a one-line `error:` and exit status 2 (1 when training itself fails, 130 when interrupted),
never a traceback, and nothing the user made is replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from dataclasses import fields
from pathlib import Path

from helpers import distributed, utils
from helpers.checkpoints import checkpoint_path, read_checkpoint
from helpers.config import ConfigError, TrainConfig, config_text, read_config_file, recipe_table
from helpers.distributed import exit_process, world
from helpers.run import RunInterrupted, interrupted_message, resolve_config, train_run
from helpers.train import TrainingDiverged
from helpers.utils import (
    LATEST,
    RunError,
    WriteError,
    add_version_flag,
    messages_in_flags,
    next_run_folder,
    point_latest,
    resolve_device,
    safe_text,
)

RUNS = "runs"  # where runs go by default: a new numbered folder each (utils.next_run_folder), and runs/latest


class Parser(argparse.ArgumentParser):
    """argparse's parser whose mistakes are one `error:` line (not the 40-line usage text), what was typed made safe."""

    def error(self, message: str):
        self.exit(2, f"error: {safe_text(message)} (see {self.prog} --help)\n")


def _number(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _peak(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or 'auto' (run the LR range test first), got {text!r}") from None


def add_setting(parser: argparse.ArgumentParser, f) -> None:
    """One flag for TrainConfig field `f`, from its schema (helpers.config.setting). Unset flags stay None: the
    config then takes the recipe's value or the field's default."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    default = "the recipe's" if meta["recipe"] else "see above" if callable(f.default_factory) else repr(f.default)
    said = "(default:" in meta["help"]  # a help that names its default says it once
    kwargs = {"help": meta["help"] if said else f"{meta['help']} (default: {default})", "default": None}
    if meta["kind"] == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif meta["choices"]:
        kwargs["choices"] = list(meta["choices"])
        if meta["const"] is not None:
            kwargs |= {"nargs": "?", "const": meta["const"]}
    else:
        kwargs["type"] = {"int": _number(int), "float": _number(float), "peak": _peak}.get(meta["kind"], str)
    parser.add_argument(flag, **kwargs)


class ConfigFile(argparse.Action):
    """--config FILE: the file's settings, in the order of the command line: flags after it change them."""

    def __call__(self, parser, namespace, path, option_string=None):
        try:
            settings = read_config_file(path)
        except ConfigError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        for name, value in settings.items():
            setattr(namespace, name, value)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cifar10 train", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Train a CIFAR-10 model. Recipe flags left unset take the chosen recipe's value:\n  "
                           + recipe_table().replace("\n", "\n  "))
    add_version_flag(p)
    p.add_argument("--config", metavar="FILE", action=ConfigFile, help="take every setting from this file (a run "
                   "folder's config.yaml, or --print-config's output); flags after it change them")
    p.add_argument("--print-config", action="store_true", help="print the settings this run would train with (the "
                   "recipe's, fitted to the data by the small-run rule) as a --config file, and exit")
    settings = p.add_argument_group("settings of the run (helpers.config.TrainConfig)")
    for f in fields(TrainConfig):
        add_setting(settings, f)
    settings.add_argument("--compile", dest="mode", action="store_const", const="compile",
                          help="same as --mode compile")
    where = p.add_argument_group("where it goes and how it reports")
    where.add_argument("--out", help="folder for checkpoint, history, metrics and figures (default: a new folder "
                       f"{RUNS}/MODEL-RECIPE-N, and {RUNS}/{LATEST} leads to the last; with --resume: the checkpoint's "
                       "folder)")
    where.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint or run folder, "
                       "with its settings, writing into its folder")
    where.add_argument("--init-from", metavar="RUN", help="start a new run (new schedule) from the weights of this "
                       "checkpoint or run folder")
    where.add_argument("--overwrite", action="store_true", help="move a run already in --out aside, whole (to "
                       "OUT-N), and start afresh")
    where.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    where.add_argument("--no-figures", dest="figures", action="store_false",
                       help="skip the curves, confusion matrix, misclassified and GradCAM figures")
    where.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


def given_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig settings the user typed (argparse leaves the others None)."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# what a run started with --init-from takes from its source unless typed: the same network and the same images (a
# source trained on a 2,000-image subset must not start a 50,000-image run); the subsets are drawn with the seed
INHERITED = ("model", "data_dir", "subset_train", "subset_test", "seed")


def inherited_settings(source: dict, given: dict) -> dict:
    """The settings of `source` (a checkpoint's config) that a run started from it takes, those not in `given`
    (the recipe too when the model is the source's)."""
    keep = INHERITED + (() if "model" in given else ("recipe",))
    return {k: source[k] for k in keep if k not in given and k in source}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Path | None]:
    """(config, out folder: None for a new numbered one); with --resume, the checkpoint's settings with the flags
    typed on top (helpers.run refuses those that would change what the run computes); with --init-from, the
    source's model and data settings unless typed (`INHERITED`)."""
    given = given_settings(args)
    if args.init_from and not args.resume:
        source = read_checkpoint(args.init_from).config.to_dict()
        taken = inherited_settings(source, given)
        shown = [f"--{k.replace('_', '-')} {v}" for k, v in taken.items() if k != "data_dir" and v is not None]
        if world().is_main:  # a note: stdout, except under --print-config (stdout is then the config file)
            print(f"--init-from: as the source run: {' '.join(shown) or 'its data folder'} (type a flag to change one)",
                  file=sys.stderr if args.print_config else sys.stdout)
        given = taken | given
    if not args.resume:
        return TrainConfig(**given), Path(args.out) if args.out else None
    if args.init_from:
        raise RunError("--resume continues a run with its own weights; --init-from starts a new one: pass one")
    ckpt = read_checkpoint(args.resume)
    return TrainConfig.from_dict(ckpt.requested.to_dict() | given), Path(args.out) if args.out else ckpt.path.parent


def mark_latest(out: Path | None) -> None:
    """runs/latest leads to `out` when it is a run folder in runs/ with a checkpoint (rank 0; never fatal)."""
    if out is None or not world().is_main or not (out / "checkpoint.pt").is_file():
        return
    folder = out.resolve()
    if folder.parent != Path(RUNS).resolve():
        return
    try:
        point_latest(folder)
    except OSError as err:
        print(f"note: could not point {RUNS}/{LATEST} at {folder.name} ({err})")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or a preempted machine's stop) ends the run as Ctrl-C does: cleanly, with a hint."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = None

    def train() -> int:
        nonlocal out
        with sigterm_as_interrupt(), messages_in_flags():
            device = distributed.setup(resolve_device(args.device))  # joined before the processes agree on a name
            config, out = config_from_args(args)
            if args.print_config:  # the file on stdout, what the small-run rule changed on stderr
                resolved, notes = resolve_config(config)
                for note in notes:
                    print(note, file=sys.stderr)
                print(config_text(resolved), end="")
                return 0
            if out is None:
                out = distributed.agree(lambda: next_run_folder(RUNS, f"{config.model}-{config.recipe}"))
            result = train_run(config, out, device=device, resume=args.resume or False,
                               init_from=args.init_from, overwrite=args.overwrite, figures=args.figures,
                               quiet=args.quiet)
        if not world().is_main:  # under torchrun rank 0 alone reports
            return 0
        mark_latest(out)
        figures = [str(p) for k, p in result.paths.items() if k not in ("checkpoint", "history", "metrics")]
        if figures and result.status != "finished":
            print("figures: " + safe_text(", ".join(figures)))
        print(safe_text(result.summary()))
        if checkpoint_path(Path(RUNS) / LATEST).parent.resolve() == out.resolve():
            print(f"{RUNS}/{LATEST} leads to {safe_text(out.resolve().name)}: pass it to predict, compare, demo or "
                  "--init-from")
        return 0

    def interrupted(err: KeyboardInterrupt) -> str:
        mark_latest(out)
        return str(err) if isinstance(err, RunInterrupted) else interrupted_message(out)

    return utils.run_command(train, interrupted=interrupted, failures=(TrainingDiverged, WriteError))


# ---------------------------------------------------------------------------------------------------------
# cifar10 COMMAND: one command line over every module's


COMMANDS = {  # name -> (module whose main(argv) it runs, what it does)
    "train": ("helpers.cli", "train a model with its recipe into a run folder"),
    "predict": ("helpers.predict", "classify your images with a trained run (top classes, GradCAM)"),
    "compare": ("helpers.compare", "compare runs: a table and their curves"),
    "demo": ("helpers.demo", "a demo page for a trained run (Gradio, on 127.0.0.1)"),
    "sweep": ("helpers.sweep", "many runs: a grid of settings and seeds (Ray Tune, or one after another)"),
    "export": ("helpers.export", "a trained run's weights for others: ONNX, safetensors, a plain state dict"),
}


def command_line(argv: list[str] | None = None) -> int:
    """`cifar10 COMMAND [flags]` (= `python -m helpers COMMAND [flags]`): runs COMMAND's main; flags alone train
    (`python -m helpers --epochs 2`, as before there were commands)."""
    import importlib  # deferred: with the command's module, imported when it is asked for

    from helpers import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    if argv[:1] == ["--version"]:
        print(f"cifar10-helpers {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: cifar10 COMMAND [flags]   (from a clone: python -m helpers COMMAND [flags])\n\ncommands:\n"
              + "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
              + "\n\ncifar10 COMMAND --help lists its flags; cifar10 --version prints the version")
        return 0 if argv else 2
    if not argv[0].startswith("-"):
        def unknown() -> None:
            raise RunError(f"no command {argv[0]!r}: choose one of {', '.join(COMMANDS)} (see cifar10 --help)")

        return utils.run_command(unknown)
    return main(argv)


def run_command() -> None:
    """The `cifar10` console script and `python -m helpers`: the exit status of command_line."""
    exit_process(command_line())  # under torchrun: no interpreter teardown (distributed.exit_process)


if __name__ == "__main__":
    exit_process(main())  # under torchrun: no interpreter teardown (distributed.exit_process)
