"""How far is each held-out item from flipping? The next-line task's acc, seen item by item.

acc counts an item when the real line's summed log-likelihood beats every distractor's. This script reads the
per-item log-likelihoods a row kept (the eval stage's `per_item.json`, or `<row>.rescored.json` written by
`ablation.py --rescore`) and the row's items, and reports for base and tuned:

- the margin of each item: log-likelihood of the real line minus the best distractor's (nats; > 0 = right),
- how many wrong items lie within 1, 2, 5, 10 nats of flipping, i.e. what a given shift could buy, and the
  shift every real line would need for acc to gain 10 points,
- how far tuning moved the margins (mean, median, share of items moved up),
- how the margin follows length: the real line's characters minus the best distractor's.

    python bench/persona/margins.py --rows sft_dpo_lr1e3,sft_cpo      # writes bench/persona/cartman_margins.md / .png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def load_row(run_dir: Path) -> tuple[list[dict], dict]:
    """(items, {"base": per_item, "tuned": per_item}) of a row's next-line task."""
    folder = next(path for path in (run_dir / "eval" / "tasks").iterdir() if path.name.endswith("_next_line"))
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
    kept = run_dir / "eval" / "per_item.json"
    if kept.is_file():
        per_item = json.loads(kept.read_text())[folder.name]
    else:
        rescored = run_dir.parent / f"{run_dir.name}.rescored.json"
        if not rescored.is_file():
            raise SystemExit(f"{run_dir.name}: no per-item scores; run `python bench/persona/ablation.py --rescore --rows ...` first")
        per_item = json.loads(rescored.read_text())["per_item"]
    return items, per_item


def choice_scores(items: list[dict], logliks: list[float]) -> list[list[float]]:
    """The flat per-choice log-likelihoods (every item's choices in order) cut into one list per item."""
    widths = [len(item["choices"]) for item in items]
    if sum(widths) != len(logliks):
        raise SystemExit(f"per-item log-likelihoods ({len(logliks)}) do not match the items' choices ({sum(widths)})")
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [logliks[start : start + width] for start, width in zip(starts, widths)]


def best_distractor(item: dict, scores: list[float]) -> int:
    return max((i for i in range(len(scores)) if i != item["label"]), key=lambda i: scores[i])


def margins(items: list[dict], logliks: list[float]) -> list[float]:
    """Per item: real line's log-likelihood minus the best distractor's."""
    return [scores[item["label"]] - scores[best_distractor(item, scores)] for item, scores in zip(items, choice_scores(items, logliks))]


def length_gaps(items: list[dict], logliks: list[float]) -> list[int]:
    """Per item: characters of the real line minus those of the distractor the model liked best."""
    return [
        len(item["choices"][item["label"]]) - len(item["choices"][best_distractor(item, scores)])
        for item, scores in zip(items, choice_scores(items, logliks))
    ]


def shift_for(base: list[float], points: float) -> float | None:
    """Nats every real line would have to gain on its distractors for acc to rise by `points` (a share of the
    items): the margin of the wrong item that many places from flipping."""
    needed = round(points * len(base))
    wrong = sorted((m for m in base if m <= 0), reverse=True)  # nearest to flipping first
    return -wrong[needed - 1] if 0 < needed <= len(wrong) else None


def correlation(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / ((sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5)


def summarise(items: list[dict], per_item: dict) -> dict:
    base = margins(items, per_item["base"]["loglik"])
    tuned = margins(items, per_item["tuned"]["loglik"])
    shifts = [t - b for b, t in zip(base, tuned)]
    wrong = [m for m in base if m <= 0]
    gaps = length_gaps(items, per_item["base"]["loglik"])
    return {
        "items": len(items),
        "base_right": sum(m > 0 for m in base),
        "tuned_right": sum(m > 0 for m in tuned),
        "flipped_up": sum(b <= 0 < t for b, t in zip(base, tuned)),
        "flipped_down": sum(t <= 0 < b for b, t in zip(base, tuned)),
        "base_wrong_within": {str(n): sum(-n < m <= 0 for m in wrong) for n in (1, 2, 5, 10)},
        "shift_for_10_points": shift_for(base, 0.10),
        "base_margin_median": statistics.median(base),
        "shift_mean": statistics.fmean(shifts),
        "shift_median": statistics.median(shifts),
        "shift_up_share": sum(s > 0 for s in shifts) / len(shifts),
        "real_line_longer_share": sum(g > 0 for g in gaps) / len(gaps),
        "margin_vs_length_gap_r": correlation(base, [float(g) for g in gaps]),
        "base_margins": base,
        "tuned_margins": tuned,
    }


def nats(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} nats"


def write_report(table: str, rows: dict[str, dict]) -> None:
    lines = [
        f"# How far the held-out items are from flipping: {table}",
        "",
        "Margin of an item = summed log-likelihood of the real line minus that of the best distractor, in nats",
        "(acc counts the items with a margin above 0). Written by `python bench/persona/margins.py --table "
        f"{table} --rows NAME,...` from the rows' kept per-item scores; a run keeps the rows of earlier runs that it",
        "did not compute again (their run folders may be gone). The histogram shows the first row computed by the last run.",
        "",
        "| row | items | right base → tuned | flipped up / down | base-wrong within 1 / 2 / 5 / 10 nats | shift for +10 points | base median margin | shift mean / median (share up) | real line longer | r(margin, length gap) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        within = row["base_wrong_within"]
        lines.append(
            f"| {name} | {row['items']} | {row['base_right']} → {row['tuned_right']} | {row['flipped_up']} / {row['flipped_down']} "
            f"| {within['1']} / {within['2']} / {within['5']} / {within['10']} | {nats(row['shift_for_10_points'])} | {row['base_margin_median']:.1f} "
            f"| {row['shift_mean']:+.2f} / {row['shift_median']:+.2f} ({100 * row['shift_up_share']:.0f} %) "
            f"| {100 * row['real_line_longer_share']:.0f} % | {row['margin_vs_length_gap_r']:.2f} |"
        )
    (HERE / f"{table}_margins.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (HERE / f"{table}_margins.json").write_text(json.dumps({n: {k: v for k, v in r.items() if not k.endswith("_margins")} for n, r in rows.items()}, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = next(name for name, row in rows.items() if "base_margins" in row)  # rows kept from the JSON have no margins
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = list(range(-80, 22, 2))
    for model in ("base", "tuned"):
        left.hist([max(min(m, 20), -80) for m in rows[shown][f"{model}_margins"]], bins=bins, alpha=0.6, label=model)
    left.axvline(0, color="black", linewidth=1)
    left.set_xlabel("real line minus best distractor (nats; clipped to [-80, 20])")
    left.set_ylabel("items")
    left.set_title(f"{table} {shown}: right {rows[shown]['base_right']} → {rows[shown]['tuned_right']} of {rows[shown]['items']}", fontsize=10)
    left.legend()
    names = list(rows)
    right.barh(range(len(names)), [rows[n]["shift_mean"] for n in names], color="tab:orange", label="mean shift by tuning")
    needed = [rows[n]["shift_for_10_points"] for n in names if rows[n]["shift_for_10_points"] is not None]
    if needed:
        right.axvline(min(needed), color="black", linestyle="--", label=f"shift for +10 points of acc ({min(needed):.1f}+ nats)")
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("nats")
    right.set_title("how far tuning moved the margins", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / f"{table}_margins.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="cartman")
    parser.add_argument("--rows", required=True, help="comma-separated row names of bench/persona/ablation.py")
    parser.add_argument("--runs", default="runs/persona", help="folder of the rows' run folders")
    args = parser.parse_args()
    kept_path = HERE / f"{args.table}_margins.json"
    kept = json.loads(kept_path.read_text()) if kept_path.is_file() else {}
    wanted = [r for r in args.rows.split(",") if r]
    rows = {}
    for name in wanted:
        items, per_item = load_row(ROOT / args.runs / f"{args.table}_{name}")
        rows[name] = summarise(items, per_item)
        row = rows[name]
        print(f"{name}: right {row['base_right']} -> {row['tuned_right']} of {row['items']}; base-wrong within 1/2/5 nats: "
              f"{row['base_wrong_within']}; shift mean {row['shift_mean']:+.2f} median {row['shift_median']:+.2f}")
    rows = {**rows, **{name: row for name, row in kept.items() if name not in rows}}  # the new rows first: the histogram's
    write_report(args.table, rows)
    print(f"wrote bench/persona/{args.table}_margins.md / .json / .png")


if __name__ == "__main__":
    main()
