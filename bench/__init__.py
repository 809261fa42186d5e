"""Benchmarks of asgi_dbset against stock Django, the ceiling and peers.

``make bench`` runs them; see docs/benchmarks.md. Never part of the test suite.
"""
