"""Genotype.parse on the forms genotypes.py files use, beyond the printed repr."""

import pytest

from nestune.search_spaces import DARTS_V1, DARTS_V2, Genotype

# The two lines of quark0/darts cnn/genotypes.py, character for character.
GENOTYPES_PY = """
DARTS_V1 = Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])
DARTS_V2 = Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])
"""  # noqa: E501
LINES = [line for line in GENOTYPES_PY.strip().splitlines()]


@pytest.mark.parametrize("line, expected", [(LINES[0], DARTS_V1), (LINES[1], DARTS_V2)])
def test_assignment_lines_of_genotypes_py(line, expected):
    assert Genotype.parse(line) == expected
    rhs = line.split(" = ", 1)[1]
    assert Genotype.parse(rhs) == expected
    assert Genotype.parse(rhs.replace("[2, 3, 4, 5]", "range(2, 6)")) == expected


def test_multiline_positional_and_dotted_forms():
    multiline = """
    DARTS_V2 = genotypes.Genotype(
      normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
              ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0),
              ('skip_connect', 0), ('dil_conv_3x3', 2),],
      normal_concat = range(2, 6),
      reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
              ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
              ('skip_connect', 2), ('max_pool_3x3', 1)],
      reduce_concat=range(2, 6),
    )
    """
    assert Genotype.parse(multiline) == DARTS_V2
    positional = (
        f"Genotype({list(DARTS_V2.normal)!r}, range(2, 6), {list(DARTS_V2.reduce)!r}, [2, 3, 4, 5])"
    )
    assert Genotype.parse(positional) == DARTS_V2
    mixed = f"Genotype({list(DARTS_V2.normal)!r}, reduce={list(DARTS_V2.reduce)!r})"
    assert Genotype.parse(mixed) == DARTS_V2


@pytest.mark.parametrize(
    "text, match",
    [
        ("Genotype([], [2], [], [2], [3])", "at most 4 positional fields"),
        ("Genotype([], normal=[], reduce=[])", "field 'normal' given twice"),
        ("Genotype(**fields)", r"\* and \*\* arguments"),
        ("A = B = 1\nGenotype(normal=[], reduce=[])", "expected text of the form"),
        ("x.Foo(normal=[], reduce=[])", "expected text of the form"),
    ],
)
def test_parse_rejects_other_forms(text, match):
    with pytest.raises(ValueError, match=match):
        Genotype.parse(text)


def test_parse_rejects_non_text():
    with pytest.raises(ValueError, match="expected a str, got dict"):
        Genotype.parse({"normal": []})  # type: ignore[arg-type]
