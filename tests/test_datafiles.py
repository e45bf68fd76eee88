"""Data resolution: path or URL + sha256, the search path, the download cache, clear errors offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.datafiles import DataRef, resolve, sha256_file
from engine.errors import MissingInputError

CONTENT = b"Season,Episode,Character,Line\n1,1,Cartman,\"Screw you guys.\"\n"
SHA = hashlib.sha256(CONTENT).hexdigest()
URL = "https://example.invalid/data/lines.csv"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RECIPE_DATA_PATH", "")
    monkeypatch.setenv("RECIPE_OFFLINE", "1")
    return tmp_path


def test_a_ref_is_a_path_or_a_pinned_url():
    assert DataRef(path="a.csv").name == "a.csv"
    assert DataRef(url=URL, sha256=SHA).name == "lines.csv"
    for bad in ({}, {"path": "a", "url": URL, "sha256": SHA}, {"url": URL}, {"url": URL, "sha256": "abc"}):
        with pytest.raises(ValidationError):
            DataRef(**bad)


def test_path_resolves_against_the_recipe_folder_then_the_search_path(isolated, monkeypatch):
    recipe_dir, data_dir = isolated / "recipes", isolated / "data" / "deep"
    recipe_dir.mkdir()
    data_dir.mkdir(parents=True)
    (data_dir / "lines.csv").write_bytes(CONTENT)
    with pytest.raises(MissingInputError, match="add the folder that holds it to RECIPE_DATA_PATH"):
        resolve(DataRef(path="lines.csv"), recipe_dir)
    monkeypatch.setenv("RECIPE_DATA_PATH", str(isolated / "data"))
    found = resolve(DataRef(path="lines.csv", sha256=SHA), recipe_dir)  # found recursively, checked by sha256
    assert found.path == (data_dir / "lines.csv").resolve() and found.sha256 == SHA
    (recipe_dir / "lines.csv").write_bytes(CONTENT + b"changed")
    with pytest.raises(MissingInputError, match="the recipe expects " + SHA):
        resolve(DataRef(path="lines.csv", sha256=SHA), recipe_dir)


def test_url_is_found_in_the_cache_or_search_path_without_network(isolated, monkeypatch):
    ref = DataRef(url=URL, sha256=SHA)
    with pytest.raises(MissingInputError) as caught:
        resolve(ref, isolated)
    assert f"data file lines.csv (sha256 {SHA[:12]}…) is not on this machine; download {URL} yourself" in str(caught.value)
    elsewhere = isolated / "mirror"
    elsewhere.mkdir()
    (elsewhere / "lines.csv").write_bytes(b"other bytes with the same name")
    (elsewhere / "sub").mkdir()
    (elsewhere / "sub" / "lines.csv").write_bytes(CONTENT)
    monkeypatch.setenv("RECIPE_DATA_PATH", str(elsewhere))
    assert resolve(ref, isolated).path == (elsewhere / "sub" / "lines.csv").resolve()  # the sha256 picks the right one
    cached = isolated / "cache" / "downloads" / SHA / "lines.csv"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(CONTENT)
    assert resolve(ref, isolated).path == cached


def test_a_url_file_of_another_version_is_named_with_its_sha256(isolated, monkeypatch):
    import hashlib

    mirror = isolated / "mirror"
    mirror.mkdir()
    (mirror / "lines.csv").write_bytes(b"an older version of the file")
    monkeypatch.setenv("RECIPE_DATA_PATH", str(mirror))
    with pytest.raises(MissingInputError) as caught:
        resolve(DataRef(url=URL, sha256=SHA), isolated, download=False)
    other = hashlib.sha256(b"an older version of the file").hexdigest()
    assert f"Found {mirror / 'lines.csv'}, whose sha256 is {other}: not the version the recipe was written for (sha256 {SHA})" in str(caught.value)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(CONTENT * 1000)
    assert sha256_file(path) == hashlib.sha256(CONTENT * 1000).hexdigest()
