"""Errors raised by asgi_dbset."""

from __future__ import annotations


class OrphanedIteratorError(RuntimeError):
    """An ``aiterator()`` was resumed after the connection set that ran it ended."""

    __module__ = "asgi_dbset"
