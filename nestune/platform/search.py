"""Supernet search jobs: the registry that one-shot strategies put their search methods in.

A search job is ``{"kind": "search", "method": NAME, "seed": int, ...settings}``; the trainable
hands it to ``run_search`` with the study's data. A method returns a dict with at least
``genotype`` (the derived Genotype's JSON) and ``device_seconds``; ``extra`` holds JSON-able
details (histories, logs) and ``arrays`` optional numpy arrays, stored with the trial.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nestune.platform.data import DataBundle

SearchFn = Callable[[dict[str, Any], DataBundle, str], dict[str, Any]]
SEARCH_METHODS: dict[str, SearchFn] = {}
#: The job keys each method reads as settings (a study's ``search`` defaults are checked
#: against them, so a misspelt one is an error instead of a silently ignored key).
SEARCH_SETTINGS: dict[str, frozenset[str]] = {}
# Keys every method reads: its seed and the space.
_COMMON = frozenset({"seed", "nodes", "ops"})


def register_search(name: str, settings: Iterable[str] = ()) -> Callable[[SearchFn], SearchFn]:
    """Function decorator: make a search method available to search jobs as ``name``;
    ``settings`` are the job keys it reads besides ``seed``, ``nodes`` and ``ops``."""

    def deco(fn: SearchFn) -> SearchFn:
        SEARCH_METHODS[name] = fn
        SEARCH_SETTINGS[name] = frozenset(settings) | _COMMON
        return fn

    return deco


def check_search_defaults(search: Mapping[str, Any], field: str = "search") -> None:
    """``ValueError`` naming the first key of a study's search defaults that no registered
    method reads."""
    from nestune.platform.strategy import _load_builtins

    _load_builtins()
    known = frozenset().union(*SEARCH_SETTINGS.values()) if SEARCH_SETTINGS else _COMMON
    for key in search:
        if key not in known:
            raise ValueError(f"{field}.{key}: not a setting of any search method "
                             f"(known: {', '.join(sorted(known))})")


def run_search(job: dict[str, Any], data: DataBundle, device: str = "cpu") -> dict[str, Any]:
    """Run the search job ``job`` on ``data`` and return its result dict."""
    from nestune.platform.strategy import _load_builtins

    _load_builtins()
    method = job.get("method")
    if method not in SEARCH_METHODS:
        raise ValueError(
            f"search job: unknown method {method!r}; registered: {sorted(SEARCH_METHODS)}"
        )
    result = SEARCH_METHODS[method](job, data, device)
    for key in ("genotype", "device_seconds"):
        if key not in result:
            raise ValueError(f"search method {method!r} returned no {key!r}")
    return {"kind": "search", "method": method, **result}
