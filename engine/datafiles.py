"""Where data comes from: a local path, or a URL pinned by sha256 with a download cache and a search path.

Nothing here assumes network access. A URL is fetched only when the file is neither in the download cache
nor in a folder of RECIPE_DATA_PATH, and a failure says exactly how to provide the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.errors import MissingInputError
from engine.registry import InputFile


class DataRef(BaseModel):
    """A data file: `path` (relative to the recipe's folder or to a RECIPE_DATA_PATH folder), or `url` + `sha256`."""

    model_config = ConfigDict(extra="forbid")

    path: Optional[str] = Field(None, description="Local file, relative to the recipe's folder or to a RECIPE_DATA_PATH folder.")
    url: Optional[str] = Field(None, description="Public URL of the file; needs sha256.")
    sha256: Optional[str] = Field(None, description="Expected sha256 of the file's bytes (required with url, checked with path).")
    filename: Optional[str] = Field(None, description="Name to look for in RECIPE_DATA_PATH and the cache (default: the URL's last part).")

    @model_validator(mode="after")
    def _one_place(self) -> "DataRef":
        if bool(self.path) == bool(self.url):
            raise ValueError("give exactly one of 'path' or 'url' (with 'sha256')")
        if self.url and not self.sha256:
            raise ValueError("'url' needs 'sha256' so that the download can be checked and cached")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ValueError("'sha256' must be 64 lowercase hex digits")
        return self

    @property
    def name(self) -> str:
        if self.filename:
            return self.filename
        return Path(self.path).name if self.path else self.url.rstrip("/").rsplit("/", 1)[-1]


def cache_root() -> Path:
    return Path(os.environ.get("RECIPE_CACHE", Path.home() / ".cache" / "recipe"))


def search_path() -> list[Path]:
    value = os.environ.get("RECIPE_DATA_PATH", "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


_HASH_MEMO: dict[tuple, str] = {}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes. Memoised for the life of this process only (never across runs)."""
    stat = os.stat(path)
    memo_key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if memo_key in _HASH_MEMO:
        return _HASH_MEMO[memo_key]
    _HASH_MEMO[memo_key] = digest = _sha256_bytes_of(path, chunk)
    return digest


def _sha256_bytes_of(path: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _find_in_search_path(name: str, sha256: str | None) -> Path | None:
    for folder in search_path():
        if not folder.is_dir():
            continue
        direct = folder / name
        candidates = [direct] if direct.is_file() else []
        candidates += [p for p in sorted(folder.rglob(Path(name).name)) if p.is_file() and p != direct]
        for candidate in candidates:
            if sha256 is None or sha256_file(candidate) == sha256:
                return candidate
    return None


def _other_versions(name: str, sha256: str) -> str:
    """' Found <path>, whose sha256 is <digest>: ...' for files of that name in the search path with another
    sha256 (a different version of the file), else ''. Only for error messages: it hashes every candidate."""
    found = []
    for folder in search_path():
        if folder.is_dir():
            found += [(p, sha256_file(p)) for p in sorted(folder.rglob(Path(name).name)) if p.is_file()]
    found = [(path, digest) for path, digest in found if digest != sha256]
    if not found:
        return ""
    listed = "; ".join(f"{path}, whose sha256 is {digest}" for path, digest in found[:3])
    return (f" Found {listed}: not the version the recipe was written for (sha256 {sha256}); use that version, "
            "or set the recipe's sha256 to the file's if you mean to use it.")


def resolve(ref: DataRef, base_dir: Path, *, download: bool = True) -> InputFile:
    """Find the file a DataRef names, checking its sha256; download it only as a last resort."""
    if ref.path:
        candidates = [Path(ref.path).expanduser()]
        if not candidates[0].is_absolute():
            candidates = [base_dir / ref.path] + [folder / ref.path for folder in search_path()]
        for candidate in candidates:
            if candidate.is_file():
                digest = sha256_file(candidate)
                if ref.sha256 and digest != ref.sha256:
                    raise MissingInputError(
                        f"{candidate}: sha256 is {digest}, the recipe expects {ref.sha256}. "
                        "Use the file the recipe was written for, or update its sha256."
                    )
                return InputFile(path=candidate.resolve(), sha256=digest)
        found = _find_in_search_path(ref.path, ref.sha256) if not Path(ref.path).is_absolute() else None
        if found:
            return InputFile(path=found.resolve(), sha256=ref.sha256 or sha256_file(found))
        tried = ", ".join(str(c) for c in candidates)
        raise MissingInputError(
            f"data file '{ref.path}' not found (looked in: {tried}). Put the file there, "
            "or add the folder that holds it to RECIPE_DATA_PATH."
        )

    assert ref.url and ref.sha256
    cached = cache_root() / "downloads" / ref.sha256 / ref.name
    if cached.is_file():
        return InputFile(path=cached, sha256=ref.sha256)
    found = _find_in_search_path(ref.name, ref.sha256)
    if found:
        return InputFile(path=found.resolve(), sha256=ref.sha256)
    folders = ", ".join(str(p) for p in search_path()) or "(RECIPE_DATA_PATH is not set)"
    how = (
        f"download {ref.url} yourself and put it in {cached.parent}/ or in a folder named by "
        f"RECIPE_DATA_PATH (searched: {folders})"
    )
    if not download or os.environ.get("RECIPE_OFFLINE", "") not in ("", "0"):
        raise MissingInputError(f"data file {ref.name} (sha256 {ref.sha256[:12]}…) is not on this machine; {how}.{_other_versions(ref.name, ref.sha256)}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
            with urllib.request.urlopen(ref.url, timeout=30) as response:
                shutil.copyfileobj(response, tmp)
        digest = sha256_file(Path(tmp.name))
        if digest != ref.sha256:
            os.unlink(tmp.name)
            raise MissingInputError(f"{ref.url} has sha256 {digest}, the recipe expects {ref.sha256}; {how}.")
        os.replace(tmp.name, cached)
    except MissingInputError:
        raise
    except Exception as exc:  # network down, 404, ...: say how to provide it by hand
        raise MissingInputError(f"data file {ref.name} could not be downloaded ({exc}); {how}.{_other_versions(ref.name, ref.sha256)}") from None
    return InputFile(path=cached, sha256=ref.sha256)
