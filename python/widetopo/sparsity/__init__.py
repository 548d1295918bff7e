"""Masks and everything read from them: the `Masks` container and its file format, which
parameters are prunable, the unit topology of a weight tensor, applying masks to a model
(torch.nn.utils.prune convention or a MaskEnforcer), effective sparsity and reports.
"""
