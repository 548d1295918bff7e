"""Small helpers shared by the scorers: score buffers and dtype matching for the list ops."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores accumulate in float64 for float64 parameters, else in float32 (also for 16-bit
    models, whose per-batch terms would otherwise be summed in half precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def score_zeros(like: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Zero score tensors shaped like `like`, in `dtype` or score_dtype of each tensor."""
    return [torch.zeros(t.shape, dtype=dtype or score_dtype(t), device=t.device) for t in like]


def as_dtypes(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """`tensors` converted to the dtypes of `like` (no copy where they already match); the
    accumulate_score_ op takes one dtype per call."""
    return [t if t.dtype == r.dtype else t.to(r.dtype) for t, r in zip(tensors, like)]
