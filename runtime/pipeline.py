"""Pipeline schedules as per-stage instruction lists (Alpa's per-worker RUN lists).

``("F", m)`` runs microbatch m's forward on this stage, ``("B", m)`` its backward; sends and
receives are inside those tasks. Every stage walks its own list; the update runs after the
last entry. Both schedules have the same latency; 1F1B (PipeDream-flush) keeps at most
``stages - stage`` microbatches of activations alive, GPipe all of them.
"""

from __future__ import annotations

Task = tuple[str, int]


def schedule(kind: str, stage: int, stages: int, microbatches: int) -> list[Task]:
    if kind == "gpipe":
        return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
    if kind != "1f1b":
        raise ValueError(f"unknown pipeline schedule {kind!r}")
    warmup = min(stages - stage - 1, microbatches)
    tasks: list[Task] = [("F", m) for m in range(warmup)]
    for i in range(microbatches - warmup):
        tasks += [("F", warmup + i), ("B", i)]
    tasks += [("B", m) for m in range(microbatches - warmup, microbatches)]
    return tasks
