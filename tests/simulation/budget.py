"""Seed budget for the simulation tests.

``HYPERMESH_SIM_SEEDS`` multiplies every scenario's seed count: ``0.1`` for a quick
local run, ``10`` for a soak (the default, 1, is what CI runs: >= 500 seeds in a few
minutes on two cores).
"""

from __future__ import annotations

import os


def seed_scale() -> float:
    raw = os.environ.get("HYPERMESH_SIM_SEEDS", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"HYPERMESH_SIM_SEEDS must be a number (a multiplier), got {raw!r}") from None
    if scale <= 0:
        raise ValueError("HYPERMESH_SIM_SEEDS must be > 0")
    return scale


def seeds(count: int, start: int = 0) -> list[int]:
    return list(range(start, start + max(1, round(count * seed_scale()))))
