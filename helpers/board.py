"""TensorBoard logging of a run (`TrainConfig(tensorboard=True)`, `cifar10 train --tensorboard`): each epoch's
scalars as it ends, and the run's figures once written, into OUT/tensorboard through torch.utils.tensorboard.
View them with `tensorboard --logdir runs` (Colab: `%load_ext tensorboard` then `%tensorboard --logdir runs`).

The tensorboard package is optional (Colab has it): `board_writer` says how to install it when it is missing.
"""

from __future__ import annotations

from pathlib import Path

# History record key -> TensorBoard tag; one point per epoch (step = epoch)
SCALARS = {
    "train_loss": "loss/train", "test_loss": "loss/test",
    "train_acc": "accuracy/train", "test_acc": "accuracy/test", "test_acc_tta": "accuracy/test_tta",
    "test_acc_trained": "accuracy/test_trained_weights",
    "lr": "lr/epoch_start", "lr_end": "lr/epoch_end", "lr_max": "lr/epoch_max",
    "seconds": "seconds/epoch", "train_seconds": "seconds/train",
}
FOLDER = "tensorboard"  # inside the run folder


class BoardError(RuntimeError):
    """TensorBoard logging was asked for and cannot run (the package is missing)."""


class BoardLog:
    """A SummaryWriter into `out`/tensorboard: `epoch(record)` after each epoch, `figures(paths)` at the end."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # deferred: optional (needs tensorboard)
        except ImportError:
            raise BoardError("tensorboard=True (--tensorboard) needs the tensorboard package: pip install tensorboard "
                             "(Colab has it), or leave it off") from None
        self.folder = Path(out) / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def epoch(self, record: dict) -> None:
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["epoch"])
        self.writer.flush()  # an interrupted run keeps what it logged

    def figures(self, paths: list[Path], *, step: int) -> None:
        """The run's PNG figures as images, tagged by file name (figures/curves, figures/gradcam, ...)."""
        import matplotlib.image  # deferred: matplotlib, at the end of a run that drew figures

        for path in paths:
            if path.suffix == ".png" and path.is_file():
                image = matplotlib.image.imread(path)[..., :3]  # (H, W, 3) in [0, 1]; the alpha channel dropped
                self.writer.add_image(f"figures/{path.stem}", image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
