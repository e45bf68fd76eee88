"""bench/train_throughput.py: the pieces of its arithmetic that a drifting machine makes matter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("train_throughput", Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py")
train_throughput = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(train_throughput)


def row(variant: str, rate: float, round_index: int | None = None, kind: str = "engine") -> dict:
    figures = {"variant": variant, "kind": kind, "tokens_per_s": rate}
    return figures if round_index is None else {**figures, "round": round_index}


def test_each_ablation_is_compared_with_the_engine_of_its_own_round():
    rows = [
        row("engine", 300.0), row("trl defaults", 120.0, kind="plain"), row("engine, sdpa attention", 240.0),
        # the machine is a third slower in round 2: a ratio across rounds would say 0.53x, within the round it is 0.8x
        row("engine, sdpa attention", 160.0, 2), row("engine", 200.0, 2),
        row("engine", 310.0, 3), row("engine, sdpa attention", 279.0, 3),
    ]  # fmt: skip
    paired = train_throughput.paired_ratios(rows)
    assert paired == {"engine, sdpa attention": {"median": 0.8, "low": 0.8, "high": 0.9, "rounds": 3}}


def test_one_round_gives_no_paired_ratios():
    assert train_throughput.paired_ratios([row("engine", 300.0), row("engine, LoRA dropout 0", 360.0), row("engine again (drift check)", 250.0)]) == {}
