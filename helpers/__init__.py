"""CIFAR-10 training helpers: one flat package. From a clone it is imported from the repository root; after
`pip install -e .` (see pyproject.toml) from anywhere.

Layers, each importing only those before it (tests/test_structure.py checks there is no cycle):
utils · data (loading, augmentation, DataLoader and GpuLoader) · distributed · models · config (TrainConfig, the
recipe table) · checkpoints (the one reader and writer of checkpoint files) · engine (TrainStep and its execution
modes) · train (fit, evaluate, History) · lr_finder · gradcam · plots · provenance (what a run records of where it
came from) · board (TensorBoard logs) · run (one run: data, model, fit, outputs, the run folder) · cli (the command
line: `cifar10 COMMAND`, `python -m helpers COMMAND`; `python -m helpers.train` trains) · predict · compare · demo
· sweep · export (ONNX, safetensors, a PyTorch file; hubconf.py builds on it).
Modules are imported explicitly (`from helpers.train import fit`), so that `python -m helpers.train` runs without
importing itself twice.
"""

__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it, runs record it (metrics.json)
