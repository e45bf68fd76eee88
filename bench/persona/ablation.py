"""Persona ablation: which training choices make the tuned model beat its base on held-out episodes.

Each row is the recipe with a few `--set` overrides, run through the engine (`recipe run`) into its own run
folder, scored by the eval stage's next-line task only (K = 3 distractors spoken by other characters in the
same held-out episode; acc, acc_norm, acc_mutual_info with standard errors, and the paired gain). Finished
rows are cache hits, so rerunning the script only runs what is new. Results go to
bench/persona/ablation.json, ablation.md (a table with the command of each row) and ablation.png.

    python bench/persona/ablation.py                          # every row of the Cartman table
    python bench/persona/ablation.py --rows sft,sft_dpo       # some rows
    python bench/persona/ablation.py --table falstaff               # the Falstaff table
    python bench/persona/ablation.py --rescore                      # paired gains on every metric for rows run
                                                                    # before the eval stage kept per-item scores
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# only the next-line task is scored, without the adapter check, samples or interviews: same items for every row
EVAL_ONLY_NEXT_LINE = (
    "eval.tasks=[next_line]", "eval.check_adapter=false", "eval.interviews.enabled=false", "eval.sample_replies=0",
)  # fmt: skip

TABLES: dict[str, dict] = {
    "cartman": {
        "recipe": "recipes/southpark_cartman.yaml",
        "rows": {
            "sft": ("SFT only (80 steps x 8, LoRA r16 attention, lr 2e-4)", ["train.preference.method=none"]),
            "sft_dpo": ("SFT 80 steps, then DPO 60 steps x 8 pairs (beta 0.1, lr 2e-4)", ["train.preference.learning_rate=0.0002"]),
            "sft_dpo_beta05": ("SFT, then DPO with beta 0.5 (5x the push per pair at the start), lr 2e-4", ["train.preference.beta=0.5", "train.preference.learning_rate=0.0002"]),
            "sft_dpo_sft": ("SFT, then DPO + NLL of the chosen line (RPO-style)", ["train.preference.method=dpo_sft"]),
            "sft_dpo_any": ("SFT, then DPO with rejected lines from any training episode", ["train.preference.rejected_from=any_scene"]),
            "sft_dpo_long": ("SFT, then DPO 150 steps (lr 1e-3)", ["train.preference.max_steps=150"]),
            "sft_dpo_lr1e3": (
                "the recipe default until 2026-12-01: SFT with LoRA dropout 0.05, then DPO with lr 1e-3 (5x the step size of the LoRA update)",
                ["train.preference.learning_rate=0.001"],
            ),
            "dpo_random_rejected": (
                "the recipe default from 2026-12-01 to 2026-12-06: SFT with LoRA dropout 0, then DPO with lr 1e-3, rejected lines drawn at random",
                ["train.preference.learning_rate=0.001", "train.preference.rejected_length=any"],
            ),
            "dpo_random_rejected_any_length": (
                "the same model (dpo_random_rejected's run folder: only the eval stage runs again), scored on distractors drawn at random",
                ["train.preference.learning_rate=0.001", "train.preference.rejected_length=any", "eval.distractor_length=any"],
            ),
            "dpo_matched_rejected": (
                "as dpo_random_rejected, but DPO's rejected lines are the scene's lines nearest the real one in length (as the eval's distractors)",
                ["train.preference.learning_rate=0.001", "train.preference.rejected_length=matched"],
            ),
            "dpo100_matched_rejected": (
                "the recipe default since 2026-12-06: as dpo_matched_rejected with 100 DPO steps instead of 60 (800 pairs)",
                ["train.preference.learning_rate=0.001", "train.preference.rejected_length=matched", "train.preference.max_steps=100"],
            ),
            "dpo200x4_matched_rejected": (
                "as dpo100_matched_rejected with 200 DPO steps x 4 pairs: the same 800 pairs, twice the updates (Falstaff's winner)",
                ["train.preference.learning_rate=0.001", "train.preference.rejected_length=matched", "train.preference.max_steps=200",
                 "train.preference.batch_size=4"],
            ),
            "dpo_sft100_matched_rejected": (
                "as dpo100_matched_rejected with the chosen line's NLL added to the DPO loss (method dpo_sft, RPO-style, weight 1)",
                ["train.preference.method=dpo_sft", "train.preference.learning_rate=0.001", "train.preference.rejected_length=matched",
                 "train.preference.max_steps=100"],
            ),
            "ipo100_matched_rejected": (
                "as dpo100_matched_rejected with the IPO loss (squared distance of the margin from 1/(2 beta), beta 0.1) instead of DPO's sigmoid",
                ["train.preference.method=ipo", "train.preference.learning_rate=0.001", "train.preference.rejected_length=matched",
                 "train.preference.max_steps=100"],
            ),
            "sft300_dpo": (
                "more data: SFT 300 steps x 8 (2,400 of the 9,706 samples, 3.75x the default), then DPO as the default (lr 1e-3)",
                ["train.max_steps=300", "train.preference.learning_rate=0.001"],
            ),
            "speakers_all": (
                "speaker-conditioned: SFT 80 x 8 on every speaker's lines (min 20 lines; the prompt names the speaker), then DPO as the default",
                ["dataset.speakers=all", "train.preference.learning_rate=0.001"],
            ),
            "sft_cpo": (
                "SFT, then CPO 60 steps x 8 pairs (reference-free: own log-prob margin + chosen NLL; beta 0.1, lr 1e-3)",
                ["train.preference.method=cpo", "train.preference.learning_rate=0.001"],
            ),
            "context2": (
                "context length: 2 earlier lines of the scene instead of 5 (prompts and items shorter), SFT + DPO as the default",
                ["dataset.context_turns=2", "train.preference.learning_rate=0.001"],
            ),
            "full_sft_dpo": (
                "full fine-tuning (every weight): SFT 80 x 8 at lr 5e-5, then DPO 60 x 8 at lr 5e-6",
                ["train.method=full", "train.learning_rate=0.00005", "train.preference.learning_rate=0.000005"],
            ),
            "rank64": (
                "LoRA rank 64 (alpha 128) on attention, SFT, then DPO as the default",
                ["train.lora.rank=64", "train.lora.alpha=128", "train.preference.learning_rate=0.001"],
            ),
            "sft_dpo_lr1e3_all_linear": (
                "LoRA r16 on every linear layer (attention + MLP), SFT, then DPO with lr 1e-3",
                ["train.lora.target_modules=all-linear", "train.preference.learning_rate=0.001"],
            ),
        },
    },
    "falstaff": {
        "recipe": "recipes/shakespeare_falstaff.yaml",
        "eval": ["eval.max_items=200"],  # every held-out speech (the demo scores 60 to stay short)
        "rows": {
            "sft": ("the recipe default until 2026-12-01: SFT only (24 steps x 8, LoRA r16 attention, dropout 0.05, lr 2e-4)",
                    ["train.preference.method=none"]),
            "sft_only": ("the recipe default until 2026-12-06: SFT only (24 steps x 8, LoRA r16 attention, dropout 0, lr 2e-4); length-matched distractors",
                         ["train.preference.method=none"]),
            "sft_only_any_length": ("the same settings scored on distractors drawn at random (run 2026-12-01; rerun, it takes the sft_only row's folder)",
                                    ["train.preference.method=none", "eval.distractor_length=any"]),
            "dpo_matched_rejected": (
                "SFT 24 steps, then DPO 30 steps x 8 pairs (beta 0.1, lr 1e-3), rejected lines the scene's nearest the real one in length",
                ["train.preference.method=dpo", "train.preference.max_steps=30", "train.preference.batch_size=8",
                 "train.preference.learning_rate=0.001", "train.preference.beta=0.1", "train.preference.rejected_length=matched"],
            ),
            "dpo60x4_matched_rejected": (
                "the recipe default since 2026-12-06: SFT 24 steps, then DPO 60 steps x 4 pairs (beta 0.1, lr 1e-3; the same 240 pairs as 30 x 8, twice the updates), rejected lines length-matched",
                ["train.preference.method=dpo", "train.preference.max_steps=60", "train.preference.batch_size=4",
                 "train.preference.learning_rate=0.001", "train.preference.beta=0.1", "train.preference.rejected_length=matched"],
            ),
            "sft_dpo": (
                "SFT 24 steps, then DPO 30 steps x 4 pairs (beta 0.5, lr 2e-4)",
                ["train.preference.method=dpo", "train.preference.max_steps=30", "train.preference.batch_size=4",
                 "train.preference.learning_rate=0.0002", "train.preference.beta=0.5"],
            ),
            "sft_dpo_lr1e3": (
                "SFT 24 steps, then DPO 30 steps x 8 pairs (beta 0.1, lr 1e-3)",
                ["train.preference.method=dpo", "train.preference.max_steps=30", "train.preference.batch_size=8",
                 "train.preference.learning_rate=0.001", "train.preference.beta=0.1"],
            ),
        },
    },
}

# the rows run before 2026-12-01 ran while recipes/_base/smollm2_cpu.yaml set LoRA dropout 0.05, while the eval drew
# distractors at random and while DPO drew rejected lines at random (the default until 2026-12-06): their commands
# say so, so that rerunning a row reproduces what its figures came from
CURRENT_ROWS = (
    "sft_only", "sft_only_any_length", "dpo_random_rejected", "dpo_random_rejected_any_length", "dpo_matched_rejected",
    "dpo100_matched_rejected", "dpo60x4_matched_rejected", "dpo200x4_matched_rejected", "dpo_sft100_matched_rejected",
    "ipo100_matched_rejected",
)  # fmt: skip
TABLES["cartman"]["runs_in"] = {"dpo_random_rejected_any_length": "dpo_random_rejected"}  # the same model: training is a cache hit
TABLES["falstaff"]["runs_in"] = {"sft_only_any_length": "sft_only"}
for table in TABLES.values():
    for row_name, (_, row_sets) in table["rows"].items():
        if row_name not in CURRENT_ROWS:
            if not any(item.startswith("train.lora.dropout=") for item in row_sets):
                row_sets.append("train.lora.dropout=0.05")
            row_sets.append("eval.distractor_length=any")
            if "train.preference.method=none" not in row_sets:
                row_sets.append("train.preference.rejected_length=any")


def run_row(recipe: str, run_dir: Path, overrides: list[str], log: Path) -> float:
    command = [sys.executable, "-m", "engine.cli", "run", recipe, "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"row failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def rescore_row(recipe_path: str, run_dir: Path, overrides: list[str]) -> Path:
    """Paired gains on every metric for a row whose eval stage predates them (stage version 2 kept acc's only).

    Scores the row's exported model again on the row's own task files, pairs it per item with the base model's
    cached scores (scored too when the cache lacks them), and writes <row>.rescored.json beside the run folder;
    the stage's own outputs are left as they are, so the row stays a cache hit."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from engine.datafiles import cache_root
    from engine.recipe import load_recipe
    from engine.stages import eval as eval_stage

    recipe = load_recipe(recipe_path, tuple(overrides))
    cfg = recipe.eval
    folder = next(path for path in (run_dir / "eval" / "tasks").iterdir() if path.name.endswith("_next_line"))
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines() if line]
    task = eval_stage.Task(kind="next_line", name=folder.name, folder=folder, items=items, choices=cfg.distractors + 1)
    trust = recipe.model.trust_remote_code
    with tempfile.TemporaryDirectory(prefix="rescore-") as include:
        eval_stage.write_task_yaml(Path(include), task.name, str((folder / "items.jsonl").resolve()), recipe.character.name, cfg.distractors, "next_line", cfg.mutual_info)
        cached = cache_root() / "eval-base" / f"{eval_stage.base_cache_key(sorted(folder.iterdir()), recipe)}.json"
        if cached.is_file():
            base = json.loads(cached.read_text(encoding="utf-8"))["scores"][task.name]
        else:
            print(f"  base scores not cached ({cached.name}): scoring the base model", flush=True)
            base = eval_stage.score(eval_stage.resolve_base_model(recipe.model, None), [task], Path(include), cfg.batch_size, trust)[task.name]
        tuned = eval_stage.score(run_dir / "export" / "model", [task], Path(include), cfg.batch_size, trust)[task.name]
    recorded = json.loads((run_dir / "eval" / "results.json").read_text())["tasks"][task.name]
    if abs(tuned["acc"] - recorded["tuned"]["acc"]) > 1e-9 or abs(base["acc"] - recorded["base"]["acc"]) > 1e-9:
        raise SystemExit(f"{run_dir.name}: rescoring gives acc {base['acc']} -> {tuned['acc']}, the row recorded "
                         f"{recorded['base']['acc']} -> {recorded['tuned']['acc']}: not the same items or models")
    out = run_dir.parent / f"{run_dir.name}.rescored.json"
    out.write_text(json.dumps({"paired": eval_stage.paired_gains(task, base, tuned), "per_item": {"base": base["per_item"], "tuned": tuned["per_item"]}}) + "\n")
    return out


def read_row(run_dir: Path) -> dict:
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    task = next(t for t in results["tasks"].values() if t["kind"] == "next_line")
    rescored = run_dir.parent / f"{run_dir.name}.rescored.json"
    paired = task["comparison"].get("paired") or (json.loads(rescored.read_text())["paired"] if rescored.is_file() else {})
    train = json.loads((run_dir / "train" / "metrics.json").read_text())
    preference = train.get("preference") or {}
    row = {
        "items": task["items"],
        "chance": task["chance"],
        "gain_acc": task["comparison"]["diff"],
        "gain_paired_se": task["comparison"]["paired_se"],
        "outcome": task["comparison"]["outcome"],
        "sft_s": train["train_runtime_s"],
        "sft_resumed_from": train.get("resumed_from"),  # the loop's time then counts the steps after that checkpoint only
        "preference_s": preference.get("train_runtime_s", 0.0),
        "preference_reward_accuracy": preference.get("reward_accuracy_last_quarter"),
    }
    for metric, gain in paired.items():
        row[f"gain_{metric}"], row[f"gain_{metric}_paired_se"] = gain["diff"], gain["paired_se"]
    for model in ("base", "tuned"):
        for metric in ("acc", "acc_norm", "acc_mutual_info"):
            if metric in task[model]:
                row[f"{model}_{metric}"] = task[model][metric]
                row[f"{model}_{metric}_se"] = task[model].get(f"{metric}_stderr")
    return row


def pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def gain(row: dict, metric: str) -> str:
    if f"gain_{metric}" not in row:
        return ""
    return f" ({100 * row[f'gain_{metric}']:+.1f} ± {100 * row[f'gain_{metric}_paired_se']:.1f})"


def train_seconds(row: dict) -> str:
    total = f"{row['sft_s'] + row['preference_s']:.0f}"
    resumed = row.get("sft_resumed_from")
    return f"{total} (SFT resumed from {resumed}: the steps before it are not counted)" if resumed else total


def write_report(table: str, recipe: str, rows: dict[str, dict]) -> None:
    lines = [
        f"# Persona ablation: {table} ({recipe})",
        "",
        "Next-line accuracy on held-out episodes (the real line vs 3 lines of other characters in the same episode; chance 25 %;",
        "drawn at random before 2026-12-01, the lines nearest the real one in length since: `eval.distractor_length`, see below),",
        "base vs tuned on the same items, in percent ± standard error. Gain = tuned - base acc with its paired standard error;",
        "the acc_norm and acc_mutual_info columns give theirs in brackets where the row's per-item scores were kept",
        "(rows run before the eval stage kept them were scored again from their exported models: `ablation.py --rescore`).",
        "Train time: SFT + preference phase, seconds of the training loop on this machine's 2 cores.",
        "",
        "| row | what | acc base → tuned | gain (paired SE) | acc_norm base → tuned | acc_mutual_info base → tuned | train s | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['what']} | {pct(row['base_acc'], row['base_acc_se'])} → {pct(row['tuned_acc'], row['tuned_acc_se'])} "
            f"| {100 * row['gain_acc']:+.1f} ({100 * row['gain_paired_se']:.1f}) "
            f"| {pct(row.get('base_acc_norm'))} → {pct(row.get('tuned_acc_norm'))}{gain(row, 'acc_norm')} "
            f"| {pct(row.get('base_acc_mutual_info'))} → {pct(row.get('tuned_acc_mutual_info'))}{gain(row, 'acc_mutual_info')} "
            f"| {train_seconds(row)} | `{row['command']}` |"
        )
    lines += ["", f"Items per row: {', '.join(sorted({str(r['items']) for r in rows.values()}))}.", ""]
    notes = HERE / f"{table}_notes.md"  # hand-written measurements that are not rows (kept under the table)
    if notes.is_file():
        lines += [notes.read_text(encoding="utf-8")]
    (HERE / f"{table}_ablation.md").write_text("\n".join(lines), encoding="utf-8")
    (HERE / f"{table}_ablation.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3.2 * len(names)), 4))
    for ax, metric in zip(axes, ("acc", "acc_norm")):
        for offset, model in ((-0.2, "base"), (0.2, "tuned")):
            ax.bar([i + offset for i in range(len(names))], [100 * rows[n][f"{model}_{metric}"] for n in names], width=0.4,
                   yerr=[100 * (rows[n].get(f"{model}_{metric}_se") or 0) for n in names], capsize=3, label=model)  # fmt: skip
        ax.axhline(100 * next(iter(rows.values()))["chance"], color="grey", linestyle=":", label="chance")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"next-line {metric} on held-out episodes (%)")
        ax.set_title(f"{table}: {metric}, base vs tuned")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(HERE / f"{table}_ablation.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=sorted(TABLES), default="cartman")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all rows of the table)")
    parser.add_argument("--runs", default="runs/persona", help="folder of the rows' run folders")
    parser.add_argument("--report-only", action="store_true", help="only collect finished rows into the report")
    parser.add_argument("--rescore", action="store_true", help="finished rows without per-metric paired gains: score their models again (no training)")
    args = parser.parse_args()
    spec = TABLES[args.table]
    wanted = [r for r in args.rows.split(",") if r] or list(spec["rows"])
    collected_path = HERE / f"{args.table}_ablation.json"
    collected = json.loads(collected_path.read_text()) if collected_path.is_file() else {}
    for name in wanted:
        what, row_overrides = spec["rows"][name]
        overrides = [*row_overrides, *EVAL_ONLY_NEXT_LINE, *spec.get("eval", [])]
        run_dir = ROOT / args.runs / f"{args.table}_{spec['runs_in'].get(name, name)}"
        if args.rescore:
            results = run_dir / "eval" / "results.json"
            if results.is_file() and not (run_dir.parent / f"{run_dir.name}.rescored.json").is_file():
                next_line = next(t for t in json.loads(results.read_text())["tasks"].values() if t["kind"] == "next_line")
                if "paired" not in next_line["comparison"]:
                    print(f"{name}: rescoring {run_dir / 'export' / 'model'}", flush=True)
                    print(f"{name}: wrote {rescore_row(spec['recipe'], run_dir, overrides)}", flush=True)
        elif not args.report_only:
            log = ROOT / args.runs / f"{args.table}_{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"{name}: {what} ... (log {log.relative_to(ROOT)})", flush=True)
            wall = run_row(spec["recipe"], run_dir, overrides, log)
            print(f"{name}: done in {wall:.0f} s", flush=True)
        if not (run_dir / "eval" / "results.json").is_file():
            continue
        command = "recipe run " + spec["recipe"] + "".join(f" --set {shlex.quote(o)}" for o in overrides)
        if (args.report_only or args.rescore) and name in spec["runs_in"] and name in collected:
            # its folder's eval is whichever row ran there last: keep the figures recorded when this row ran
            collected[name].update(what=what, command=command)
            continue
        collected[name] = {"what": what, "command": command, **read_row(run_dir)}
        row = collected[name]
        print(f"{name}: acc {pct(row['base_acc'])} -> {pct(row['tuned_acc'])}, gain {100 * row['gain_acc']:+.1f} ± {100 * row['gain_paired_se']:.1f}")
    order = list(spec["rows"])
    collected = {name: collected[name] for name in order if name in collected}
    if collected:
        write_report(args.table, spec["recipe"], collected)
        print(f"wrote bench/persona/{args.table}_ablation.md / .json / .png")


if __name__ == "__main__":
    main()
