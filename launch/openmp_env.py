"""A short OpenMP spin for the processes the ``shardface`` command runs (set before torch loads).

After each parallel region, libgomp's threads (torch's intra-op pool on the CPU) spin for a
while before they sleep: with neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` set, 300,000
rounds, milliseconds.  The classifier runs its row loops on threads of its own between torch's
parallel ops (``partial_fc.block_threads``), and on a machine with as many threads as cores
those spinning threads hold the cores that the row threads need: a one-rank classifier step on
two cores measured 5-10% slower.  Ten thousand rounds keep back-to-back ops on warm threads and
end the spin within tens of microseconds.  libgomp reads the variable when it loads, so it is set
before anything imports torch, and torchrun's workers inherit it; a value the user set is kept.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_ROUNDS = "10000"


def short_openmp_spin(env: MutableMapping[str, str] = os.environ) -> None:
    """Set ``GOMP_SPINCOUNT`` in ``env`` unless the user chose a wait policy or a spin count."""
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = SPIN_ROUNDS
