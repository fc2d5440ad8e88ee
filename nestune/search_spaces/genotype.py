"""``Genotype``: a discrete DARTS architecture, as the two cells' lists of ``(op, input)`` pairs.

It reads and writes DARTS' own repr string (quark0/darts ``genotypes.py``), so published
genotypes load exactly as printed, and JSON for storage and for Ray Tune configs.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

Edge = tuple[str, int]

# The field order of DARTS' namedtuple('Genotype', 'normal normal_concat reduce reduce_concat').
_FIELD_ORDER = ("normal", "normal_concat", "reduce", "reduce_concat")


def _as_pairs(value: Any, name: str) -> tuple[Edge, ...]:
    try:
        pairs = tuple((str(op), int(inp)) for op, inp in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Genotype.{name}: expected a list of (op, input) pairs, got {value!r}") from exc
    if len(pairs) % 2:
        raise ValueError(
            f"Genotype.{name}: expected two (op, input) pairs per node, got {len(pairs)} pairs"
        )
    return pairs


def _as_concat(value: Any, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Genotype.{name}: expected a list of node indices, got {value!r}") from exc


def _concat_repr(concat: tuple[int, ...]) -> str:
    if len(concat) > 1 and list(concat) == list(range(concat[0], concat[-1] + 1)):
        return f"range({concat[0]}, {concat[-1] + 1})"
    return repr(list(concat))


@dataclass(frozen=True)
class Genotype:
    """A discrete cell architecture: for each cell type, two ``(op, input)`` pairs per node.

    Inputs 0 and 1 are the cell's two inputs (the outputs of the two previous cells); input
    ``k >= 2`` is intermediate node ``k - 2``. Pairs ``2i`` and ``2i + 1`` feed node ``i``.
    Frozen and hashable, so genotypes deduplicate in sets and key dicts.
    """

    normal: tuple[Edge, ...]
    reduce: tuple[Edge, ...]
    normal_concat: tuple[int, ...] = field(default=(2, 3, 4, 5))
    reduce_concat: tuple[int, ...] = field(default=(2, 3, 4, 5))

    def __post_init__(self) -> None:
        # Accept lists and ranges (as DARTS writes them) but store tuples, so equality and
        # hashing do not depend on how the genotype was written down.
        object.__setattr__(self, "normal", _as_pairs(self.normal, "normal"))
        object.__setattr__(self, "reduce", _as_pairs(self.reduce, "reduce"))
        object.__setattr__(self, "normal_concat", _as_concat(self.normal_concat, "normal_concat"))
        object.__setattr__(self, "reduce_concat", _as_concat(self.reduce_concat, "reduce_concat"))

    @property
    def nodes(self) -> int:
        """Intermediate nodes per cell."""
        return len(self.normal) // 2

    def cell(self, name: str) -> tuple[Edge, ...]:
        """The pairs of cell ``"normal"`` or ``"reduce"``."""
        if name not in ("normal", "reduce"):
            raise ValueError(f"cell: expected 'normal' or 'reduce', got {name!r}")
        return self.normal if name == "normal" else self.reduce

    def edges(self) -> set[tuple[str, int, int, str]]:
        """The genotype's edges as ``(cell, node, input, op)``; two genotypes share an edge
        when all four agree."""
        out = set()
        for cell in ("normal", "reduce"):
            for k, (op, inp) in enumerate(self.cell(cell)):
                out.add((cell, k // 2, inp, op))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [list(p) for p in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(p) for p in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genotype:
        if not isinstance(d, dict):
            raise ValueError(f"Genotype: expected a dict, got {type(d).__name__}")
        missing = {"normal", "reduce"} - set(d)
        if missing:
            raise ValueError(f"Genotype: missing field(s) {sorted(missing)}")
        extra = set(d) - {"normal", "reduce", "normal_concat", "reduce_concat"}
        if extra:
            raise ValueError(f"Genotype: unknown field(s) {sorted(extra)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Genotype.from_json: not valid JSON ({exc})") from exc
        return cls.from_dict(d)

    @classmethod
    def parse(cls, text: str) -> Genotype:
        """Read DARTS' repr, e.g. ``Genotype(normal=[('sep_conv_3x3', 0), ...],
        normal_concat=range(2, 6), reduce=[...], reduce_concat=[2, 3, 4, 5])``.

        A line copied from ``genotypes.py`` as it stands (``DARTS_V2 = Genotype(...)``, over
        several lines or one, ``genotypes.Genotype(...)``, positional fields in the
        namedtuple's order ``normal, normal_concat, reduce, reduce_concat``) reads the same.
        Parsed with ``ast`` (no ``eval``); ``range(a, b)`` is the one call allowed inside.
        """
        if not isinstance(text, str):
            raise ValueError(f"Genotype.parse: expected a str, got {type(text).__name__}")
        try:
            body = ast.parse(text.strip(), mode="exec").body
        except SyntaxError as exc:
            raise ValueError(f"Genotype.parse: not a Genotype(...) expression: {exc}") from exc
        tree: ast.expr | None = None
        if len(body) == 1 and isinstance(body[0], ast.Expr):
            tree = body[0].value
        elif len(body) == 1 and isinstance(body[0], ast.Assign):
            tree = body[0].value
        func = getattr(tree, "func", None)
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if not (isinstance(tree, ast.Call) and name == "Genotype"):
            raise ValueError("Genotype.parse: expected text of the form Genotype(normal=..., ...)")
        if len(tree.args) > len(_FIELD_ORDER):
            raise ValueError(
                f"Genotype.parse: expected at most {len(_FIELD_ORDER)} positional fields "
                f"({', '.join(_FIELD_ORDER)}), got {len(tree.args)}"
            )
        if any(isinstance(a, ast.Starred) for a in tree.args) or any(
            kw.arg is None for kw in tree.keywords
        ):
            raise ValueError("Genotype.parse: * and ** arguments are not literals")
        fields: dict[str, Any] = {}
        for key, node in zip(_FIELD_ORDER, tree.args, strict=False):
            fields[key] = _literal(node, key)
        for kw in tree.keywords:
            if kw.arg in fields:
                raise ValueError(f"Genotype.parse: field {kw.arg!r} given twice")
            fields[kw.arg] = _literal(kw.value, kw.arg)
        return cls.from_dict(fields)

    def __str__(self) -> str:
        return (
            f"Genotype(normal={list(self.normal)!r}, normal_concat={_concat_repr(self.normal_concat)}"
            f", reduce={list(self.reduce)!r}, reduce_concat={_concat_repr(self.reduce_concat)})"
        )


def _literal(node: ast.expr, name: str | None) -> Any:
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "range"
        and not node.keywords
    ):
        return list(range(*(ast.literal_eval(a) for a in node.args)))
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise ValueError(f"Genotype.parse: field {name!r} is not a literal") from exc


# quark0/darts genotypes.py, as published.
DARTS_V1 = Genotype.parse(
    "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])"
)
DARTS_V2 = Genotype.parse(
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)
