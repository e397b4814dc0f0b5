"""Request priority for the scheduler: who starts first, who gives way, and ageing.

A sequence's `priority` is vLLM's: an integer, lower is served first, 0 by default.
Waiting sequences start by *effective* priority, then by the per-client turns of
`fair_order` within one level (so priorities order the queue; fairness holds among
equals; with one level this is the queue as it was).

Ageing bounds starvation: while a sequence waits, its effective priority improves by 1
for every `ageing_s` seconds since it last entered the queue, up to the most urgent
priority waiting (`best`):

    effective = max(best, priority - floor(seconds waiting / ageing_s))

so a request at priority p waits at most about (p - q) x ageing_s behind a steady
stream of priority-q work before it is served as one of them, in turn. The cap keeps
requests of one priority at one level however long they wait, so the turns between
clients hold among them (without it, a flood that waited long would outrank a newcomer
of another client). `ageing_s` None: no ageing (a low priority may wait as long as
higher work keeps coming).

When the KV cache is full or every running slot is taken, the next waiting sequence
may preempt running ones whose running priority is strictly worse than its own
priority (ageing orders the queue, it never preempts: among requests of one priority
nothing is preempted, however long they wait), lowest first, most recently started
among equals; they are recomputed later, from their prompt and output, as any
preempted sequence. A running sequence's priority (`running_priority`) is the
effective one it started with: one that aged its way in is not preempted by the work
of the priority it reached. A preempted sequence ages anew from then.

Pure Python; times are the engine's clock (seconds), passed in.
"""

from __future__ import annotations

import math

from app.core import Sequence


def effective_priority(
    seq: Sequence, now: float | None, ageing_s: float | None, best: int | None = None
) -> int:
    """seq's priority improved by its time waiting, up to `best` (no ageing without
    `now`; None: no cap)."""
    if now is None or ageing_s is None:
        return seq.priority
    waited_s = max(0.0, now - seq.waiting_since)
    aged = seq.priority - math.floor(waited_s / ageing_s)
    return aged if best is None else max(best, min(aged, seq.priority))


def priority_levels(
    waiting: list[Sequence], now: float | None, ageing_s: float | None
) -> list[list[Sequence]]:
    """Waiting sequences grouped by effective priority (aged up to the most urgent one
    waiting), most urgent level first; each level in the order of `waiting`."""
    if not waiting:
        return []
    best = min(seq.priority for seq in waiting)
    levels: dict[int, list[Sequence]] = {}
    for seq in waiting:
        levels.setdefault(effective_priority(seq, now, ageing_s, best), []).append(seq)
    return [levels[level] for level in sorted(levels)]


def preemption_victims(running: list[Sequence], priority: int) -> list[Sequence]:
    """Running sequences that a waiting one of `priority` (its own) may preempt, in the
    order they give way: lowest priority (largest number) first, then most recently
    started (the end of `running`, which is in admission order)."""
    worse = [(seq.running_priority, i, seq) for i, seq in enumerate(running)]
    worse = [entry for entry in worse if entry[0] > priority]
    worse.sort(key=lambda entry: (-entry[0], -entry[1]))
    return [seq for _, _, seq in worse]
