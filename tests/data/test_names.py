"""Class names are data: what :mod:`medfusion.data.names` lets through and what it refuses."""

from __future__ import annotations

import pytest

from medfusion.data.names import MAX_NAME_LENGTH, check_class_name, check_class_names, class_name_problem


@pytest.mark.parametrize(
    "name", ["chest", "T1w", "grade 2", "COVID-19", "no_finding", "Ödem", "a.b", "x" * 128]
)
def test_names_that_pass(name):
    assert class_name_problem(name) is None
    assert check_class_name(name, "labels.csv") == name


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "must not be empty"),
        (None, "must be a string"),
        (3, "must be a string"),
        ("x" * (MAX_NAME_LENGTH + 1), f"the limit is {MAX_NAME_LENGTH}"),
        (" chest", "white space"),
        ("chest\n", "white space"),
        (".", "is a path"),
        ("..", "is a path"),
        ("../../ESCAPED_REL", "holds '/'"),
        ("/abs/x", "holds '/'"),
        ("a\\b", "holds '\\\\'"),
        ("C:x", "holds ':'"),
        ("x\x00y", "holds '\\x00'"),
        ("x\x1by", "holds '\\x1b'"),
        ("x\u202ey", "holds '\\u202e'"),  # right-to-left override: a name that reads as another
        (".hidden", "starts with '.'"),
        ("none", "is reserved"),
        ("All", "is reserved"),
        ("NONE", "is reserved"),
    ],
)
def test_names_that_are_refused_say_why_and_where(name, says):
    assert says in class_name_problem(name)
    with pytest.raises(ValueError, match=r"^DATA/x: "):
        check_class_name(name, "DATA/x")


def test_names_repeating_or_differing_only_in_case_are_refused():
    assert check_class_names(["a", "b"], "f") == ("a", "b")
    with pytest.raises(ValueError, match="'a' is given twice"):
        check_class_names(["a", "b", "a"], "f")
    with pytest.raises(ValueError, match="'Tumor' is given twice"):
        check_class_names(["tumor", "Tumor"], "f")
