"""The runner and cache on fake stages: keys, cache hits (proven by a spy), invalidation, atomic stage folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel
from rich.console import Console

from engine import cache, runner
from engine.registry import StageKind


class Section(BaseModel):
    value: int = 1


class FakeRecipe(BaseModel):
    name: str = "fake"
    first: Section = Section()
    second: Section = Section()
    third: Section = Section()

    @property
    def file(self) -> Path:
        return Path("fake.yaml")


class Spy:
    def __init__(self, name: str, output=None, fail: bool = False):
        self.name, self.calls, self.fail = name, 0, fail
        self.output = output

    def __call__(self, ctx) -> dict:
        self.calls += 1
        if self.fail:
            (ctx.out / "half-written.txt").write_text("partial")
            raise RuntimeError("boom")
        upstream = "".join((folder / "out.txt").read_text() for folder in ctx.upstream.values())
        text = self.output(ctx) if self.output else f"{self.name}:{ctx.config.value}"
        (ctx.out / "out.txt").write_text(upstream + "|" + text)
        return {"value": ctx.config.value}


def make_stages(monkeypatch, spies: dict[str, Spy]) -> None:
    names = ["first", "second", "third"]
    kinds = [
        StageKind(name=n, config=Section, run=spies[n], version="1", doc="", reads=(n,), needs=tuple(names[:i][-1:]), libraries=("pydantic",))
        for i, n in enumerate(names)
    ]
    monkeypatch.setattr(runner, "stage_kinds", lambda: kinds)


def quiet() -> Console:
    return Console(quiet=True)


def statuses(results) -> list[str]:
    return [r.status for r in results]


def test_second_run_is_a_cache_hit_that_calls_no_stage(tmp_path, monkeypatch):
    spies = {n: Spy(n) for n in ("first", "second", "third")}
    make_stages(monkeypatch, spies)
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet())) == ["ran", "ran", "ran"]
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet())) == ["cached", "cached", "cached"]
    assert [s.calls for s in spies.values()] == [1, 1, 1]
    lock = json.loads((tmp_path / cache.LOCK).read_text())
    assert set(lock["stages"]) == {"first", "second", "third"}
    assert lock["stages"]["third"]["outputs"].keys() == {"out.txt", "summary.json"}


def test_changed_key_reruns_that_stage_and_downstream_only(tmp_path, monkeypatch):
    spies = {n: Spy(n) for n in ("first", "second", "third")}
    make_stages(monkeypatch, spies)
    runner.run(FakeRecipe(), tmp_path, quiet())
    changed = FakeRecipe(second=Section(value=2))
    plan = runner.plan(changed, tmp_path)
    assert [(p.name, p.status) for p in plan] == [("first", "cached"), ("second", "run"), ("third", "waits")]
    assert plan[1].reasons == ["second.value: 1 → 2"]
    assert statuses(runner.run(changed, tmp_path, quiet())) == ["cached", "ran", "ran"]
    assert [s.calls for s in spies.values()] == [1, 2, 2]


def test_identical_upstream_output_keeps_downstream_cached(tmp_path, monkeypatch):
    # the key uses the upstream's output hash, not its key: a change that gives the same bytes stops there
    spies = {"first": Spy("first", output=lambda ctx: "same"), "second": Spy("second"), "third": Spy("third")}
    make_stages(monkeypatch, spies)
    runner.run(FakeRecipe(), tmp_path, quiet())
    results = runner.run(FakeRecipe(first=Section(value=5)), tmp_path, quiet())
    assert statuses(results) == ["ran", "cached", "cached"]


def test_force_and_until(tmp_path, monkeypatch):
    spies = {n: Spy(n) for n in ("first", "second", "third")}
    make_stages(monkeypatch, spies)
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet(), until="second")) == ["ran", "ran"]
    assert not (tmp_path / "third").exists()
    # forcing an unchanged stage reruns it; its output is identical, so the next stays cached (third never ran)
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet(), force=("first",))) == ["ran", "cached", "ran"]


def test_failed_stage_leaves_finished_stages_and_nothing_marked_done(tmp_path, monkeypatch):
    spies = {"first": Spy("first"), "second": Spy("second", fail=True), "third": Spy("third")}
    make_stages(monkeypatch, spies)
    with pytest.raises(RuntimeError):
        runner.run(FakeRecipe(), tmp_path, quiet())
    assert cache.read_record(tmp_path / "first") is not None
    assert not (tmp_path / "second").exists()
    lock = json.loads((tmp_path / cache.LOCK).read_text())
    assert list(lock["stages"]) == ["first"]
    spies["second"].fail = False
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet())) == ["cached", "ran", "ran"]
    assert not (tmp_path / ".partial").exists()


def test_a_later_stage_missing_input_stops_the_run_before_any_stage_runs(tmp_path, monkeypatch):
    from engine.errors import MissingInputError

    spies = {n: Spy(n) for n in ("first", "second", "third")}
    make_stages(monkeypatch, spies)
    kinds = runner.stage_kinds()

    def third_inputs(recipe):
        raise MissingInputError("questions.json not found; fix: set eval.interviews.questions")

    kinds[2].external_inputs = third_inputs
    with pytest.raises(MissingInputError, match="questions.json not found"):
        runner.run(FakeRecipe(), tmp_path, quiet())
    assert [spy.calls for spy in spies.values()] == [0, 0, 0], "a stage ran before the missing input was reported"
    # a run that stops before that stage does not need its input
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet(), until="second")) == ["ran", "ran"]


def test_a_folder_without_a_matching_record_is_not_done(tmp_path, monkeypatch):
    spies = {n: Spy(n) for n in ("first", "second", "third")}
    make_stages(monkeypatch, spies)
    runner.run(FakeRecipe(), tmp_path, quiet())
    (tmp_path / "second" / cache.RECORD).unlink()  # as if killed between writing files and the record
    assert statuses(runner.run(FakeRecipe(), tmp_path, quiet())) == ["cached", "ran", "cached"]


def test_key_is_canonical_json_sha256():
    assert cache.digest({"b": 1, "a": [1, 2]}) == cache.digest({"a": [1, 2], "b": 1})
    assert len(cache.digest({})) == 64
