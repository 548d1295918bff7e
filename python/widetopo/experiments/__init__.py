"""The papers' experiment: the recipe shared by `widetopo run`, `train` and `compare` (build a model,
load data, prune, train), the training loop, pre-trained starts and the resumable comparison grid.
"""
