"""The pruning engine: `Pruner` runs the phases of a method (scoring rounds, thresholding, density
decay, mask restoration) over the pruning set.

    pruner.py      Pruner: setup, the phase loop, the result
    options.py     EngineOptions: every engine knob, with its default and validation
    plan.py        the phase plan (prune / restore / prune again)
    schedule.py    density schedules and the exact keep count
    batches.py     reading, checking and digesting the pruning set
    state.py       the working copies of the model and masks
    rounds.py      one round: score, sum over batches and ranks, select
    restoration.py repeated mask restoration (docs/design.md §2.3)
    checkpoint.py  resumable runs;  progress.py  the progress bar;  rng.py  seeded generators
"""
