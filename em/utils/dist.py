"""Which process this is: one helper for every part of em (training, probes, adapter saving, sweeps).

Inside an initialised process group the answer comes from ``torch.distributed``; before one exists (a sweep job
deciding whether to write results.json, a resume deciding who moves metrics.csv) from the variables the
launchers set: torchrun (``RANK``/``WORLD_SIZE``) or srun (``SLURM_PROCID``/``SLURM_NTASKS``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def _env_int(env: Mapping[str, str], *keys: str, default: int) -> int:
    for key in keys:
        v = env.get(key)
        if v not in (None, "") and str(v).isdigit():
            return int(v)
    return default


def rank_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(global rank, world size) of this process."""
    if env is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        env = os.environ
    return _env_int(env, "RANK", "SLURM_PROCID", default=0), _env_int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)


def global_rank(env: Mapping[str, str] | None = None) -> int:
    return rank_world(env)[0]


def is_global_zero(strategy=None) -> bool:
    """Whether this process writes what only one process writes (a strategy's own answer when given)."""
    if strategy is not None and hasattr(strategy, "is_global_zero"):
        return bool(strategy.is_global_zero)
    return global_rank() == 0
