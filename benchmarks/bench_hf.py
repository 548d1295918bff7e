"""Every registered method on tiny Hugging Face models fed dict batches (docs/architectures.md,
"Hugging Face models"): prints a markdown table of what each (model, method) cell does with the
method's default options and schedule - works (with the prune time and the prunable tensors
left with no weight), or the error it refuses with.

    OMP_NUM_THREADS=1 PYTHONPATH=python:. python benchmarks/bench_hf.py [density]

The models and batches are those of tests/test_hf_models.py (ViT, BERT, GPT-2, ResNet built from
tiny configs, never downloaded; attention_mask with padding and labels inside the batch).
"""
import logging
import sys
import time

import torch

import widetopo
from widetopo.methods import method_names
from tests.test_hf_models import MODELS


class _Collapsed(logging.Handler):
    """Counts the tensors the engine reports as keeping no weight."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.tensors = 0

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("no weights kept in"):
            self.tensors += int(msg.split()[4])


NOTES = []  # the refusal messages, numbered in the table


def _note(exc) -> str:
    text = f"{type(exc).__name__}: {str(exc).split(';')[0]}"
    if text not in NOTES:
        NOTES.append(text)
    return f"({NOTES.index(text) + 1})"


def cell(build, method, density):
    model, batches = build()
    handler = _Collapsed()
    log = logging.getLogger("widetopo")
    log.addHandler(handler)
    start = time.perf_counter()
    try:
        widetopo.prune(model, batches, density, method=method, seed=0, verbose=False)
    except (widetopo.WidetopoError, ValueError, TypeError) as exc:  # refusals (bad input errors included)
        return f"refused {_note(exc)}"
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        return f"FAILS {_note(exc)}"
    finally:
        log.removeHandler(handler)
    took = time.perf_counter() - start
    return f"works ({took:.2f} s" + (f"; {handler.tensors} empty" if handler.tensors else "") + ")"


def main():
    density = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    methods = method_names()
    print(f"density {density}, default options and schedules, torch {torch.__version__}\n")
    print("| method | " + " | ".join(MODELS) + " |")
    print("|---|" + "---|" * len(MODELS))
    for method in methods:
        row = [cell(build, method, density) for build in MODELS.values()]
        print(f"| {method} | " + " | ".join(row) + " |", flush=True)
    print()
    for i, text in enumerate(NOTES, 1):
        print(f"({i}) {text}")


if __name__ == "__main__":
    main()
