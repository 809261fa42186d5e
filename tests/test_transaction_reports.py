"""Lane 0's transaction reports (asgi_dbset.transactions), in isolation.

The loop's side is plain calls; a lane's thread side runs on a real thread
that the test joins. No sleeps: every wait ends on an event the test sets.
"""

from __future__ import annotations

import threading

from asgi_dbset.transactions import (
    CLEAR,
    CREDIT,
    EVERY_ALIAS,
    LANE0,
    REPORT,
    TransactionReports,
)

NONE: frozenset[str] = frozenset()


def test_before_any_report_calls_go_on_credit() -> None:
    reports = TransactionReports()
    reports.next_generation()
    assert reports.verdict("default") == CREDIT
    assert reports.likely_clear("default")


def test_the_report_of_lane_0s_latest_call_decides() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    reports.post(g, NONE)
    assert reports.verdict("default") == CLEAR
    # Lane 0's next call: its report is due, and it may say otherwise (code the
    # set never saw may have opened a transaction on lane 0's thread).
    g = reports.next_generation()
    assert reports.verdict("default") == CREDIT
    reports.post(g, frozenset({"default"}))
    assert reports.verdict("default") == LANE0
    # (A call for another database may touch this one - a receiver, a
    # router - where stock runs it inside lane 0's transaction.)
    assert reports.verdict("other") == LANE0
    # Last seen inside one: the next report is waited for on the loop.
    reports.next_generation()
    assert not reports.likely_clear("default")
    assert reports.verdict("default") == REPORT
    assert reports.verdict("other") == REPORT


def test_a_withdrawn_call_keeps_its_calls_on_lane_0() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    reports.withdraw(g)
    assert reports.verdict("default") == LANE0
    # A report posted before the withdrawal stands.
    g = reports.next_generation()
    reports.post(g, NONE)
    reports.withdraw(g)
    assert reports.verdict("default") == CLEAR


def test_a_new_sync_caller_makes_lane_0_unknown_until_it_reports() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    reports.post(g, NONE)
    reports.forget()
    assert reports.verdict("default") == REPORT
    told: list[int] = []
    assert reports.want(told.append)  # (not posted for the new thread yet)
    g = reports.next_generation()
    assert reports.verdict("default") == CREDIT
    reports.post(g, NONE)
    assert told == [g]


def test_the_loop_is_told_once_when_the_report_it_wants_comes() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    told: list[int] = []
    assert reports.want(told.append)
    assert reports.post(g, NONE)  # somebody waited
    assert told == [g]
    assert not reports.post(g + 1, NONE)  # nobody waits any more
    assert told == [g]
    # Wanted when it is already in: nothing to wait for.
    assert not reports.want(told.append)


def wait_on_a_thread(
    reports: TransactionReports, generation: int, alias: str
) -> tuple[threading.Thread, list[bool], threading.Event]:
    answer: list[bool] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        answer.append(reports.wait_clear(generation, alias, timeout=30))

    thread = threading.Thread(target=wait)
    thread.start()
    waiting.wait(30)
    return thread, answer, waiting


def test_an_extra_lane_runs_its_call_on_credit_only_if_the_report_clears_it() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    cleared, answer_a, _ = wait_on_a_thread(reports, g, "other")
    reports.post(g, NONE)
    cleared.join(30)
    assert answer_a == [True]
    # Lane 0 inside a transaction of any database keeps every call.
    g = reports.next_generation()
    kept_a, answer_b, _ = wait_on_a_thread(reports, g, "other")
    kept_b, answer_c, _ = wait_on_a_thread(reports, g, "default")
    reports.post(g, frozenset({"default"}))
    kept_a.join(30)
    kept_b.join(30)
    assert answer_b == answer_c == [False]


def test_an_extra_lane_stops_waiting_when_the_report_will_not_come() -> None:
    reports = TransactionReports()
    g = reports.next_generation()
    thread, answer, _ = wait_on_a_thread(reports, g, "default")
    reports.withdraw(g)
    thread.join(30)
    assert answer == [False]


def test_a_report_of_an_earlier_call_does_not_clear_a_later_one() -> None:
    reports = TransactionReports()
    first = reports.next_generation()
    second = reports.next_generation()
    thread, answer, _ = wait_on_a_thread(reports, second, "default")
    reports.post(first, NONE)  # not the report it waits for
    reports.post(second, frozenset({"default"}))
    thread.join(30)
    assert answer == [False]


def test_a_call_for_every_alias_is_clear_only_outside_every_transaction() -> None:
    """sync_to_lane's calls may touch any database."""
    reports = TransactionReports()
    g = reports.next_generation()
    reports.post(g, frozenset({"other"}))
    assert reports.verdict("default") == LANE0
    assert reports.verdict(EVERY_ALIAS) == LANE0
    g = reports.next_generation()
    assert not reports.likely_clear(EVERY_ALIAS)
    reports.post(g, NONE)
    assert reports.verdict(EVERY_ALIAS) == CLEAR
    g = reports.next_generation()
    reports.post(g, frozenset({"default"}))
    done: list[bool] = []
    thread = threading.Thread(
        target=lambda: done.append(reports.wait_clear(g, EVERY_ALIAS, 5))
    )
    thread.start()
    thread.join(10)
    assert done == [False]
