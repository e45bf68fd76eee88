"""Typed errors raised by library code. Only engine/cli.py turns them into messages and exit codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located as precisely as we can."""

    file: str
    line: int | None
    column: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"


class RecipeUserError(Exception):
    """Base class of every error caused by the user's input (never shown with a traceback)."""

    exit_code = 1


class RecipeError(RecipeUserError):
    """A recipe that does not load or validate; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DataError(RecipeUserError):
    """Input data that cannot be read: names the file, the row and the fix."""

    exit_code = 3

    def __init__(self, file: str, message: str, row: int | None = None, fix: str = ""):
        self.file, self.row, self.fix = file, row, fix
        where = f"{file}:{row}" if row is not None else file
        text = f"{where}: {message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class MissingInputError(RecipeUserError):
    """A data file or model that is not on this machine; says how to provide it."""

    exit_code = 4


class StageError(RecipeUserError):
    """A stage that cannot do its work with this recipe (for example no samples for the character)."""

    exit_code = 5

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(f"stage {stage}: {message}")
