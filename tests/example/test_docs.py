"""docs/ stays true to the code: every setting, check, counter and figure is documented
as the code has it, and every Python example compiles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import asgi_dbset
from asgi_dbset import ConnectionSet
from asgi_dbset.conf import DEFAULTS
from asgi_dbset.stats import COUNTERS

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHECKS_SOURCE = Path(asgi_dbset.__file__).with_name("checks.py").read_text()


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def table_keys(text: str) -> set[str]:
    """The first column of every Markdown table row, when it is `code`."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


@pytest.mark.parametrize("key", list(DEFAULTS))
def test_each_setting_has_a_heading_with_its_type_and_default(key: str) -> None:
    settings = doc("settings.md")
    section = re.search(rf"^## {key}\n(.*?)(?=^## |\Z)", settings, re.M | re.S)
    assert section, f"docs/settings.md has no '## {key}' heading"
    body = section.group(1)
    assert "**Type:**" in body
    assert f"**Default:** `{DEFAULTS[key]!r}`" in body
    assert f'"{key}"' in body, "no example"


def test_the_settings_page_documents_no_other_key() -> None:
    headings = re.findall(r"^## ([A-Z_]+)$", doc("settings.md"), re.M)
    assert headings == list(DEFAULTS)


def test_every_check_id_is_documented() -> None:
    in_code = set(re.findall(r'"(asgi_dbset\.[EW]\d{3})"', CHECKS_SOURCE))
    assert in_code
    assert table_keys(doc("settings.md")) >= in_code
    documented = {
        k for k in table_keys(doc("settings.md")) if k.startswith("asgi_dbset.")
    }
    assert documented == in_code


def test_every_counter_is_documented() -> None:
    counters = table_keys(doc("observability.md")) & set(COUNTERS)
    assert counters == set(COUNTERS)


def test_every_figure_is_documented() -> None:
    figures = ConnectionSet().figures()
    documented = table_keys(doc("observability.md"))
    assert set(figures) <= documented


def test_every_public_name_is_documented() -> None:
    api = doc("api.md")
    for name in asgi_dbset.__all__:
        assert f"`{name}`" in api, name


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_python_examples_compile(page: str) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", doc(page), re.M | re.S)
    for number, block in enumerate(blocks, start=1):
        compile(block, f"{page} example {number}", "exec")
