"""Lists of names (languages, splits, tasks) as users give them: ``"de,fr"`` or ``["de", "fr"]``."""

from __future__ import annotations

from typing import Iterable

from .errors import LorsError


def name_list(values: str | Iterable[str], what: str) -> list[str]:
    """Split ``"de,fr"`` or take a sequence; drop blanks and duplicates, keep order.

    Raises LorsError when nothing is left ("no languages given; pass at least one").
    """
    items = values.split(",") if isinstance(values, str) else list(values)
    cleaned = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not cleaned:
        raise LorsError(f"no {what} given; pass at least one")
    return cleaned
