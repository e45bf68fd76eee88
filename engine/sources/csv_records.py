"""CSV records read strictly: what the CSV sources (southpark_csv, roleplay_csv) share."""

from __future__ import annotations

import csv
from typing import Any, Iterator

from engine.errors import DataError


def strict_records(reader: Any, file: str) -> Iterator[list[str]]:
    """The reader's records; a malformed one (a double quote never closed, text after a closing quote) is a
    DataError at the line where its record starts, instead of csv silently reading on to the end of the file."""
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(
                file, f"malformed CSV ({exc})", row=start,
                fix="close the double quote that this row opens, and double any quote inside a quoted field (\"\")",
            ) from None
        yield record
