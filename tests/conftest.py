"""Shared test helpers.

- `@pytest.mark.needs_kernel("op", ...)`: skip (with the reason) when the compiled extension has
  no CPU kernel for one of the ops yet (widetopo_ext.build_info()["cpu_kernels"]).
- `gen` fixture: a seeded torch.Generator, so every test draws reproducible data.
- `one_thread` fixture: one intra-op thread for the duration of a test (files of tiny-tensor
  tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`).
"""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_kernel(*ops): skip with a reason when an op has no CPU kernel in the built extension"
    )


def pytest_collection_modifyitems(config, items):
    try:
        import widetopo_ext

        cpu = widetopo_ext.build_info()["cpu_kernels"]
    except ImportError as exc:  # reported by the loading tests; do not hide it here
        cpu, why = {}, f"widetopo_ext does not import: {exc}"
    else:
        why = None
    for item in items:
        for marker in item.iter_markers("needs_kernel"):
            missing = [op for op in marker.args if not cpu.get(op, False)]
            if missing:
                reason = why or (f"no CPU kernel for {', '.join(missing)} in the built widetopo_ext._C "
                                 f"(rebuild: python setup.py build_ext --inplace)")
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(20261122)
    return g


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy 2-core machine intra-op threads cost far more than they save.
    The previous thread count is restored, so other tests are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
