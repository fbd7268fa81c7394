"""CIFAR-10 training helpers: one flat package. From a clone it is imported from the repository root; after
`pip install -e .` (see pyproject.toml) from anywhere.

config (TrainConfig, the recipe table) · engine (TrainStep and its execution modes) · train (fit, evaluate,
History) · checkpoints · cli (the command line: `python -m helpers.train`, or `python -m helpers.cli`) · utils ·
data (loading, augmentation, prepare_data, DataLoader and GpuLoader) · models · lr_finder · gradcam · plots.
Modules are imported explicitly (`from helpers.train import fit`), so that `python -m helpers.train` runs without
importing itself twice.
"""
