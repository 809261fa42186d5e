"""``{% load shop_format %}``: ``{{ "58966801.05"|grouped }}`` -> ``58,966,801.05``."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django import template

register = template.Library()


@register.filter
def grouped(value: object) -> str:
    """A number with thousands separators, keeping its decimals as written."""
    text = str(value)
    try:
        Decimal(text)
    except InvalidOperation:
        return text
    whole, dot, decimals = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-') or 0):,}{dot}{decimals}"
