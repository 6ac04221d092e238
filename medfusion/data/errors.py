"""Errors raised by the data layer. Every message names the file or argument at fault."""

from __future__ import annotations

import os
from dataclasses import dataclass


class DataError(ValueError):
    """A dataset, folder or CSV cannot be used as given."""


class ImageReadError(DataError):
    """One file cannot be read as an image or volume.

    Attributes:
        path: the offending file or folder.
        reason: what is wrong with it, without the path.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (or with a folder as a whole when ``path`` is the folder)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    """One line per problem, at most ``limit`` lines, then a count of the rest."""
    lines = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
