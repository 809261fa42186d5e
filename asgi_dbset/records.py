"""What a set records of its calls, and the figures it reports from them.

A call is timed from the moment it is made (``queued``) to the moment its
lane's thread starts it (``started``, the end of its wait) and ends it
(``ended``). Both ends of the query time are taken where the call runs, so
time spent queued - in the set, or on lane 0's thread behind the calls before
it - is counted as waiting, never as query time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import stats

# The most calls a set keeps a record of (for introspection and timelines).
MAX_RECORDS = 512


@dataclass(slots=True)
class CallRecord:
    """One call a set ran: which lane, which alias, when (perf_counter seconds)."""

    lane: int
    alias: str
    name: str
    queued: float
    started: float
    ended: float = 0.0


class Recorder:
    """The records and counts of one set's calls."""

    __slots__ = ("calls", "records", "wait_time")

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.calls = 0
        #: Seconds the set's ended calls spent queued before they started.
        self.wait_time = 0.0

    def begin(
        self, lane: int, alias: str, func: Callable[..., Any], queued: float
    ) -> CallRecord:
        """Count a call handed to a lane now in the set's figures (its start
        is taken again when its thread starts it, and the process-wide count
        is taken when it ends: see :meth:`end`)."""
        record = CallRecord(
            lane, alias, getattr(func, "__name__", "?"), queued, time.perf_counter()
        )
        self.calls += 1
        if len(self.records) < MAX_RECORDS:
            self.records.append(record)
        return record

    def end(self, record: CallRecord, started: float, ended: float) -> None:
        """The call is over; *started* and *ended* are when its thread started
        and ended it (0.0 if it did not: then it ends now). Its wait is
        counted here, once."""
        record.ended = ended or time.perf_counter()
        # Counted once it is over, never at begin(): a call begun, then
        # forgotten (its lease refused) and begun again on lane 0 would take
        # the process-wide counter - an OpenTelemetry counter, which must
        # never go down - one down and up again.
        stats.incr("calls")
        if started:
            record.started = started
        self.wait_time += max(record.started - record.queued, 0.0)

    def forget(self, record: CallRecord) -> None:
        """The call did not run after all (its lane's lease was refused, or lane
        0's report kept it off its lane): it is queued again and counted when
        it runs."""
        self.calls -= 1
        for i, kept in enumerate(self.records):
            if kept is record:  # (by identity: two records may be equal)
                del self.records[i]
                break

    def lanes_used(self) -> int:
        return len({record.lane for record in self.records})

    def figures(
        self, *, parallelism: int, opened_at: float, closed_at: float
    ) -> dict[str, Any]:
        """What the set did, in milliseconds: its wall time against the sum of
        its calls' times (their ratio is the parallel gain), and the time calls
        spent queued for a lane."""
        end = closed_at or time.perf_counter()
        wall = (end - opened_at) * 1000 if opened_at else 0.0
        query = sum(max(r.ended - r.started, 0.0) for r in self.records) * 1000
        per_lane = Counter(r.lane for r in self.records)
        return {
            "parallelism": parallelism,
            "lanes_used": len(per_lane),
            "calls": self.calls,
            "calls_per_lane": dict(sorted(per_lane.items())),
            "wait_ms": round(self.wait_time * 1000, 3),
            "query_ms": round(query, 3),
            "wall_ms": round(wall, 3),
            "gain": round(query / wall, 3) if wall else 0.0,
        }


class Unrecorded(Recorder):
    """The recorder of a set's own question (no ORM call of the program's):
    it keeps no record and counts nothing, in the set's figures or the
    process's counters."""

    __slots__ = ()

    def begin(
        self, lane: int, alias: str, func: Callable[..., Any], queued: float
    ) -> CallRecord:
        return CallRecord(lane, alias, getattr(func, "__name__", "?"), queued, 0.0)

    def end(self, record: CallRecord, started: float, ended: float) -> None:
        pass

    def forget(self, record: CallRecord) -> None:
        pass
