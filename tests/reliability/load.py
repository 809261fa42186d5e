"""Start the client process (:mod:`tests.reliability.client`) from a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.reliability.server import REPO


class Load:
    """``with Load(plan, tmp_path) as load: ...; result = load.wait(60)``.

    The client process is killed on exit if it is still running.
    """

    def __init__(self, plan: dict[str, Any], workdir: Path, name: str = "load") -> None:
        self.plan = plan
        self.plan_path = workdir / f"{name}-plan.json"
        self.out_path = workdir / f"{name}-result.json"
        self.err_path = workdir / f"{name}-stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self) -> None:
        self.plan_path.write_text(json.dumps(self.plan))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.client", str(self.plan_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the client did not finish within {timeout} s: the server hangs"
            ) from None
        if code != 0:
            raise AssertionError(
                f"the client failed ({code}): {self.err_path.read_text()[-2000:]}"
            )
        return dict(json.loads(self.out_path.read_text()))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def drive(
    plan: dict[str, Any], workdir: Path, timeout: float, name: str = "load"
) -> dict[str, Any]:
    with Load(plan, workdir, name) as load:
        return load.wait(timeout)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]
