"""CIFAR-10 training helpers: one flat package, imported from the repository root (no install step).

data (loading, recipes, loaders) · models (registry) · train (fit, evaluate, the command line) ·
lr_finder · gradcam · plots. Modules are imported explicitly (`from helpers.train import fit`), so that
`python -m helpers.train` runs without importing itself twice.
"""
