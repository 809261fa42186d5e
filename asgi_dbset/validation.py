"""The validators of every number a set takes, in one place.

``ConnectionSet`` applies them to its arguments, ``db_parallelism`` at
decoration time, and the system checks to ``ASGI_DBSET``, so a bad value gets
the same message wherever it is written.
"""

from __future__ import annotations

# PostgreSQL's statement_timeout is an int of milliseconds.
MAX_STATEMENT_TIMEOUT = 2_147_483.647
# A lease is a short, bounded wait: never longer than this.
MAX_LEASE_TIMEOUT = 60.0


def validate_parallelism(value: object, *, what: str = "parallelism") -> int:
    """Return *value* if it is a usable parallelism, else raise with a fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a whole number of connections such as 1, 2 or 4, "
            f"not {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise ValueError(
            f"{what} must be at least 1 (1 runs the calls one at a time, as stock "
            f"Django does), not {value!r}."
        )
    return value


def validate_statement_timeout(
    value: object, *, what: str = "statement_timeout"
) -> float | None:
    """Return *value* if it is None or a usable number of seconds, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{what} must be a number of seconds such as 2.5, or None for the "
            f"server's own limit, not {type(value).__name__} {value!r}."
        )
    if not 0 < value <= MAX_STATEMENT_TIMEOUT:  # also refuses NaN
        raise ValueError(
            f"{what} must be more than 0 and at most {MAX_STATEMENT_TIMEOUT} seconds "
            f"(PostgreSQL's limit), or None for no limit; not {value!r}."
        )
    return float(value)


def validate_lease_timeout(value: object, *, what: str = "lease_timeout") -> float:
    """Return *value* if it is a usable lease wait in seconds, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{what} must be a number of seconds such as 0.1, not "
            f"{type(value).__name__} {value!r}."
        )
    if not 0 <= value <= MAX_LEASE_TIMEOUT:  # also refuses NaN
        raise ValueError(
            f"{what} must be 0 or more seconds and at most {MAX_LEASE_TIMEOUT} "
            f"(an extra connection is only worth a short wait), not {value!r}."
        )
    return float(value)


def milliseconds(timeout: float | None) -> int | None:
    """A statement timeout as PostgreSQL takes it (0 would mean none)."""
    return None if timeout is None else max(1, round(timeout * 1000))
