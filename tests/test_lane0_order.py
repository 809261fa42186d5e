"""Calls handed to lane 0 reach its thread in the order they were handed out.

Lane 0's reports are numbered in that order (see asgi_dbset.transactions), so
a call handed out later - one its own task queues behind lane 0 at once, say -
must not reach the thread before an earlier one whose task has not resumed
yet. The scheduler keeps the turns; this drives them directly, on a loop, with
no thread and no database.
"""

from __future__ import annotations

import asyncio

from asgi_dbset.records import Recorder
from asgi_dbset.scheduler import Scheduler


def scheduler() -> Scheduler:
    made = Scheduler(
        parallelism=2, lease_timeout=0.1, timeout_ms=None, recorder=Recorder()
    )
    made.bind(asyncio.get_running_loop())
    return made


async def test_a_later_call_waits_for_the_turn_of_an_earlier_one() -> None:
    s = scheduler()
    went: list[int] = []

    async def goes(generation: int) -> None:
        await s._lane0_turn(generation)
        went.append(generation)

    later = asyncio.ensure_future(goes(1))
    await asyncio.sleep(0)
    assert went == []  # generation 0 has not gone yet
    await goes(0)
    await later
    assert went == [0, 1]


async def test_a_call_that_will_not_go_passes_its_turn() -> None:
    s = scheduler()
    went: list[int] = []

    async def goes(generation: int) -> None:
        await s._lane0_turn(generation)
        went.append(generation)

    third = asyncio.ensure_future(goes(2))
    second = asyncio.ensure_future(goes(1))
    await asyncio.sleep(0)
    s._lane0_turn_passed(0)  # its caller gave up before it went
    await second
    await third
    assert went == [1, 2]
    # A turn passed ahead of time is skipped when it comes.
    s._lane0_turn_passed(4)
    await goes(3)
    await goes(5)
    assert went == [1, 2, 3, 5]


async def test_a_call_cancelled_while_waiting_for_its_turn_leaves_it_to_the_caller() -> (
    None
):
    s = scheduler()
    waiting = asyncio.ensure_future(s._lane0_turn(1))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert s._lane0_turns == {}
    # (The caller - Scheduler._run_on - then passes the turn itself.)
    s._lane0_turn_passed(1)
    await s._lane0_turn(0)
    await s._lane0_turn(2)
