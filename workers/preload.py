"""Imported once by the embedded fleet's fork server (broker/forked.py) before it forks any worker:
the heavy modules every worker needs, so that their pages are shared instead of copied per worker."""

import gc

import celery.worker  # noqa: F401
import numpy  # noqa: F401
import redis  # noqa: F401
import torch

# Optimizer.add_param_group imports torch._dynamo (and with it sympy, ~70 MB) on its first call:
# make that call here, on a throwaway parameter, with no computation (no thread pool to fork).
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
# Objects alive now are never touched by the cyclic collector in the workers, so their pages stay shared.
gc.freeze()
