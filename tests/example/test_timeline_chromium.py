"""The timeline page in a real browser: uvicorn serves the example, Chromium draws it.

Needs Debian's ``chromium`` (``make test`` installs it when it is missing). The
test fails, never skips, without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from psycopg.conninfo import make_conninfo

from example_site.shop.views import PARALLELISM

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
]
HOW_TO_INSTALL = (
    "Debian's chromium is needed to test the timeline page in a browser: run "
    "`make chromium` (as root: apt-get update && apt-get install -y chromium)."
)

pytestmark = pytest.mark.django_db(transaction=True)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(HOW_TO_INSTALL, pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def server(shop: dict[str, int], tmp_path: Path) -> Iterator[str]:
    """The example site under uvicorn, on the test database, at a free port."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_site.settings",
        # The rows `shop` committed, in the database the tests use.
        "DATABASE_URL": make_conninfo(
            settings.DATABASE_URL, dbname=connection.settings_dict["NAME"]
        ),
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "example_site.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"uvicorn exited with {process.returncode}:\n"
                    + (tmp_path / "uvicorn.log").read_text(errors="replace"),
                    pytrace=False,
                )
            try:
                if get(f"{base}/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    "uvicorn did not answer /healthz within 60 s", pytrace=False
                )
            time.sleep(0.1)
        yield base
    finally:
        # SIGINT: uvicorn runs the lifespan shutdown, which closes the pool.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


class Bars(HTMLParser):
    """Collects the timeline's request sections and the bars in each."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        classes = (found.get("class") or "").split()
        if tag == "section" and "request" in classes:
            self.requests.append((found.get("data-path") or "", []))
        elif tag == "div" and "bar" in classes and self.requests:
            self.requests[-1][1].append(found.get("data-lane") or "")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def run_chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_timeline_draws_bars_in_chromium(server: str, tmp_path: Path) -> None:
    chromium()  # fail early, with how to install it
    for path in (
        "/dashboard/serial/",
        "/dashboard/?latency=20",
        "/starlette/?latency=20",
        "/dashboard/?latency=20",
    ):
        status, _ = get(server + path)
        assert status == 200, path

    dom = run_chromium("--dump-dom", f"{server}/timeline/", profile=tmp_path / "p1")
    parser = Bars()
    parser.feed(dom.stdout)
    drawn = parser.requests
    assert [path for path, _ in drawn] == [
        "/dashboard/",
        "/starlette/",
        "/dashboard/",
        "/dashboard/serial/",
    ]
    for path, lanes in drawn[:3]:
        # Eleven queries per page, one bar each, on every lane the page may use.
        assert len(lanes) == 11, (path, lanes)
        assert set(lanes) == {str(n) for n in range(PARALLELISM)}, (path, lanes)
    assert drawn[3][1] == ["0"] * 11  # the serial page: every query on lane 0

    screenshot = Path(os.environ.get("ASGI_DBSET_SCREENSHOT_DIR") or tmp_path)
    screenshot = screenshot / "timeline.png"
    run_chromium(
        f"--screenshot={screenshot}", f"{server}/timeline/", profile=tmp_path / "p2"
    )
    assert png_size(screenshot) == (1200, 800)
    # A blank page compresses to a few kilobytes; bars, text and axes do not.
    assert screenshot.stat().st_size > 20_000, screenshot
