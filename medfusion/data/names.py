"""Class names are data, never paths.

A class name comes from a folder name, a labels CSV or a model folder's ``medfusion.json`` and
later becomes a folder name in a synthetic dataset (``OUT/<class>/000000.png``) and a choice of
``medfusion sample --class-label``. :func:`check_class_name` is where every name is checked as it
enters, so that no name can point outside a folder, hide itself, or mean something else:

- a non-empty string of at most :data:`MAX_NAME_LENGTH` characters, without leading or trailing
  spaces;
- no path separators (``/``, ``\\``), no ``.``/``..``, no leading ``.`` (hidden files are
  skipped by the readers), no control characters, none of ``< > : " | ? *`` (not allowed in
  file names on Windows, where synthetic datasets are shared too);
- not one of the reserved words :data:`RESERVED_NAMES` in any letter case: ``none`` means
  unconditional samples and ``all`` every class. There is no escape for them: rename the folder
  (e.g. ``no_finding``), or map the files to another name with a labels CSV.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

MAX_NAME_LENGTH = 128
RESERVED_NAMES = ("none", "all")
_FORBIDDEN = '/\\<>:"|?*'


def class_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a class name, or None when it is fine."""
    if not isinstance(name, str):
        return f"a class name must be a string; got {type(name).__name__} {name!r}"
    if not name:
        return "a class name must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"class name {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
    if name != name.strip():
        return f"class name {name!r} starts or ends with white space"
    if name in (".", ".."):
        return f"class name {name!r} is a path, not a name"
    bad = sorted({c for c in name if c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"class name {name!r} holds {shown}; use letters, digits, spaces, '-' or '_'"
    if name.startswith("."):
        return f"class name {name!r} starts with '.' (a hidden name)"
    if name.lower() in RESERVED_NAMES:
        return (
            f"class name {name!r} is reserved ({' and '.join(RESERVED_NAMES)} mean unconditional "
            "samples and every class); rename it, e.g. via a labels CSV"
        )
    return None


def check_class_name(name: object, source: str) -> str:
    """Return ``name`` when it is a valid class name; raise ``ValueError`` naming ``source``
    (the file, folder or argument it came from) otherwise."""
    problem = class_name_problem(name)
    if problem is not None:
        raise ValueError(f"{source}: {problem}")
    return name  # type: ignore[return-value]


def check_class_names(names: Iterable[object], source: str) -> tuple[str, ...]:
    """Check every name (see :func:`check_class_name`) and that none repeats."""
    checked = tuple(check_class_name(name, source) for name in names)
    seen: set[str] = set()
    for name in checked:
        if name.casefold() in seen:
            raise ValueError(
                f"{source}: class name {name!r} is given twice (names differing only in letter "
                "case collide on some file systems)"
            )
        seen.add(name.casefold())
    return checked
