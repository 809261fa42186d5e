"""The example's pure helpers: the timeline layout, number formatting, the router."""

from __future__ import annotations

import pytest

from asgi_dbset.dbset import CallRecord
from asgi_dbset.history import RequestSummary
from example_site.asgi import PrefixRouter
from example_site.shop.panels import parse_latency
from example_site.shop.templatetags.shop_format import grouped
from example_site.shop.timeline import build_timeline, entry_point, ticks_for


def summary(path: str, wall: float, *records: CallRecord) -> RequestSummary:
    return RequestSummary(path, 100.0, 100.0 + wall, {"calls": len(records)}, records)


def test_requests_share_one_scale_newest_first() -> None:
    slow = summary(
        "/slow/",
        0.2,
        CallRecord(0, "default", "count", 100.0, 100.0, 100.1),
        CallRecord(1, "default", "_fetch_all", 100.0, 100.05, 100.2),
    )
    fast = summary(
        "/fast/", 0.1, CallRecord(0, "default", "aggregate", 100.0, 100.0, 100.05)
    )
    timeline = build_timeline([slow, fast])
    assert [r.path for r in timeline.requests] == ["/fast/", "/slow/"]
    assert timeline.scale_ms == pytest.approx(200)
    fast_row, slow_row = timeline.requests
    assert fast_row.width == pytest.approx(50)
    (bar,) = fast_row.lanes[0].bars
    assert (bar.name, bar.left, bar.width) == ("aaggregate", 0, pytest.approx(25))
    lane0, lane1 = slow_row.lanes
    assert [lane0.lane, lane1.lane] == [0, 1]
    (fetch,) = lane1.bars
    assert fetch.name == "async for"
    assert fetch.left == pytest.approx(25)
    assert fetch.wait_width == pytest.approx(25)  # queued from 0 to 50 ms
    assert "queued for a lane" in fetch.title


def test_limit_and_unrecorded_requests() -> None:
    requests = [summary(f"/{i}/", 0.01) for i in range(5)]
    timeline = build_timeline(requests, limit=3)
    assert [r.path for r in timeline.requests] == ["/4/", "/3/", "/2/"]
    assert [r.number for r in timeline.requests] == [5, 4, 3]
    assert timeline.hidden == 2
    assert not timeline.requests[0].recorded
    assert build_timeline([]).requests == []


def test_ticks_are_round() -> None:
    assert [label for _, label in ticks_for(1192)] == [
        f"{n} ms" for n in range(0, 1001, 200)
    ]
    assert ticks_for(7)[-1] == (pytest.approx(100 * 7 / 7), "7 ms")


def test_entry_point_names() -> None:
    assert entry_point("count") == "acount"
    assert entry_point("_fetch_all") == "async for"
    assert entry_point("next_slice") == "aiterator chunk"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (58966801, "58,966,801"),
        ("1234.50", "1,234.50"),
        ("-1234", "-1,234"),
        ("n/a", "n/a"),
    ],
)
def test_grouped(value: object, shown: str) -> None:
    assert grouped(value) == shown


@pytest.mark.parametrize("prefix", ["starlette", "/starlette/"])
def test_router_refuses_a_malformed_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="leading and no trailing slash"):
        PrefixRouter({prefix: PrefixRouter({}, default=None)}, default=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["soon", "-5", "nan", "2001"])
def test_latency_outside_its_range_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="latency must be"):
        parse_latency(raw)


def test_latency_is_given_in_milliseconds() -> None:
    assert parse_latency("50") == 0.05
    assert parse_latency(None) == 0.0
