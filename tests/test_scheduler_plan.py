"""The scheduler's one decision, :func:`asgi_dbset.scheduler.plan`, in isolation.

Plain state in, a plan out: no threads, no event loop, no database.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from asgi_dbset.lanes import Lane
from asgi_dbset.scheduler import Call, Plan, plan
from asgi_dbset.targets import Target
from asgi_dbset.transactions import CLEAR, CREDIT, LANE0, REPORT


def calls(*aliases: str) -> list[Call]:
    return [Call(seq, Target(alias), 0.0) for seq, alias in enumerate(aliases)]


def chunks() -> Iterator[int]:
    yield 1


def with_cursor(call: Call) -> Call:
    """*call*, made an aiterator() chunk (its target names a cursor)."""
    call.target = Target(call.target.alias, cursor=chunks())  # type: ignore[arg-type]
    return call


def lanes(
    *extra: str, busy: Iterable[int] = (), leasing: Iterable[int] = ()
) -> list[Lane]:
    made = [Lane(0)] + [Lane(i, alias) for i, alias in enumerate(extra, start=1)]
    for lane in made[1:]:
        lane.leased = True
    for index in busy:
        made[index].jobs = 1
    for index in leasing:
        made[index].leased = False
    return made


def decide(
    queue: list[Call],
    set_lanes: list[Lane],
    *,
    parallelism: int = 4,
    verdict: str = CLEAR,
    likely_clear: bool = True,
    pinned: dict[int, Lane] | None = None,
    may_lease: bool = True,
    pinning: Iterable[Lane] = (),
) -> Plan:
    pins = pinned or {}
    holding = set(pinning)
    return plan(
        queue,
        set_lanes,
        parallelism=parallelism,
        verdict=lambda alias: verdict,
        likely_clear=lambda alias: likely_clear,
        pinned_to=lambda call: pins.get(call.seq),
        may_lease=lambda alias: may_lease,
        pinning=lambda lane: lane in holding,
    )


def handed(decided: Plan) -> list[tuple[int, int, str]]:
    return [(call.seq, lane.index, how) for call, lane, how in decided.hand_outs]


def test_an_idle_lane_0_takes_the_first_call_and_extra_lanes_the_next_on_credit() -> (
    None
):
    decided = decide(
        calls("default", "default", "default"), lanes("default", "default")
    )
    # Lane 0 has not reported for its new call: the others go on credit.
    assert handed(decided) == [(0, 0, "lane0"), (1, 1, CREDIT), (2, 2, CREDIT)]
    assert decided.leases == []


def test_first_come_first_served() -> None:
    queue = calls("default", "default", "default")
    decided = decide(queue, lanes("default", busy=[0]))
    assert handed(decided) == [(0, 1, CLEAR)]
    # The others wait; one more lane is leased for them (parallelism 4: 2 left).
    assert decided.leases == ["default", "default"]


def test_a_call_that_cannot_run_does_not_keep_a_later_one_off_another_lane() -> None:
    queue = calls("other", "default")
    decided = decide(queue, lanes("default", busy=[0]), may_lease=False)
    assert handed(decided) == [(1, 1, CLEAR)]


def test_a_cursor_waits_for_its_own_lane() -> None:
    set_lanes = lanes("default", "default", busy=[0, 1])
    queue = calls("default", "default")
    with_cursor(queue[0])
    decided = decide(queue, set_lanes, pinned={0: set_lanes[1]})
    # The cursor's chunk waits for lane 1; the next call takes lane 2.
    assert handed(decided) == [(1, 2, CLEAR)]


def test_inside_a_transaction_calls_wait_for_lane_0_and_lease_nothing() -> None:
    decided = decide(
        calls("default", "default"),
        lanes("default", busy=[0]),
        verdict=LANE0,
        likely_clear=False,
    )
    assert handed(decided) == []
    assert decided.leases == []
    assert not decided.want_report


def test_a_report_still_to_come_after_a_transaction_is_waited_for_on_the_loop() -> None:
    decided = decide(
        calls("default"), lanes("default", busy=[0]), verdict=REPORT, likely_clear=False
    )
    assert handed(decided) == []
    assert decided.want_report


def test_a_call_that_can_only_wait_for_lane_0_queues_on_its_thread() -> None:
    # No other lane, and none can be leased: behind lane 0, one after another.
    decided = decide(calls("default", "default"), lanes(busy=[0]), may_lease=False)
    assert handed(decided) == [(0, 0, "behind"), (1, 0, "behind")]
    # Inside a transaction the same holds (its calls must run on lane 0).
    decided = decide(
        calls("default"), lanes(busy=[0]), verdict=LANE0, likely_clear=False
    )
    assert handed(decided) == [(0, 0, "behind")]
    # When a lane can be leased, the call waits for it instead.
    decided = decide(calls("default"), lanes(busy=[0]))
    assert handed(decided) == []
    assert decided.leases == ["default"]


def test_nothing_goes_behind_lane_0_ahead_of_a_call_that_waits() -> None:
    set_lanes = lanes(busy=[0])
    queue = calls("default", "default")
    with_cursor(queue[0])
    # The first call's cursor is on lane 0: it is behind lane 0 too, in order.
    decided = decide(queue, set_lanes, pinned={0: set_lanes[0]}, may_lease=False)
    assert handed(decided) == [(0, 0, "behind"), (1, 0, "behind")]


def test_lanes_beyond_a_lowered_parallelism_go_back_when_idle() -> None:
    set_lanes = lanes("default", "default", "default", busy=[2])
    decided = decide(calls("default", "default"), set_lanes, parallelism=2)
    # Two lanes too many: the idle ones go back at once (the busy one stays,
    # the set's one extra lane now); no call goes to a lane that goes back.
    assert [lane.index for lane in decided.returns] == [1, 3]
    assert handed(decided) == [(0, 0, "lane0")]
    # Lowered to 1, the busy lane takes no new call and goes back once idle.
    decided = decide(calls("default", "default"), set_lanes, parallelism=1)
    assert [lane.index for lane in decided.returns] == [1, 3]
    assert handed(decided) == [(0, 0, "lane0")]
    set_lanes[2].jobs = 0
    decided = decide([], set_lanes, parallelism=1)
    assert [lane.index for lane in decided.returns] == [1, 2, 3]


def test_a_lane_holding_an_open_cursor_stays() -> None:
    set_lanes = lanes("default", "default")
    decided = decide([], set_lanes, parallelism=2, pinning=[set_lanes[2]])
    assert [lane.index for lane in decided.returns] == [1]


def test_broken_lanes_take_no_call_and_go_back_when_idle() -> None:
    set_lanes = lanes("default", "default", busy=[0, 2])
    set_lanes[1].broken = set_lanes[2].broken = True
    decided = decide(calls("default"), set_lanes, may_lease=False)
    assert [lane.index for lane in decided.returns] == [1]
    assert handed(decided) == []


def test_leases_cover_the_calls_left_less_the_idle_lanes() -> None:
    set_lanes = lanes("default", busy=[0], leasing=[1])
    queue = calls("default", "default", "default", "other")
    decided = decide(queue, set_lanes, parallelism=8)
    # Lane 1 (still leasing) takes the first call; two more for "default",
    # one for "other".
    assert handed(decided) == [(0, 1, CLEAR)]
    assert sorted(decided.leases) == ["default", "default", "other"]
    assert decide(queue, set_lanes, parallelism=3).leases == ["default"]
    assert decide(queue, set_lanes, may_lease=False).leases == []


def test_a_lane_holding_a_cursor_beyond_the_parallelism_serves_only_its_cursor() -> (
    None
):
    set_lanes = lanes("default", busy=[0])
    queue = calls("default", "default")
    with_cursor(queue[1])
    decided = decide(
        queue,
        set_lanes,
        parallelism=1,
        pinned={1: set_lanes[1]},
        pinning=[set_lanes[1]],
    )
    # Lane 1 is one lane too many: the plain call waits for lane 0, the chunk
    # of lane 1's cursor runs there, and the lane is not returned.
    assert handed(decided) == [(1, 1, "pinned")]
    assert decided.returns == []


def test_a_long_queue_still_reaches_a_cursor_whose_lane_is_free() -> None:
    set_lanes = lanes("default", busy=[0])
    queue = calls(*["default"] * 50)
    with_cursor(queue[-1])
    decided = decide(
        queue,
        set_lanes,
        parallelism=1,
        pinned={49: set_lanes[1]},
        pinning=[set_lanes[1]],
    )
    assert handed(decided) == [(49, 1, "pinned")]


def test_a_long_queue_with_nothing_free_is_not_scanned_to_its_end() -> None:
    set_lanes = lanes("default", busy=[0, 1])
    queue = calls(*["default"] * 1000)
    seen: list[int] = []

    def pinned_to(call: Call) -> Lane | None:
        seen.append(call.seq)
        return None

    for call in queue:
        with_cursor(call)  # (so that the plan asks where each call is pinned)
    plan(
        queue,
        set_lanes,
        parallelism=2,
        verdict=lambda alias: CLEAR,
        likely_clear=lambda alias: True,
        pinned_to=pinned_to,
        may_lease=lambda alias: True,
        pinning=lambda lane: False,
    )
    assert len(seen) < 5
