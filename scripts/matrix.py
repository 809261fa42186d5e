#!/usr/bin/env python3
"""Create the test virtualenvs and run pytest in each Django x Python cell.

    python3 scripts/matrix.py venv A            # make sure .venv is ready, print its path
    python3 scripts/matrix.py test [--cells A,B,C] [-- PYTEST ARGS...]

A cell whose interpreter cannot be found (on PATH as pythonX.Y, or under pyenv) is
reported as not available and does not fail the run, unless --require-all is given.
A run fails when any cell fails or when no cell ran at all.

This script only uses the standard library and runs on any Python 3.8+, so that it can
bootstrap a machine whose default python3 is older than the project needs.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
STAMP_NAME = ".asgi-dbset-stamp"
# pytest's exit code when it collected nothing: never a success for a matrix cell.
PYTEST_NO_TESTS = 5
# A hung cell must fail the run, not stall CI: seconds one pytest run may take.
DEFAULT_CELL_TIMEOUT = 600.0


@dataclass(frozen=True)
class Cell:
    name: str
    django: str  # the pip requirement that pins the Django line
    django_label: str
    python: str  # "3.11"
    venv: str
    # The main cell falls back to the default python3 when it is not exactly
    # self.python, because lint, type checks and the demo need one venv anyway.
    main: bool = False
    # Further pip requirements, e.g. a dependency held at its lowest version.
    pins: tuple[str, ...] = ()
    # Environment variables of its pytest run, and the tests it runs (before
    # any PYTEST_ARGS); empty: pytest's own default, every test.
    env: tuple[tuple[str, str], ...] = ()
    tests: tuple[str, ...] = ()


CELLS = (
    Cell("A", "django>=5.2,<5.3", "Django 5.2", "3.11", ".venv", main=True),
    Cell("B", "django>=6.1,<6.2", "Django 6.1", "3.12", ".venv-dj61-py312"),
    Cell("C", "django>=6.1,<6.2", "Django 6.1", "3.13", ".venv-dj61-py313"),
    # Django 6.0 still gets security fixes (until April 2027), and pyproject.toml
    # allows it: the hop replaces Django's async entry points, so it is tested too.
    Cell("F", "django>=6.0,<6.1", "Django 6.0", "3.12", ".venv-dj60-py312"),
    # The lowest asgiref pyproject.toml allows: the hop and the lanes rely on
    # its Local, SyncToAsync and AsyncToSync internals.
    Cell(
        "D",
        "django>=5.2,<5.3",
        "Django 5.2, asgiref 3.9.1",
        "3.11",
        ".venv-dj52-asgiref391",
        pins=("asgiref==3.9.1",),
    ),
    # The suite through a real PgBouncer in transaction pooling mode, started
    # by tests/settings.py (tests/pgbouncer.py): Django's connections go
    # through it. The reliability tests that watch the server's connections
    # one by one stay direct, but for the two that are about PgBouncer too.
    Cell(
        "E",
        "django>=5.2,<5.3",
        "Django 5.2 through PgBouncer",
        "3.11",
        ".venv",
        main=True,
        env=(("ASGI_DBSET_TEST_PGBOUNCER", "1"),),
        tests=(
            "tests/test_*.py",
            "tests/example",
            "tests/reliability/test_disconnects.py",
            "tests/reliability/test_statement_timeout_server.py",
            "tests/reliability/test_pgbouncer_processes.py",
        ),
    ),
)


class Interpreter(NamedTuple):
    path: str
    version: str  # "3.12.1"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


class CellUnavailableError(Exception):
    """No usable interpreter for a cell."""


def say(message: str) -> None:
    print(message, flush=True)


def header(title: str) -> None:
    say("")
    say(f"===== {title} =====")


def probe(executable: str) -> tuple[Interpreter | None, str]:
    """Run an interpreter to learn its version; a pyenv shim may exist and fail."""
    probe_code = (
        "import sys, venv, ensurepip; "
        "print('%d.%d.%d' % sys.version_info[:3]); print(sys.executable)"
    )
    try:
        result = subprocess.run(
            [executable, "-c", probe_code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{executable}: {exc}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["exited non-zero"])[-1]
        return None, f"{executable}: {last}"
    version, real = result.stdout.split()[:2]
    return Interpreter(real, version), ""


def pyenv_root() -> Path | None:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            out = subprocess.run(
                [pyenv, "root"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return Path(out)
    default = Path.home() / ".pyenv"
    return default if default.is_dir() else None


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"/versions/(\d+)\.(\d+)\.(\d+)/", path)
    return tuple(int(part) for part in match.groups()) if match else (0,)


def candidates(cell: Cell, default_python: str) -> list[str]:
    found: list[str] = []
    if cell.main:
        found.append(default_python)
    on_path = shutil.which(f"python{cell.python}")
    if on_path:
        found.append(on_path)
    root = pyenv_root()
    if root is not None:
        pattern = str(
            root / "versions" / f"{cell.python}.*" / "bin" / f"python{cell.python}"
        )
        # Plain releases only (3.13.0, not 3.13.0t or 3.13-dev), newest first.
        paths = [p for p in glob.glob(pattern) if re.search(r"/\d+\.\d+\.\d+/bin/", p)]
        found.extend(sorted(paths, key=_version_key, reverse=True))
    return found


def find_interpreter(cell: Cell, default_python: str) -> tuple[Interpreter, str]:
    """Return the interpreter for a cell and a note about how it was chosen."""
    problems: list[str] = []
    fallback: Interpreter | None = None
    for candidate in candidates(cell, default_python):
        interpreter, problem = probe(candidate)
        if interpreter is None:
            problems.append(problem)
            continue
        if interpreter.minor == cell.python:
            return interpreter, ""
        if cell.main and fallback is None and _at_least(interpreter.version, "3.11"):
            fallback = interpreter
    if fallback is not None:
        return fallback, (
            f"no Python {cell.python} found; using {default_python} "
            f"(Python {fallback.version}) instead"
        )
    detail = "; ".join(problems) if problems else "none found"
    raise CellUnavailableError(
        f"no working python{cell.python} on PATH or under pyenv ({detail})"
    )


def _at_least(version: str, minimum: str) -> bool:
    def as_tuple(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2])

    return as_tuple(version) >= as_tuple(minimum)


def stamp_key(cell: Cell, interpreter: Interpreter) -> str:
    digest = hashlib.sha256()
    digest.update((REPO / "pyproject.toml").read_bytes())
    digest.update(f"\0{cell.django}\0{cell.pins}\0{interpreter.version}".encode())
    return digest.hexdigest()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_version(venv: Path) -> str | None:
    python = venv_python(venv)
    if not python.exists():
        return None
    interpreter, _ = probe(str(python))
    return interpreter.version if interpreter else None


def ensure_venv(cell: Cell, interpreter: Interpreter) -> Path:
    """Create the cell's venv and install the project into it, unless its stamp is current."""
    venv = REPO / cell.venv
    stamp = venv / STAMP_NAME
    key = stamp_key(cell, interpreter)
    current = venv_version(venv)
    if (
        current == interpreter.version
        and stamp.exists()
        and stamp.read_text().strip() == key
    ):
        return venv

    if current != interpreter.version:
        say(
            f"creating {cell.venv} with Python {interpreter.version} ({interpreter.path})"
        )
        subprocess.run(
            [interpreter.path, "-m", "venv", "--clear", str(venv)], check=True
        )
    python = str(venv_python(venv))
    say(
        f"installing asgi-dbset[dev], {' '.join((cell.django, *cell.pins))} into {cell.venv}"
    )
    started = time.monotonic()
    # An old pip cannot install a pyproject-only project in editable mode.
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip>=23.1"],
        cwd=REPO,
        check=True,
    )
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "-e",
            ".[dev]",
            cell.django,
            *cell.pins,
        ],
        cwd=REPO,
        check=True,
    )
    stamp.write_text(key + "\n")
    say(f"{cell.venv} ready in {time.monotonic() - started:.1f} s")
    return venv


def run_with_timeout(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> int | None:
    """Run pytest (with *env* added to the environment); on timeout dump its
    threads' stacks, kill it, return None."""
    # Its own process group, so servers that tests started go down with it.
    process = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, env={**os.environ, **(env or {})}
    )
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(
            f"pytest ran longer than {timeout:.0f} s; dumping its stacks, then killing it"
        )
        # pytest enables faulthandler, which prints every thread's stack on SIGABRT.
        process.send_signal(signal.SIGABRT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        return None
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise


def select(names: str) -> list[Cell]:
    wanted = [n.strip().upper() for n in re.split(r"[,\s]+", names) if n.strip()]
    by_name = {cell.name: cell for cell in CELLS}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(
            f"Unknown cell(s) {', '.join(unknown)}; choose from {', '.join(by_name)}."
        )
    return [by_name[n] for n in wanted]


def cmd_venv(args: argparse.Namespace) -> int:
    (cell,) = select(args.cell)
    try:
        interpreter, note = find_interpreter(cell, args.python)
    except CellUnavailableError as exc:
        say(
            f"Cannot create {cell.venv}: {exc}. Install Python {cell.python} or pass PYTHON=/path/to/python3."
        )
        return 1
    if note:
        say(f"note: {note}")
    ensure_venv(cell, interpreter)
    say(f"{cell.venv}: {cell.django_label}, Python {interpreter.version}")

    return 0


def cmd_test(args: argparse.Namespace) -> int:
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    results: list[tuple[Cell, str, str]] = []  # cell, outcome, detail
    for cell in select(args.cells):
        try:
            interpreter, note = find_interpreter(cell, args.python)
        except CellUnavailableError as exc:
            header(
                f"cell {cell.name}: {cell.django_label} / Python {cell.python}: not available"
            )
            say(str(exc))
            results.append((cell, "not available", str(exc)))
            continue
        label = f"{cell.django_label} / Python {interpreter.version}"
        header(f"cell {cell.name}: {label} ({cell.venv})")
        if note:
            say(f"note: {note}")
        try:
            venv = ensure_venv(cell, interpreter)
        except subprocess.CalledProcessError as exc:
            results.append((cell, "failed", f"{label}: installing failed ({exc})"))
            continue
        tests = [
            path
            for pattern in cell.tests
            for path in (
                sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern))
                if "*" in pattern
                else [pattern]
            )
        ]
        command = [str(venv_python(venv)), "-m", "pytest", *tests, *pytest_args]
        env = dict(cell.env)
        say(
            "$ "
            + " ".join(f"{k}={v}" for k, v in env.items())
            + (" " if env else "")
            + " ".join(shlex.quote(part) for part in command)
        )
        started = time.monotonic()
        code = run_with_timeout(command, args.timeout, env)
        elapsed = time.monotonic() - started
        if code is None:
            results.append(
                (cell, "failed", f"{label}: timed out after {args.timeout:.0f} s")
            )
        elif code == 0:
            results.append((cell, "passed", f"{label}, {elapsed:.1f} s"))
        elif code == PYTEST_NO_TESTS:
            results.append((cell, "failed", f"{label}: pytest collected no tests"))
        else:
            results.append((cell, "failed", f"{label}: pytest exited {code}"))

    header("test matrix summary")
    for cell, outcome, detail in results:
        say(f"  {cell.name}  {outcome:<14} {detail}")
    ran = [r for r in results if r[1] != "not available"]
    failed = [r for r in results if r[1] == "failed"]
    missing = [r for r in results if r[1] == "not available"]
    if failed:
        say(f"FAILED: {len(failed)} of {len(ran)} cells that ran.")
        return 1
    if not ran:
        say("FAILED: no cell could run; install Python 3.11, 3.12 or 3.13.")
        return 1
    if missing and args.require_all:
        say(
            "FAILED: every cell is required (--require-all) and some were not available."
        )
        return 1
    say(f"OK: {len(ran)} cell(s) passed, {len(missing)} not available.")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python",
        default=os.environ.get("PYTHON") or "python3",
        help="interpreter preferred for the main cell (default: python3)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    venv = sub.add_parser("venv", help="create or update one cell's venv")
    venv.add_argument("cell", nargs="?", default="A")
    test = sub.add_parser("test", help="run pytest in each cell")
    test.add_argument("--cells", default="A,B,C")
    test.add_argument(
        "--require-all",
        action="store_true",
        default=os.environ.get("REQUIRE_ALL_CELLS") == "1",
        help="fail when a cell's interpreter is not available (also REQUIRE_ALL_CELLS=1)",
    )
    test.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("CELL_TIMEOUT") or DEFAULT_CELL_TIMEOUT),
        help="seconds one cell's pytest may run (also CELL_TIMEOUT; default 600)",
    )
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "venv":
        return cmd_venv(args)
    return cmd_test(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
