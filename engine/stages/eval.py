"""eval: does the tuned model sound like the character on scenes it never saw? Base vs tuned, with lm-eval.

Three task kinds, each written as a plain lm-eval task folder in the run (`tasks/<task>/<task>.yaml` + its
data) that anyone can rerun unchanged:

    cd <run folder>/eval/tasks/<task> && lm_eval --include_path . --tasks <task> --model hf \
        --model_args pretrained=<model folder>[,peft=<adapter folder>] --device cpu --batch_size 8

- `<name>_next_line`: the scene so far -> the character's real next line vs K distractors (other characters'
  lines of the scene, the character's lines of other scenes, or random lines: `distractor_pool`), by default
  the lines of the pool nearest the real one in length (`distractor_length`): acc sums log-probabilities, so
  with random distractors it mostly rewards the shortest line (measured on Cartman: bench/persona/).
- `<name>_reply_choice`: Yothalia's benchmark scored by log-likelihood: the prompt (instruction + input, or
  the scene) -> the right reply vs K replies to other held-out prompts.
- `<name>_heldout_ppl`: perplexity of the character's held-out lines (`loglikelihood_rolling`).

acc, acc_norm and acc_mutual_info (multiple choice), word/byte perplexity and bits per byte (perplexity),
with item counts, chance and standard errors; base and tuned are compared per item (paired) on every metric
(results.json: `comparison.paired`), each task gets a one-line verdict on acc (bits per byte for perplexity),
and the per-item values of both models are kept in `per_item.json` for any later pairing. The tuned model
is scored as exported (merged) and as base + adapter; the two must agree, or the stage fails (an adapter
PEFT silently ignored scores like the base).

(`--device`, not `device=` inside --model_args: the 0.4.13 CLI always passes its own device, default cuda:0.)

The base model's scores are cached outside the run (cache_root()/eval-base/<key>.json), keyed by the task
files, the base model's bytes and the library versions, so that re-training only re-scores the tuned model.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from importlib.metadata import version as package_version
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.datafiles import cache_root, sha256_file
from engine.errors import StageError
from engine.interview import InterviewConfig, question_file, read_interviews, run_interviews
from engine.judge import JudgeConfig, judge_interviews
from engine.modelcard import tuned_minus_base, write_eval_card
from engine.models import base_model_input, resolve_base_model
from engine.registry import StageContext, register_stage


TASK_KINDS = ("next_line", "reply_choice", "perplexity")
NEAR_DUPLICATE = 0.9  # difflib ratio at or above which two lines count as the same line


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[Literal["next_line", "reply_choice", "perplexity"]] = Field(
        default_factory=lambda: list(TASK_KINDS),
        description="Tasks to score: next_line (scene -> the real next line vs distractors), reply_choice (Yothalia's "
        "benchmark: prompt -> the right reply vs replies to other prompts), perplexity (of the character's held-out lines).",
    )
    distractors: int = Field(3, ge=1, description="Wrong choices per next_line item (chance = 1 / (distractors + 1)).")
    distractor_pool: Literal["same_scene", "character_other_scenes", "random"] = Field(
        "same_scene",
        description="Where next_line's wrong choices come from: same_scene = other characters' lines in the same scene (tests style; "
        "then other held-out scenes); character_other_scenes = the character's own lines from other held-out scenes "
        "(tests content); random = any line of the held-out scenes.",
    )
    distractor_length: Literal["matched", "any"] = Field(
        "matched",
        description="How next_line's wrong choices are drawn from their pool: matched = the lines nearest the real line in "
        "length (so acc, a sum of log-probabilities, cannot be won by picking the shortest line), any = at random.",
    )
    reply_choices: int = Field(4, ge=1, description="Wrong replies per reply_choice item (4 = Yothalia's five options).")
    mutual_info: bool = Field(
        True, description="Also report acc_mutual_info (choice log-likelihood minus its unconditional log-likelihood; one extra request per choice)."
    )
    max_items: int = Field(100, ge=1, description="At most this many held-out items (a seeded sample) per task.")
    seed: int = Field(0, description="Seed of the item sample, the distractors and the position of the real line.")
    batch_size: Union[int, Literal["auto"]] = Field(
        "auto", description="lm-eval batch size: an int, or auto = lm-eval's search on a GPU, 8 on a CPU (where the search would be slow); does not change the scores."
    )
    check_adapter: bool = Field(
        True, description="Also score base + adapter (PEFT) and require it to agree with the merged model (catches an adapter that was silently ignored)."
    )
    sample_replies: int = Field(3, ge=0, description="How many held-out prompts get a generated reply in samples.md.")
    max_new_tokens: int = Field(48, ge=1, description="Longest generated reply in samples.md, in tokens.")
    do_sample: bool = Field(False, description="Sample the replies in samples.md instead of greedy decoding.")
    repetition_penalty: float = Field(
        1.3, ge=1.0, description="Penalty on repeated tokens in samples.md replies (1.0 = none; the South Park bot used 1.3)."
    )
    interviews: InterviewConfig = Field(
        default_factory=InterviewConfig,
        description="Character-LLM-style single- and multi-turn interviews of the tuned model (interviews.jsonl / interviews.md).",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig,
        description="Optional LLM judge (any OpenAI-compatible endpoint) scoring each interview 1-7 on Character-LLM's five dimensions.",
    )

    @model_validator(mode="after")
    def _judge_needs_interviews(self) -> "EvalConfig":
        if self.judge.enabled and not self.interviews.enabled:
            raise ValueError("judge.enabled needs interviews.enabled: the judge scores the interviews")
        return self


def recipe_dir(recipe: Any) -> Optional[Path]:
    """The folder relative paths in the recipe resolve against (None for a recipe built in code)."""
    return recipe.source_dir() if hasattr(recipe, "source_dir") else None


def eval_inputs(recipe: Any) -> dict:
    """The base model's bytes and, when interviews run, the question file's (the shipped set's too)."""
    inputs = {"base_model": base_model_input(recipe.model)}
    if recipe.eval.interviews.enabled:
        inputs["questions"] = question_file(recipe.eval.interviews, recipe_dir(recipe))
    return inputs


# ---------------------------------------------------------------- the items


TASK_SUFFIX = {"next_line": "next_line", "reply_choice": "reply_choice", "perplexity": "heldout_ppl"}


def task_name(recipe_name: str, kind: str = "next_line") -> str:
    """`<recipe name>_<kind>`, lower case, only [a-z0-9_] (lm-eval task names are looked up verbatim)."""
    stem = re.sub(r"[^a-z0-9_]+", "_", recipe_name.lower()).strip("_") or "recipe"
    return f"{stem}_{TASK_SUFFIX[kind]}"


def normalise(text: str) -> str:
    """What counts as the same line: case and runs of whitespace ignored."""
    return " ".join(text.split()).casefold()


def read_turns(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def lines_by_scene(turns: list[dict], keep: Callable[[dict], bool]) -> dict[str, list[str]]:
    """Lines of the turns `keep` accepts, by scene, in file order, without empty or repeated lines."""
    by_scene: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for turn in turns:
        text = str(turn.get("text") or "").strip()
        if not text or not keep(turn):
            continue
        scene = str(turn["scene"])
        key = normalise(text)
        if key in seen.setdefault(scene, set()):
            continue
        seen[scene].add(key)
        by_scene.setdefault(scene, []).append(text)
    return by_scene


def other_lines_by_scene(turns: list[dict], character: str) -> dict[str, list[str]]:
    """Lines of everyone but the character, by scene."""
    return lines_by_scene(turns, lambda turn: turn.get("speaker") != character)


def distractor_pools(policy: str, scene: str, heldout_scenes: list[str], all_scenes: list[str]) -> list[list[str]]:
    """The scenes to draw from, in order of preference, for one item's scene."""
    other_heldout = [s for s in heldout_scenes if s != scene]
    if policy == "same_scene":
        # never a training scene's line: the tuned model has seen those, and would be tested on memory
        return [[scene], other_heldout]
    if policy == "character_other_scenes":
        return [other_heldout]  # held-out scenes only: no trained-on line of the character is ever a choice
    return [heldout_scenes]  # random: any line of the held-out scenes, one pool


def is_near_duplicate(text: str, others: list[str]) -> bool:
    """True when `text` is (almost) one of `others`: the same after normalising, or a difflib ratio >= 0.9."""
    import difflib

    key = normalise(text)
    for other in others:
        if key == other:
            return True
        matcher = difflib.SequenceMatcher(None, key, other, autojunk=False)
        if matcher.real_quick_ratio() >= NEAR_DUPLICATE and matcher.quick_ratio() >= NEAR_DUPLICATE and matcher.ratio() >= NEAR_DUPLICATE:
            return True
    return False


def length_gap(text: str, gold: str) -> float:
    """How far apart two lines are in length: |log(len(text) / len(gold))| in characters (0 = the same length)."""
    return abs(math.log(max(len(text), 1) / max(len(gold), 1)))


def draw_unlike(
    gold: str, candidates: list[str], k: int, rng: random.Random, taken: list[str] | None = None, match_length: bool = False
) -> list[str]:
    """Up to k candidates, none a near-duplicate of the gold line or of each other: in a seeded random order, or
    with match_length the ones nearest the gold line in length first (ties in the seeded random order)."""
    chosen: list[str] = []
    seen = taken if taken is not None else [normalise(gold)]
    order = list(candidates)
    rng.shuffle(order)
    if match_length:
        order.sort(key=lambda text: length_gap(text, gold))  # a stable sort: equal gaps keep the shuffled order
    for text in order:
        if len(chosen) == k:
            break
        if not is_near_duplicate(text, seen):
            chosen.append(text)
            seen.append(normalise(text))
    return chosen


def pick_distractors(
    gold: str, scene: str, lines: dict[str, list[str]], heldout_scenes: list[str], k: int, rng: random.Random,
    policy: str = "same_scene", match_length: bool = False,
) -> list[str]:
    """K distinct lines unlike the gold one (no near-duplicates), drawn from the policy's pools in order
    (within a pool, the nearest in length first when match_length)."""
    taken = [normalise(gold)]
    chosen: list[str] = []
    for pool_scenes in distractor_pools(policy, scene, heldout_scenes, list(lines)):
        unique: dict[str, str] = {}  # normalised -> first spelling, in file order (deterministic)
        for text in (text for s in pool_scenes for text in lines.get(s, [])):
            unique.setdefault(normalise(text), text)
        chosen += draw_unlike(gold, list(unique.values()), k - len(chosen), rng, taken, match_length)
        if len(chosen) == k:
            break
    return chosen


def build_items(heldout: Any, turns: list[dict], character: str, cfg: EvalConfig) -> list[dict]:
    """The task's documents: a seeded sample of held-out rows, each with shuffled choices and the gold label."""
    rows = [row for row in heldout if str(row["completion"]).strip()]
    picked = sorted(random.Random(cfg.seed).sample(range(len(rows)), min(cfg.max_items, len(rows))))
    if cfg.distractor_pool == "same_scene":
        lines = other_lines_by_scene(turns, character)
    elif cfg.distractor_pool == "character_other_scenes":
        lines = lines_by_scene(turns, lambda turn: turn.get("speaker") == character)
    else:
        lines = lines_by_scene(turns, lambda turn: True)
    heldout_scenes = sorted({str(row["scene"]) for row in rows})
    items = []
    for index in picked:
        row = rows[index]
        gold = str(row["completion"])
        # one generator per item: an item's choices do not depend on which other items were sampled
        rng = random.Random(f"{cfg.seed}|{row['scene']}|{row['turn_index']}")
        distractors = pick_distractors(
            gold.strip(), str(row["scene"]), lines, heldout_scenes, cfg.distractors, rng, cfg.distractor_pool,
            match_length=cfg.distractor_length == "matched",
        )
        if len(distractors) < cfg.distractors:
            raise StageError(
                "eval",
                f"only {len(distractors)} distinct lines exist for {cfg.distractors} distractors with distractor_pool "
                f"{cfg.distractor_pool} in the held-out scenes (distractors never come from training scenes); fix: set "
                f"eval.distractors to {max(1, len(distractors))} or less, choose another eval.distractor_pool, or hold out more scenes",
            )
        label = rng.randrange(cfg.distractors + 1)
        choices = list(distractors)
        choices.insert(label, gold)
        items.append(
            {
                "id": f"{row['scene']}#{row['turn_index']}",
                "scene": str(row["scene"]),
                "turn_index": int(row["turn_index"]),
                "prompt": str(row["prompt"]),
                "choices": choices,
                "label": label,
                "context": context_text(row.get("context")),
            }
        )
    return items


def context_text(value: Any) -> str:
    """The dataset's `context` column as readable text, whatever shape it has (text, list of turns, list of lines)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return f"{value.get('speaker', '?')}: {value.get('text', '')}" if "text" in value else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "\n".join(context_text(part) for part in value)
    return str(value)


def build_reply_items(heldout: Any, cfg: EvalConfig) -> list[dict]:
    """Yothalia's benchmark: each sampled held-out prompt with its real reply among K replies to other prompts."""
    rows = [row for row in heldout if str(row["completion"]).strip()]
    picked = sorted(random.Random(cfg.seed).sample(range(len(rows)), min(cfg.max_items, len(rows))))
    replies = list(dict.fromkeys(str(row["completion"]).strip() for row in rows))
    items = []
    for index in picked:
        row = rows[index]
        gold = str(row["completion"])
        rng = random.Random(f"{cfg.seed}|reply|{row['scene']}|{row['turn_index']}")
        distractors = draw_unlike(gold.strip(), [r for r in replies if r != gold.strip()], cfg.reply_choices, rng)
        if len(distractors) < cfg.reply_choices:
            raise StageError(
                "eval",
                f"only {len(distractors)} distinct held-out replies exist for reply_choices={cfg.reply_choices}; fix: set "
                f"eval.reply_choices to {max(1, len(distractors))} or less, hold out more scenes, or drop reply_choice from eval.tasks",
            )
        label = rng.randrange(cfg.reply_choices + 1)
        choices = list(distractors)
        choices.insert(label, gold)
        items.append({"id": f"{row['scene']}#{row['turn_index']}", "prompt": str(row["prompt"]), "choices": choices, "label": label})
    return items


def build_perplexity_docs(heldout: Any, cfg: EvalConfig) -> list[dict]:
    """The character's held-out lines (distinct, a seeded sample) for loglikelihood_rolling."""
    lines = list(dict.fromkeys(str(row["completion"]).strip() for row in heldout if str(row["completion"]).strip()))
    picked = sorted(random.Random(cfg.seed).sample(range(len(lines)), min(cfg.max_items, len(lines))))
    return [{"id": str(index), "text": lines[index]} for index in picked]


# ---------------------------------------------------------------- the lm-eval task folders

# The task YAML skeletons live in evaluation/ (str.format placeholders), next to its README.
EVALUATION_DIR = Path(__file__).resolve().parents[2] / "evaluation"
TASK_TEMPLATES = {"next_line": "next_line.yaml.in", "reply_choice": "reply_choice.yaml.in", "perplexity": "heldout_ppl.yaml.in"}
MUTUAL_INFO = """  - metric: acc_mutual_info
    aggregation: mean
    higher_is_better: true
"""


def write_task_yaml(folder: Path, task: str, data_file: str, character: str, k: int, kind: str = "next_line", mutual_info: bool = False) -> Path:
    path = folder / f"{task}.yaml"
    text = (EVALUATION_DIR / TASK_TEMPLATES[kind]).read_text(encoding="utf-8")
    text = text.format(task=task, data_file=json.dumps(data_file), character=character, k=k, mutual_info=MUTUAL_INFO if mutual_info else "")
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass
class Task:
    kind: str
    name: str
    folder: Path  # in the run: the YAML names its data file relatively
    items: list[dict]
    choices: Optional[int]  # None for perplexity

    @property
    def chance(self) -> Optional[float]:
        return 1.0 / self.choices if self.choices else None


# ---------------------------------------------------------------- scoring

MC_METRICS = ("acc", "acc_norm", "acc_mutual_info")
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def lm_eval_batch_size(setting: Union[int, str]) -> Union[int, str]:
    """'auto' -> lm-eval's own search on CUDA; on a CPU that search runs huge batches first, so 8."""
    if setting != "auto":
        return setting
    import torch

    return "auto" if torch.cuda.is_available() else 8


def per_item(task: Task, samples: list[dict]) -> dict[str, list]:
    """Per-document values in doc order: correctness per metric (multiple choice) or (loglik, bytes); and the
    choices' log-likelihoods, to compare two scorings of the same model."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    values: dict[str, list] = {}
    if task.kind == "perplexity":
        values["bits_per_byte"] = [list(sample["bits_per_byte"]) for sample in ordered]
        values["loglik"] = [float(sample["bits_per_byte"][0]) for sample in ordered]
        return values
    for metric in MC_METRICS:
        if metric in ordered[0]:
            values[metric] = [float(sample[metric]) for sample in ordered]
    values["loglik"] = [float(response[0]) for sample in ordered for response in sample["filtered_resps"][: task.choices]]
    return values


def score(model_dir: Path, tasks: list[Task], include_dir: Path, batch_size: Union[int, str], trust_remote_code: bool, peft: Optional[Path] = None) -> dict:
    """Every task for one model through lm_eval.simple_evaluate: aggregate metrics and per-item values."""
    import gc
    import time

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = {"peft": str(peft)} if peft else {}
    lm = HFLM(pretrained=str(model_dir), device=device, batch_size=lm_eval_batch_size(batch_size), trust_remote_code=trust_remote_code, **extra)
    manager = TaskManager(include_path=str(include_dir), include_defaults=False)
    output = simple_evaluate(model=lm, tasks=[task.name for task in tasks], task_manager=manager, log_samples=True)
    del lm
    gc.collect()
    scores: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 2)}
    for task in tasks:
        result = output["results"][task.name]
        metrics = PPL_METRICS if task.kind == "perplexity" else MC_METRICS
        row: dict[str, Any] = {"n": int(output["n-samples"][task.name]["effective"])}
        for metric in metrics:
            if f"{metric},none" in result:
                row[metric] = float(result[f"{metric},none"])
                stderr = result.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        row["per_item"] = per_item(task, output["samples"][task.name])
        scores[task.name] = row
    return scores


def base_cache_key(task_files: list[Path], recipe: Any) -> str:
    """Everything that changes the base model's scores, and nothing that does not (batch size, run folder)."""
    import hashlib

    key = {
        "what": "eval-base/2",
        "tasks": {path.name: sha256_file(path) for path in sorted(task_files)},
        "base_model": base_model_input(recipe.model).sha256,
        "model": recipe.model.model_dump(mode="json"),  # random_init / config_overrides change the weights
        "versions": {name: package_version(name) for name in ("lm_eval", "transformers", "torch")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump(data, tmp, indent=2)
    os.replace(tmp.name, path)


# ---------------------------------------------------------------- reading the numbers


def paired_difference(base: list, tuned: list, kind: str) -> tuple[float, float]:
    """Mean per-item improvement of tuned over base and its standard error (items paired: same documents).

    Multiple choice: correctness (0/1) differences. Perplexity: bits per byte of base minus tuned (positive =
    tuned predicts the character's lines better)."""
    import math

    if kind == "perplexity":
        def bpb(pair: list) -> float:
            loglik, count = pair
            return -loglik / (max(count, 1) * math.log(2))

        diffs = [bpb(b) - bpb(t) for b, t in zip(base, tuned)]
    else:
        diffs = [t - b for b, t in zip(base, tuned)]
    n = len(diffs)
    if n == 0:
        return 0.0, 0.0
    mean = sum(diffs) / n
    if n < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_gains(task: Task, base: dict, tuned: dict) -> dict[str, dict[str, float]]:
    """tuned - base with its paired standard error for every metric both models have per item (acc, acc_norm,
    acc_mutual_info; bits per byte for perplexity, positive = better)."""
    metrics = ("bits_per_byte",) if task.kind == "perplexity" else MC_METRICS
    gains = {}
    for metric in metrics:
        if metric in base["per_item"] and metric in tuned["per_item"]:
            diff, se = paired_difference(base["per_item"][metric], tuned["per_item"][metric], task.kind)
            gains[metric] = {"diff": diff, "paired_se": se}
    return gains


def verdict(task: Task, base: dict, tuned: dict) -> dict:
    """One line per task: does tuned beat base beyond two paired standard errors (about 95 %)?"""
    metric = "bits_per_byte" if task.kind == "perplexity" else "acc"
    diff, se = paired_difference(base["per_item"][metric], tuned["per_item"][metric], task.kind)
    if task.kind == "perplexity":
        shown = f"bits/byte {base['bits_per_byte']:.3f} -> {tuned['bits_per_byte']:.3f}"
    else:
        shown = f"acc {base['acc']:.3f} -> {tuned['acc']:.3f} (chance {task.chance:.2f})"
    if se == 0.0:
        outcome = "same" if diff == 0 else ("better" if diff > 0 else "worse")
    elif diff > 2 * se:
        outcome = "better"
    elif diff < -2 * se:
        outcome = "worse"
    else:
        outcome = "no clear difference"
    words = {
        "better": "tuned beats base beyond 2 standard errors",
        "worse": "tuned is worse than base beyond 2 standard errors",
        "no clear difference": "no difference beyond 2 standard errors",
        "same": "identical per item",
    }[outcome]
    gain = f"{diff:+.3f} ± {se:.3f}" + (" bits/byte" if task.kind == "perplexity" else "")
    return {"metric": metric, "diff": diff, "paired_se": se, "outcome": outcome, "line": f"{task.name}: {shown}; {gain} paired: {words}"}


def adapter_agreement(tasks: list[Task], base: dict, merged: dict, adapter: dict) -> dict:
    """The adapter scored on the base must reproduce the merged model, not the base: per-choice log-likelihoods
    closer to merged than to base, and the same accuracy up to noise."""
    to_merged = [abs(a - m) for task in tasks for a, m in zip(adapter[task.name]["per_item"]["loglik"], merged[task.name]["per_item"]["loglik"])]
    base_to_merged = [abs(b - m) for task in tasks for b, m in zip(base[task.name]["per_item"]["loglik"], merged[task.name]["per_item"]["loglik"])]
    mean_to_merged = sum(to_merged) / max(len(to_merged), 1)
    mean_base = sum(base_to_merged) / max(len(base_to_merged), 1)
    report = {"mean_abs_loglik_diff_adapter_vs_merged": mean_to_merged, "mean_abs_loglik_diff_base_vs_merged": mean_base}
    if mean_base > 1e-3 and mean_to_merged > 0.5 * mean_base:
        raise StageError(
            "eval",
            f"base + adapter does not reproduce the merged model: its log-likelihoods differ from the merged model's by "
            f"{mean_to_merged:.4f} on average, as far as the base model's ({mean_base:.4f}); the adapter was not applied. "
            "Check the export stage's adapter folder (adapter_config.json target modules) and the peft version",
        )
    for task in tasks:
        if task.kind == "perplexity":
            continue
        diff, se = paired_difference(merged[task.name]["per_item"]["acc"], adapter[task.name]["per_item"]["acc"], task.kind)
        report[task.name] = {"acc_diff": diff, "paired_se": se}
        if abs(diff) > 2 * se + 1.0 / max(len(task.items), 1):
            raise StageError(
                "eval",
                f"{task.name}: base + adapter scores acc {adapter[task.name]['acc']:.3f} but the merged model "
                f"{merged[task.name]['acc']:.3f}: beyond noise; the export's adapter and merged model disagree",
            )
    return report


# ---------------------------------------------------------------- pictures and samples


def plot_scores(path: Path, tasks: list[Task], scores: dict[str, dict]) -> None:
    """One panel per task: base vs tuned bars with standard-error whiskers (and chance for multiple choice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    width = 0.38
    for ax, task in zip(axes[0], tasks):
        metrics = ["bits_per_byte"] if task.kind == "perplexity" else [m for m in MC_METRICS if m in scores["tuned"][task.name]]
        for offset, label in zip((-width / 2, width / 2), ("base", "tuned")):
            values = scores[label][task.name]
            heights = [values[m] for m in metrics]
            errors = [values.get(f"{m}_stderr") or 0.0 for m in metrics]
            bars = ax.bar([i + offset for i in range(len(metrics))], heights, width, yerr=errors, capsize=4, label=label)
            ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], padding=3, fontsize=8)
        if task.chance is not None:
            ax.axhline(task.chance, linestyle="--", color="grey", label=f"chance ({task.chance:.2f})")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("accuracy (higher is better)")
        else:
            ax.set_ylabel("bits per byte (lower is better)")
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title(f"{task.name}\\n({len(task.items)} items)", fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate_replies(model_dir: Path, prompts: list[str], cfg: EvalConfig, trust_remote_code: bool) -> list[str]:
    """The model's reply to each rendered prompt, stopping at its end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model.eval()
    torch.manual_seed(cfg.seed)
    replies = []
    for prompt in prompts:
        # the prompt already holds the template's special tokens: do not add a second BOS
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.do_sample,
                repetition_penalty=cfg.repetition_penalty,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        replies.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return replies


def write_samples(path: Path, character: str, samples: list[dict]) -> None:
    parts = [f"# {character}: generated replies on held-out prompts\\n"]
    for sample in samples:
        context = "\\n".join(f"> {line}" if line else ">" for line in sample["context"].splitlines()) or "> (no context)"
        parts.append(
            f"## {sample['id']}\\n\\n{context}\\n\\n"
            f"**real** ({character}): {sample['real']}\\n\\n"
            f"**generated** (tuned): {sample['generated']}\\n"
        )
    path.write_text("\\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------- the stage


def build_tasks(ctx: StageContext, heldout: Any, cfg: EvalConfig) -> list[Task]:
    """Write every configured task folder into the stage folder; returns them in cfg.tasks order."""
    character = ctx.recipe.character.name
    tasks: list[Task] = []
    for kind in cfg.tasks:
        name = task_name(ctx.recipe.name, kind)
        if kind == "next_line":
            turns = read_turns(ctx.upstream["clean"] / "turns.jsonl")
            items, k, data_file = build_items(heldout, turns, character, cfg), cfg.distractors, "items.jsonl"
        elif kind == "reply_choice":
            items, k, data_file = build_reply_items(heldout, cfg), cfg.reply_choices, "items.jsonl"
        else:
            items, k, data_file = build_perplexity_docs(heldout, cfg), 0, "lines.jsonl"
        if not items:
            raise StageError("eval", f"task {kind}: every held-out item has an empty reply; fix: check the clean stage's output")
        folder = ctx.out / "tasks" / name
        folder.mkdir(parents=True)
        write_jsonl(folder / data_file, items)
        write_task_yaml(folder, name, data_file, character, k, kind, cfg.mutual_info and kind != "perplexity")
        tasks.append(Task(kind=kind, name=name, folder=folder, items=items, choices=None if kind == "perplexity" else k + 1))
    return tasks


def public(scores: dict) -> dict:
    """A model's scores without the per-item values (for results.json and the summary)."""
    return {key: value for key, value in scores.items() if key != "per_item"}


@register_stage(
    "eval",
    config=EvalConfig,
    version="3",
    reads=("eval", "model", "character"),
    needs=("clean", "dataset", "export"),
    libraries=("lm_eval", "torch", "transformers", "peft"),
    external_inputs=eval_inputs,
)
def run_eval(ctx: StageContext) -> dict:
    """Score base vs tuned (merged, and base + adapter) on lm-eval tasks built from held-out scenes."""
    from datasets import load_from_disk

    cfg: EvalConfig = ctx.config
    console = ctx.console
    character = ctx.recipe.character.name
    data = load_from_disk(str(ctx.upstream["dataset"] / "data"))
    if "heldout" not in data or len(data["heldout"]) == 0:
        raise StageError(
            "eval",
            "the dataset has no held-out items to score; fix: hold out at least one scene in the dataset stage "
            "(its held-out share or scene list), or remove the eval stage from the recipe",
        )
    if not cfg.tasks:
        raise StageError("eval", "eval.tasks is empty; fix: name at least one of next_line, reply_choice, perplexity")
    tasks = build_tasks(ctx, data["heldout"], cfg)
    for task in tasks:
        chance = f", {task.choices} choices (chance {task.chance:.2f})" if task.choices else ""
        console.print(f"eval: task {task.name}: {len(task.items)} items{chance}")

    base_dir = resolve_base_model(ctx.recipe.model, console)
    tuned_dir = ctx.upstream["export"] / "model"
    adapter_dir = ctx.upstream["export"] / "adapter"
    trust = ctx.recipe.model.trust_remote_code

    # interviews (and the judge, which can fail on a remote endpoint) first: a failure costs no scoring
    interviews = judged = None
    folder = recipe_dir(ctx.recipe)
    if cfg.interviews.enabled:
        interviews = run_interviews(tuned_dir, cfg.interviews, ctx.out, console, recipe_dir=folder, trust_remote_code=trust, character=ctx.recipe.character)
        if cfg.judge.enabled:
            judged = judge_interviews(read_interviews(ctx.out / "interviews.jsonl"), ctx.recipe.character, cfg.judge, ctx.out, console, recipe_dir=folder)
    task_files = [path for task in tasks for path in task.folder.iterdir()]
    key = base_cache_key(task_files, ctx.recipe)
    cached_file = cache_root() / "eval-base" / f"{key}.json"

    timings: dict[str, Optional[float]] = {"base_scoring_s": None, "tuned_scoring_s": None, "adapter_scoring_s": None}
    with tempfile.TemporaryDirectory(prefix="recipe-eval-") as include:
        # ctx.out is renamed into place later, so the YAMLs in the run keep relative paths; lm-eval resolves
        # data_files against the working directory, so the run scores copies that name the files absolutely
        for task in tasks:
            data_file = next(p for p in task.folder.iterdir() if p.suffix == ".jsonl")
            write_task_yaml(Path(include), task.name, str(data_file.resolve()), character, (task.choices or 1) - 1, task.kind, cfg.mutual_info and task.kind != "perplexity")
        scores: dict[str, dict] = {}
        if cached_file.is_file():
            scores["base"] = json.loads(cached_file.read_text(encoding="utf-8"))["scores"]
            console.print(f"eval: base model scores reused from {cached_file}")
        else:
            console.print(f"eval: scoring the base model {base_dir}")
            scores["base"] = score(base_dir, tasks, Path(include), cfg.batch_size, trust)
            timings["base_scoring_s"] = scores["base"]["seconds"]
            write_json_atomic(cached_file, {"scores": scores["base"], "tasks": [task.name for task in tasks]})
        console.print(f"eval: scoring the tuned model {tuned_dir}")
        scores["tuned"] = score(tuned_dir, tasks, Path(include), cfg.batch_size, trust)
        timings["tuned_scoring_s"] = scores["tuned"]["seconds"]
        agreement = None
        if cfg.check_adapter and (adapter_dir / "adapter_config.json").is_file():
            # one task is enough to tell an applied adapter from an ignored one, and keeps the check cheap
            checked = tasks[:1]
            console.print(f"eval: scoring base + adapter {adapter_dir} on {checked[0].name} (must agree with the merged model)")
            scores["adapter"] = score(base_dir, checked, Path(include), cfg.batch_size, trust, peft=adapter_dir)
            timings["adapter_scoring_s"] = scores["adapter"]["seconds"]
            agreement = {"task": checked[0].name, **adapter_agreement(checked, scores["base"], scores["tuned"], scores["adapter"])}

    next_line = next((task for task in tasks if task.kind == "next_line"), None)
    picked = next_line.items[: cfg.sample_replies] if next_line else []
    replies = generate_replies(tuned_dir, [item["prompt"] for item in picked], cfg, trust) if picked else []
    samples = [
        {"id": item["id"], "context": item["context"], "real": item["choices"][item["label"]], "generated": reply}
        for item, reply in zip(picked, replies)
    ]
    if samples:
        write_samples(ctx.out / "samples.md", ctx.recipe.character.shown_name, samples)
    plot_scores(ctx.out / "scores.png", tasks, scores)

    verdicts = {task.name: verdict(task, scores["base"][task.name], scores["tuned"][task.name]) for task in tasks}
    gains = {task.name: paired_gains(task, scores["base"][task.name], scores["tuned"][task.name]) for task in tasks}
    per_items = {task.name: {model: scores[model][task.name]["per_item"] for model in ("base", "tuned")} for task in tasks}
    write_json_atomic(ctx.out / "per_item.json", per_items)
    results = {
        "lm_eval": package_version("lm_eval"),
        "base_cached": timings["base_scoring_s"] is None,
        "tasks": {
            task.name: {
                "kind": task.kind,
                "items": len(task.items),
                "choices": task.choices,
                "chance": task.chance,
                "base": public(scores["base"][task.name]),
                "tuned": public(scores["tuned"][task.name]),
                **({"adapter": public(scores["adapter"][task.name])} if task.name in scores.get("adapter", {}) else {}),
                "comparison": {**{k: v for k, v in verdicts[task.name].items() if k != "line"}, "paired": gains[task.name]},
                "verdict": verdicts[task.name]["line"],
            }
            for task in tasks
        },
        "adapter_agreement": agreement,
        "interviews": interviews,
        "judge": judged,
        "timings": timings,
    }
    write_json_atomic(ctx.out / "results.json", results)
    write_eval_card(ctx.upstream["export"], ctx.out / "MODEL_CARD.md", results)  # the export's card, scores filled in
    for task in tasks:
        console.print(f"eval: {verdicts[task.name]['line']}")
    table = [
        {"task": task.name, "kind": TASK_SUFFIX[task.kind], "metric": metric, "base": scores["base"][task.name].get(metric), "base_stderr": scores["base"][task.name].get(f"{metric}_stderr"),
         "tuned": scores["tuned"][task.name].get(metric), "tuned_stderr": scores["tuned"][task.name].get(f"{metric}_stderr"),
         "change": tuned_minus_base(gains[task.name].get(metric), metric), "change_se": gains[task.name].get(metric, {}).get("paired_se")}
        for task in tasks
        for metric in (("bits_per_byte",) if task.kind == "perplexity" else tuple(m for m in MC_METRICS if m in scores["tuned"][task.name]))
    ]  # fmt: skip
    summary: dict[str, Any] = {"tasks": [task.name for task in tasks], "table": table, "verdicts": [verdicts[t.name]["line"] for t in tasks]}
    if next_line:
        summary.update(
            task=next_line.name,
            items=len(next_line.items),
            chance=next_line.chance,
            base={m: scores["base"][next_line.name][m] for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            tuned={m: scores["tuned"][next_line.name][m] for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
        )
    summary["sample"] = {k: samples[0][k] for k in ("context", "real", "generated")} if samples else None
    if agreement is not None:
        summary["adapter_agrees"] = True
    summary["interviews"] = interviews
    summary["judge"] = judged["means"] if judged else None
    return summary
