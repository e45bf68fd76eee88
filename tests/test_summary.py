"""The closing summary of `recipe run`: the score table fits an 80-column terminal, one row a line.

    python -m pytest -q tests/test_summary.py
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from engine.summary import describe, print_summary


def row(kind: str, metric: str, base: float, tuned: float, base_se, tuned_se, change, change_se) -> dict:
    return {
        "task": f"shakespeare_falstaff_{kind}", "kind": kind, "metric": metric, "base": base, "base_stderr": base_se,
        "tuned": tuned, "tuned_stderr": tuned_se, "change": change, "change_se": change_se,
    }  # fmt: skip


# the figures of a `make demo` run (2026-12-06), with their full float digits
EVAL = {
    "table": [
        row("next_line", "acc", 0.3, 0.4, 0.059660053921349286, 0.06377928041432807, 0.1, 0.05674803065350239),
        row("next_line", "acc_norm", 0.26666666666666666, 0.55, 0.05757170261178304, 0.06476816543825593, 0.2833333333333333, 0.06329764084940138),
        row("reply_choice", "acc_mutual_info", 0.2833333333333333, 0.4, 0.0586, 0.0638, 0.11666666666666667, 0.068),
        row("reply_choice", "acc_norm", 0.35, 0.4166666666666667, 0.0621, 0.0642, 0.06666666666666667, 0.058),
        row("heldout_ppl", "bits_per_byte", 1.9763, 1.9515, None, None, -0.02481, 0.0101),
    ],
    "verdicts": ["shakespeare_falstaff_next_line: acc 0.300 -> 0.400 (chance 0.25); +0.100 ± 0.057 paired"],
    "base": {"acc": 0.3},
    "tuned": {"acc": 0.4},
    "chance": 0.25,
    "items": 60,
}


def printed(evaluation: dict) -> str:
    console = Console(file=io.StringIO(), width=80, record=True)
    recipe = SimpleNamespace(name="shakespeare_falstaff", character=SimpleNamespace(shown_name="Falstaff"))
    result = SimpleNamespace(name="eval", status="ran", seconds=458.7, summary=evaluation)
    print_summary(console, recipe, Path("runs/shakespeare_falstaff"), [result], 458.7)
    return console.export_text()


def test_score_rows_fit_80_columns_with_three_digits():
    text = printed(EVAL)
    lines = text.splitlines()
    metrics = [line for line in lines if "│" in line and line.split("│")[1].strip() in {"acc", "acc_norm", "acc_mutual_in…", "bits_per_byte"}]
    assert len(metrics) == 5, text  # a wrapped row would leave its second half on a line of its own
    assert not [line for line in lines if line.startswith("              │ ")], text  # no continuation lines
    cells = [[cell.strip() for cell in line.split("│")] for line in metrics]
    assert cells[0][2:] == ["0.3 ± 0.06", "0.4 ± 0.064", "+0.100 ± 0.057"]
    assert cells[1][2:] == ["0.267 ± 0.058", "0.55 ± 0.065", "+0.283 ± 0.063"]
    assert cells[4][2:] == ["1.98", "1.95", "-0.025 ± 0.01"]  # a drop in bits per byte: the tuned model is better


def test_train_line_rounds_the_losses():
    line = describe("train", {"method": "lora", "steps": 24, "first_loss": 4.331511497497559, "final_loss": 4.153695297241211, "tokens_per_s": 283.3, "precision": "bf16"})
    assert line == "lora, 24 steps, loss 4.332 → 4.154, 283.3 tok/s, bf16"


def test_train_line_names_the_preference_phase():
    summary = {"method": "lora", "steps": 24, "first_loss": 4.33, "final_loss": 4.15, "tokens_per_s": 283.3, "precision": "bf16",
               "preference": "dpo", "preference_steps": 60, "preference_final_loss": 0.62, "preference_reward_accuracy": 0.7667}  # fmt: skip
    assert describe("train", summary) == "lora, 24 steps, loss 4.33 → 4.15, 283.3 tok/s, bf16; then dpo 60 steps, chosen preferred 77%"
