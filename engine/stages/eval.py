"""eval: score base vs tuned on "which line does the character say next?" as an lm-eval multiple-choice task.

Each held-out item is the rendered prompt (the dataset stage's chat-template text, ending where the character's
reply starts) with K+1 choices: the character's real line and K lines spoken by OTHER characters in the same
scene (other held-out scenes, then the whole corpus, when a scene has too few). The task is written as a plain
lm-eval task folder in the run (`tasks/<task>/<task>.yaml` + `items.jsonl`) that anyone can rerun:

    cd <run folder>/eval/tasks/<task> && lm_eval --include_path . --tasks <task> --model hf \
        --model_args pretrained=<model folder> --device cpu --batch_size 8

(`--device`, not `device=` inside --model_args: the 0.4.13 CLI always passes its own device, default cuda:0.)

The base model's scores are cached outside the run (cache_root()/eval-base/<key>.json), keyed by the items,
the base model's bytes and the lm-eval version, so that re-training only re-scores the tuned model.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from engine.datafiles import cache_root, sha256_file
from engine.errors import StageError
from engine.modelcard import write_eval_card
from engine.models import base_model_input, resolve_base_model
from engine.registry import StageContext, register_stage


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    distractors: int = Field(3, ge=1, description="Wrong choices per item (chance = 1 / (distractors + 1)).")
    distractor_pool: Literal["same_scene", "character_other_scenes", "random"] = Field(
        "same_scene",
        description="Where wrong choices come from: same_scene = other characters' lines in the same scene (tests style; "
        "then other held-out scenes); character_other_scenes = the character's own lines from other held-out scenes "
        "(tests content; Yothalia's benchmark); random = any line of the held-out scenes.",
    )
    max_items: int = Field(100, ge=1, description="At most this many held-out items (a seeded sample) enter the task.")
    seed: int = Field(0, description="Seed of the item sample, the distractors and the position of the real line.")
    batch_size: Union[int, Literal["auto"]] = Field(8, description="lm-eval batch size (an int or 'auto'); does not change the scores.")
    sample_replies: int = Field(3, ge=0, description="How many held-out prompts get a generated reply in samples.md.")
    max_new_tokens: int = Field(48, ge=1, description="Longest generated reply in samples.md, in tokens.")
    do_sample: bool = Field(False, description="Sample the replies in samples.md instead of greedy decoding.")
    repetition_penalty: float = Field(
        1.3, ge=1.0, description="Penalty on repeated tokens in samples.md replies (1.0 = none; the South Park bot used 1.3)."
    )


# ---------------------------------------------------------------- the items


def task_name(recipe_name: str) -> str:
    """`<recipe name>_next_line`, lower case, only [a-z0-9_] (lm-eval task names are looked up verbatim)."""
    stem = re.sub(r"[^a-z0-9_]+", "_", recipe_name.lower()).strip("_") or "recipe"
    return f"{stem}_next_line"


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
        return [[scene], other_heldout, [s for s in all_scenes if s != scene and s not in heldout_scenes]]
    if policy == "character_other_scenes":
        return [other_heldout]  # held-out scenes only: no trained-on line of the character is ever a choice
    return [heldout_scenes]  # random: any line of the held-out scenes, one pool


def pick_distractors(
    gold: str, scene: str, lines: dict[str, list[str]], heldout_scenes: list[str], k: int, rng: random.Random,
    policy: str = "same_scene",
) -> list[str]:
    """K distinct lines unlike the gold one, drawn from the policy's pools in order (see distractor_pools)."""
    taken = {normalise(gold)}
    chosen: list[str] = []
    for pool_scenes in distractor_pools(policy, scene, heldout_scenes, list(lines)):
        unique: dict[str, str] = {}  # normalised -> first spelling, in file order (deterministic)
        for text in (text for s in pool_scenes for text in lines.get(s, [])):
            if normalise(text) not in taken:
                unique.setdefault(normalise(text), text)
        pool = list(unique.values())
        for text in rng.sample(pool, min(k - len(chosen), len(pool))):
            chosen.append(text)
            taken.add(normalise(text))
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
        distractors = pick_distractors(gold.strip(), str(row["scene"]), lines, heldout_scenes, cfg.distractors, rng, cfg.distractor_pool)
        if len(distractors) < cfg.distractors:
            raise StageError(
                "eval",
                f"only {len(distractors)} distinct lines exist for {cfg.distractors} distractors with distractor_pool "
                f"{cfg.distractor_pool}; fix: set eval.distractors to {max(1, len(distractors))} or less, choose another "
                "eval.distractor_pool, or hold out more scenes",
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


# ---------------------------------------------------------------- the lm-eval task folder

# The task YAML skeleton lives in evaluation/ (str.format placeholders), next to its README.
TASK_TEMPLATE = Path(__file__).resolve().parents[2] / "evaluation" / "next_line.yaml.in"


def write_task_yaml(folder: Path, task: str, data_file: str, character: str, k: int) -> Path:
    path = folder / f"{task}.yaml"
    path.write_text(
        TASK_TEMPLATE.read_text(encoding="utf-8").format(task=task, data_file=json.dumps(data_file), character=character, k=k),
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------- scoring


def score(model_dir: Path, task: str, include_dir: Path, batch_size: Union[int, str], trust_remote_code: bool) -> dict:
    """acc / acc_norm (and stderr) of one model on the task, through lm_eval.simple_evaluate."""
    import gc

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(pretrained=str(model_dir), device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    manager = TaskManager(include_path=str(include_dir), include_defaults=False)
    output = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=False)
    del lm
    gc.collect()
    result = output["results"][task]
    return {
        "acc": float(result["acc,none"]),
        "acc_stderr": float(result["acc_stderr,none"]),
        "acc_norm": float(result["acc_norm,none"]),
        "acc_norm_stderr": float(result["acc_norm_stderr,none"]),
        "n": int(output["n-samples"][task]["effective"]),
    }


def base_cache_key(items_file: Path, recipe: Any, task_yaml: str) -> str:
    """Everything that changes the base model's scores, and nothing that does not (batch size, run folder)."""
    import hashlib

    key = {
        "what": "eval-base/1",
        "items": sha256_file(items_file),
        "task_yaml": hashlib.sha256(task_yaml.encode()).hexdigest(),
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


# ---------------------------------------------------------------- pictures and samples


def plot_scores(path: Path, task: str, scores: dict[str, dict], chance: float, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["acc", "acc_norm"]
    width = 0.35
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, (label, values) in zip((-width / 2, width / 2), scores.items()):
        xs = [i + offset for i in range(len(metrics))]
        heights = [values[m] for m in metrics]
        errors = [values[f"{m}_stderr"] for m in metrics]
        bars = ax.bar(xs, heights, width, yerr=errors, capsize=4, label=label)
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], padding=3, fontsize=8)
    ax.axhline(chance, linestyle="--", color="grey", label=f"chance ({chance:.2f})")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task} ({n} items)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    parts = [f"# {character}: generated replies on held-out prompts\n"]
    for sample in samples:
        context = "\n".join(f"> {line}" if line else ">" for line in sample["context"].splitlines()) or "> (no context)"
        parts.append(
            f"## {sample['id']}\n\n{context}\n\n"
            f"**real** ({character}): {sample['real']}\n\n"
            f"**generated** (tuned): {sample['generated']}\n"
        )
    path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------- the stage


@register_stage(
    "eval",
    config=EvalConfig,
    version="1",
    reads=("eval", "model", "character"),
    needs=("clean", "dataset", "export"),
    libraries=("lm_eval", "torch", "transformers"),
    external_inputs=lambda recipe: {"base_model": base_model_input(recipe.model)},
)
def run_eval(ctx: StageContext) -> dict:
    """Score base vs tuned with an lm-eval multiple-choice task: the character's real next line vs other speakers' lines."""
    from datasets import load_from_disk

    cfg: EvalConfig = ctx.config
    character = ctx.recipe.character.name
    data = load_from_disk(str(ctx.upstream["dataset"] / "data"))
    if "heldout" not in data or len(data["heldout"]) == 0:
        raise StageError(
            "eval",
            "the dataset has no held-out items to score; fix: hold out at least one scene in the dataset stage "
            "(its held-out share or scene list), or remove the eval stage from the recipe",
        )
    turns = read_turns(ctx.upstream["clean"] / "turns.jsonl")
    items = build_items(data["heldout"], turns, character, cfg)
    if not items:
        raise StageError("eval", "every held-out item has an empty reply; fix: check the clean stage's output")

    task = task_name(ctx.recipe.name)
    folder = ctx.out / "tasks" / task
    folder.mkdir(parents=True)
    items_file = folder / "items.jsonl"
    with open(items_file, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    portable = write_task_yaml(folder, task, items_file.name, character, cfg.distractors)
    chance = 1.0 / (cfg.distractors + 1)
    ctx.console.print(f"eval: {len(items)} items, {cfg.distractors + 1} choices each (chance {chance:.2f}), task {task}")

    base_dir = resolve_base_model(ctx.recipe.model, ctx.console)
    tuned_dir = ctx.upstream["export"] / "model"
    trust = ctx.recipe.model.trust_remote_code
    key = base_cache_key(items_file, ctx.recipe, portable.read_text(encoding="utf-8"))
    cached_file = cache_root() / "eval-base" / f"{key}.json"

    with tempfile.TemporaryDirectory(prefix="recipe-eval-") as include:
        # ctx.out is renamed into place later, so the YAML in the run keeps a relative path; lm-eval resolves
        # data_files against the working directory, so the run scores a copy that names the file absolutely
        write_task_yaml(Path(include), task, str(items_file.resolve()), character, cfg.distractors)
        scores: dict[str, dict] = {}
        if cached_file.is_file():
            scores["base"] = {**json.loads(cached_file.read_text(encoding="utf-8"))["scores"], "cached": True}
            ctx.console.print(f"eval: base model scores reused from {cached_file}")
        else:
            ctx.console.print(f"eval: scoring the base model {base_dir}")
            scores["base"] = {**score(base_dir, task, Path(include), cfg.batch_size, trust), "cached": False}
            write_json_atomic(cached_file, {"scores": {k: v for k, v in scores["base"].items() if k != "cached"}, "task": task})
        ctx.console.print(f"eval: scoring the tuned model {tuned_dir}")
        scores["tuned"] = score(tuned_dir, task, Path(include), cfg.batch_size, trust)

    picked = items[: cfg.sample_replies]
    replies = generate_replies(tuned_dir, [item["prompt"] for item in picked], cfg, trust) if picked else []
    samples = [
        {"id": item["id"], "context": item["context"], "real": item["choices"][item["label"]], "generated": reply}
        for item, reply in zip(picked, replies)
    ]
    write_samples(ctx.out / "samples.md", character, samples)
    plot_scores(ctx.out / "scores.png", task, {"base": scores["base"], "tuned": scores["tuned"]}, chance, len(items))

    metrics = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
    results = {
        "task": task,
        "items": len(items),
        "choices": cfg.distractors + 1,
        "chance": chance,
        "lm_eval": package_version("lm_eval"),
        "base": {**{m: scores["base"][m] for m in metrics}, "n": scores["base"]["n"], "cached": scores["base"]["cached"]},
        "tuned": {**{m: scores["tuned"][m] for m in metrics}, "n": scores["tuned"]["n"]},
    }
    write_json_atomic(ctx.out / "results.json", results)
    write_eval_card(ctx.upstream["export"], ctx.out / "MODEL_CARD.md", results)  # the export's card, scores filled in
    ctx.console.print(
        f"eval: acc base {results['base']['acc']:.3f} -> tuned {results['tuned']['acc']:.3f}, "
        f"acc_norm {results['base']['acc_norm']:.3f} -> {results['tuned']['acc_norm']:.3f} (chance {chance:.2f})"
    )
    return {
        "task": task,
        "items": len(items),
        "chance": chance,
        "base": {m: scores["base"][m] for m in metrics},
        "tuned": {m: scores["tuned"][m] for m in metrics},
        "sample": {k: samples[0][k] for k in ("context", "real", "generated")} if samples else None,
    }
