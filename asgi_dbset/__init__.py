"""Run a Django request's async ORM queries in parallel, within a budget."""

from __future__ import annotations

__version__ = "0.1.0.dev0"
