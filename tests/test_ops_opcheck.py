"""torch.library.opcheck on small inputs for every op: schema (mutation/aliasing as declared),
fake-tensor implementation (shapes/dtypes/strides agree with the real kernel), autograd
registration and AOT dispatch (torch.compile's functionalization of the in-place list ops)."""
import pytest
import torch

OPS = torch.ops.widetopo


def _scores(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 4, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype),
            torch.randn(2, 3, 2, generator=g).to(dtype)]


def _masks():
    g = torch.Generator().manual_seed(4)
    return [torch.rand(3, 4, generator=g) < 0.5, torch.rand(5, generator=g) < 0.5, torch.rand(2, 3, 2, generator=g) < 0.5]


def _noise():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(3, 4, generator=g), torch.empty(0), torch.randn(2, 3, generator=g)]


FULL = None  # torch.library.opcheck's default test_utils
# The dtype/list variants re-check the parts that depend on the inputs (schema: mutation and
# aliasing as declared; fake impl: shapes/dtypes/strides match the kernel). Their AOT dispatch
# path is the same as the main case of the op, so it is not re-traced (each trace costs ~1 s).
SCHEMA_FAKE = ("test_schema", "test_autograd_registration", "test_faketensor")

CASES = [
    ("global_threshold-exact", "global_threshold", FULL, lambda: (_scores(), _masks(), 9, "exact")),
    ("global_threshold-official", "global_threshold", SCHEMA_FAKE, lambda: (_scores(torch.float64), _masks(), 9, "official")),
    ("global_threshold-bf16", "global_threshold", SCHEMA_FAKE, lambda: (_scores(torch.bfloat16), _masks(), 0, "exact")),
    ("density_decay_", "density_decay_", FULL, lambda: (_scores(), _masks(), 0.6)),
    ("density_decay_-f16", "density_decay_", SCHEMA_FAKE, lambda: (_scores(torch.float16), _masks(), 0.6)),
    ("restoration_scores", "restoration_scores", FULL, lambda: (_masks(), _noise(), 1e-3)),
    ("accumulate_score_", "accumulate_score_", FULL, lambda: (_scores(), _scores(), _scores(), _masks(), True)),
    ("accumulate_score_-empty-lists", "accumulate_score_", SCHEMA_FAKE, lambda: (_scores(), _scores(), [], [], False)),
    ("masked_sq_norm-grad", "masked_sq_norm", FULL,
     lambda: ([t.requires_grad_() for t in _scores(torch.float64)], _masks())),
    ("masked_sq_norm-bf16-nomask", "masked_sq_norm", SCHEMA_FAKE, lambda: (_scores(torch.bfloat16), [])),
    ("apply_masks_", "apply_masks_", FULL, lambda: (_scores(), _masks())),
    ("mask_stats", "mask_stats", FULL, lambda: (_masks(),)),
]


@pytest.mark.parametrize(
    "name,utils,build",
    [pytest.param(*c[1:], id=c[0], marks=pytest.mark.needs_kernel(c[1])) for c in CASES],
)
def test_opcheck(name, utils, build):
    if utils is None:
        torch.library.opcheck(getattr(OPS, name), build())
    else:
        torch.library.opcheck(getattr(OPS, name), build(), test_utils=utils)
