#!/usr/bin/env python3
"""Prepare what ``make bench`` needs: two venvs and ``wrk``.

    python3 bench/setup_env.py          # prints the main venv's python on its last line

- ``bench/.work/venv``: the harness and the stock, dbset and ceiling servers.
  Its interpreter is ``BENCH_PYTHON``, else the Python running this script
  (``make bench`` uses ``python3``); Django 5.2 on 3.11, or ``BENCH_DJANGO``.
- ``bench/.work/venv-dab``: the django-async-backend server and a stock Django
  server on the same interpreter, for a like-for-like ratio. Python 3.12
  (pyenv or PATH; ``BENCH_DAB_PYTHON``), Django 6.1 and django-async-backend.
  When it cannot be made, the variant is skipped and the reason written to
  ``bench/.work/async-backend-skipped.txt``.

Both get ``asgi-dbset[bench]`` (editable). Installing happens on the first run
and whenever this file, the project's dependencies or its ``bench`` extra change. ``wrk`` (the load
generator) comes from Debian's packages: installed with apt-get when it is
missing and we are root, else we stop and say how.

Standard library only, so it runs before any venv exists.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".work"
MAIN = WORK / "venv"
DAB = WORK / "venv-dab"
SKIPPED = WORK / "async-backend-skipped.txt"
MAIN_DJANGO = "django>=5.2,<5.3"
DAB_REQUIREMENTS = ["django>=6.1,<6.2", "django-async-backend>=6.1,<6.2"]


def say(message: str) -> None:
    print(f"[bench setup] {message}", file=sys.stderr, flush=True)


def version_of(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys, venv; print('%d %d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[0]), int(out[1])


def python_312() -> str | None:
    if os.environ.get("BENCH_DAB_PYTHON"):
        return os.environ["BENCH_DAB_PYTHON"]
    candidates = []
    for root in filter(
        None, [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    ):
        candidates.extend(
            sorted(glob.glob(f"{root}/versions/3.12.*/bin/python3.12"), reverse=True)
        )
    if shutil.which("python3.12"):
        candidates.append("python3.12")
    for python in candidates:
        if version_of(python) == (3, 12):
            return python
    return None


def _declared_requirements() -> bytes:
    """The parts of pyproject.toml that decide what the venvs get: the project's
    dependencies and its bench extra (other edits do not reinstall)."""
    text = (REPO / "pyproject.toml").read_bytes()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: any change reinstalls
        return text
    project = tomllib.loads(text.decode()).get("project", {})
    wanted = {
        "dependencies": project.get("dependencies", []),
        "bench": project.get("optional-dependencies", {}).get("bench", []),
    }
    return repr(wanted).encode()


def stamp_for(python: str, requirements: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(python.encode())
    digest.update(repr(requirements).encode())
    digest.update(_declared_requirements())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def ensure_venv(venv: Path, python: str, requirements: list[str]) -> Path:
    """Create *venv* with *python* and install the requirements, unless current."""
    venv_python = venv / "bin" / "python"
    stamp_file = venv / ".bench-stamp"
    stamp = stamp_for(python, requirements)
    if venv_python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return venv_python
    say(f"creating {venv.relative_to(REPO)} with {python}")
    if venv.exists():
        shutil.rmtree(venv)
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)

    def pip(*args: str) -> None:
        subprocess.run(
            [str(venv_python), "-m", "pip", "install", "--quiet", *args],
            cwd=REPO,
            check=True,
            timeout=900,
        )

    pip("--upgrade", "pip>=23.1")
    pip("-e", ".[bench]", *requirements)
    stamp_file.write_text(stamp)
    return venv_python


def ensure_main() -> Path:
    python = os.environ.get("BENCH_PYTHON") or sys.executable
    version = version_of(python)
    if version is None or version < (3, 11):
        raise SystemExit(
            f"bench: {python} is not Python 3.11+; set BENCH_PYTHON=/path/to/python3.11+."
        )
    return ensure_venv(MAIN, python, [os.environ.get("BENCH_DJANGO", MAIN_DJANGO)])


def ensure_dab() -> None:
    python = python_312()
    if python is None:
        SKIPPED.write_text(
            "no Python 3.12 found (django-async-backend 6.1 needs Python 3.12+ and "
            "Django 6.1); set BENCH_DAB_PYTHON.\n"
        )
        say(SKIPPED.read_text().strip())
        return
    try:
        ensure_venv(DAB, python, DAB_REQUIREMENTS)
    except subprocess.SubprocessError as exc:
        SKIPPED.write_text(f"installing {DAB_REQUIREMENTS} failed: {exc}\n")
        say(SKIPPED.read_text().strip())
        shutil.rmtree(DAB, ignore_errors=True)
        return
    SKIPPED.unlink(missing_ok=True)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise SystemExit(
            "bench: the load generator wrk is missing. Install it (Debian/Ubuntu: "
            "`sudo apt-get install wrk`) and run `make bench` again."
        )
    say("installing wrk from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update", "-qq"], check=True, timeout=600, env=env)
    subprocess.run(
        [apt, "install", "-y", "-qq", "wrk"], check=True, timeout=600, env=env
    )


def main() -> None:
    ensure_wrk()
    main_python = ensure_main()
    if os.environ.get("BENCH_SKIP_DAB"):
        SKIPPED.write_text("skipped on request (BENCH_SKIP_DAB)\n")
    else:
        ensure_dab()
    print(main_python)


if __name__ == "__main__":
    main()
