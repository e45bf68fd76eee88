"""The one-screen summary printed at the end of `recipe run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def preference_phase(summary: dict) -> str:
    if not summary.get("preference"):
        return ""
    won = summary.get("preference_reward_accuracy")
    return f"; then {summary['preference']} {summary.get('preference_steps', '?')} steps" + (f", chosen preferred {won:.0%}" if isinstance(won, float) else "")


def describe(name: str, summary: dict) -> str:
    """One line about what a stage produced, from its summary dict."""
    if name == "source":
        return f"{summary.get('turns', 0):,} turns, {summary.get('scenes', 0):,} scenes, {summary.get('character_turns', 0):,} by the character"
    if name == "clean":
        changed = ", ".join(f"{r['rule']} {r['changed']}/{r['removed']}" for r in summary.get("rules", []) if r.get("changed") or r.get("removed"))
        return f"{summary.get('turns_out', 0):,} of {summary.get('turns_in', 0):,} turns kept" + (f" (changed/removed: {changed})" if changed else "")
    if name == "dataset":
        return (
            f"{summary.get('train', '?')} train / {summary.get('heldout', '?')} held-out samples "
            f"({summary.get('train_scenes', '?')} / {summary.get('heldout_scenes', '?')} scenes); "
            f"tokens p50 {summary.get('tokens_p50', '?')}, p95 {summary.get('tokens_p95', '?')}; template {summary.get('template', '?')}"
        )
    if name == "train":
        held_out = summary.get("final_eval_loss")
        processes = summary.get("processes") or 1
        return (
            f"{summary.get('method', 'lora')}, {summary.get('steps', '?')} steps, loss {_fmt(summary.get('first_loss', '?'))} → {_fmt(summary.get('final_loss', '?'))}"
            + (f" (held-out {_fmt(held_out)})" if held_out is not None else "")
            + f", {_fmt(summary.get('tokens_per_s', '?'))} tok/s, {summary.get('precision', '?')}"
            + (f", {processes} processes" if processes > 1 else "")
            + preference_phase(summary)
        )
    if name == "export":
        extras = " + adapter" if summary.get("adapter") else ""
        extras += ", Ollama Modelfile" if summary.get("ollama_template") is not None else ""
        return f"merged model{extras}, {summary.get('dtype', '?')}, {_fmt(summary.get('size_mb', '?'))} MB"
    if name == "eval":
        base, tuned = summary.get("base", {}), summary.get("tuned", {})
        if not base:
            return f"{len(summary.get('tasks', []))} tasks (table below)"
        return f"next-line acc {_fmt(base.get('acc', '?'))} → {_fmt(tuned.get('acc', '?'))} (chance {_fmt(summary.get('chance', '?'))}, n={summary.get('items', '?')})"
    items = [f"{k} {_fmt(v)}" for k, v in summary.items() if isinstance(v, (int, float, str))][:4]
    return ", ".join(items)


def print_summary(console: Any, recipe: Any, run_dir: Path, results: list, seconds: float) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=f"{recipe.name} — {run_dir}", title_justify="left", show_edge=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("result")
    for result in results:
        style = "green" if result.status == "cached" else "yellow"
        took = "—" if result.status == "cached" else f"{result.seconds:.1f}s"
        table.add_row(result.name, f"[{style}]{result.status}[/{style}]", took, describe(result.name, result.summary))
    console.print(table)

    by_name = {r.name: r.summary for r in results}
    evaluation = by_name.get("eval")
    if evaluation and evaluation.get("table"):
        scores = Table(title="base vs tuned on held-out scenes (± standard error; tuned-base paired per item)", title_justify="left", show_edge=False)
        for column, justify in (("task", "left"), ("metric", "left"), ("base", "right"), ("tuned", "right"), ("tuned-base", "right")):
            scores.add_column(column, justify=justify)
        # scores to 3 digits and standard errors to 2, so that the five columns fit 80 characters
        def shown(value, stderr):
            return "—" if value is None else (f"{value:.3g} ± {stderr:.2g}" if stderr is not None else f"{value:.3g}")

        def change(value, stderr):  # paired: the same items scored by both models
            return "—" if value is None or stderr is None else f"{value:+.3f} ± {stderr:.2g}"

        for row in evaluation["table"]:
            scores.add_row(
                row.get("kind", row["task"]), row["metric"], shown(row["base"], row["base_stderr"]), shown(row["tuned"], row["tuned_stderr"]),
                change(row.get("change"), row.get("change_se")),  # absent in runs recorded by eval stage version 2
            )
        console.print(scores)
        for line in evaluation.get("verdicts", []):
            console.print(f"  {line}", soft_wrap=True)
        if evaluation.get("judge"):
            means = ", ".join(f"{k} {_fmt(v)}" for k, v in evaluation["judge"].items())
            console.print(f"  judge (1-7): {means}", soft_wrap=True)
    elif evaluation and "base" in evaluation:  # a run recorded by the first eval stage version
        scores = Table(title=f"held-out next line: {evaluation.get('task', '')} ({evaluation.get('items', '?')} items, chance {_fmt(evaluation.get('chance', '?'))})", title_justify="left", show_edge=False)
        scores.add_column("model")
        scores.add_column("acc", justify="right")
        scores.add_column("acc_norm", justify="right")
        for label in ("base", "tuned"):
            row = evaluation.get(label, {})
            scores.add_row(
                label,
                f"{_fmt(row.get('acc', float('nan')))} ± {_fmt(row.get('acc_stderr', float('nan')))}",
                f"{_fmt(row.get('acc_norm', float('nan')))} ± {_fmt(row.get('acc_norm_stderr', float('nan')))}",
            )
        console.print(scores)
    if evaluation:
        name = recipe.character.shown_name
        sample = evaluation.get("sample")
        if sample:
            body = f"[dim]{escape(sample.get('context', ''))}[/dim]\n\n[bold]{name} (tuned):[/bold] {escape(sample.get('generated', ''))}\n[bold]{name} (real):[/bold] {escape(sample.get('real', ''))}"
            console.print(Panel(body, title="a held-out scene", title_align="left"))
        interview = (evaluation.get("interviews") or {}).get("samples") or []
        if interview:
            body = "\n\n".join(f"[bold]Q:[/bold] {escape(t.get('question', ''))}\n[bold]{name}:[/bold] {escape(t.get('answer', ''))}" for t in interview[:2])
            console.print(Panel(body, title="from the interviews (eval/interviews.md)", title_align="left"))
    ran = sum(1 for r in results if r.status == "ran")
    console.print(f"{ran} stage{'s' if ran != 1 else ''} ran, {len(results) - ran} cached, {seconds:.1f}s in all. Run folder: {run_dir}")
