"""Test-session settings.

The suite runs as two pytest-xdist workers on two cores. With torch's default of one
OpenMP thread per core, each worker's parallel regions wait on threads the other worker
holds: a 4×4 batched Cholesky then took 8 ms instead of 3 µs. One thread per worker
(and per subprocess, through OMP_NUM_THREADS) keeps the suite fast; tests measure
correctness, never speed.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
