"""Model cards: the README.md of an exported model or adapter, as the Hugging Face Hub reads it.

A card is YAML front matter (base_model, library_name, license when known, pipeline_tag, tags) and Markdown
sections: the character and its system prompt, base model, recipe, data counts, training, the data's licence,
how to load it (transformers, PEFT, Ollama) and the evaluation. Everything here is a pure function of plain
dicts and strings (the export stage gathers the facts, see `render_card`), so it is tested without a model.

The export stage writes the card with a placeholder Evaluation section: eval runs after export and must not
change the export folder. `write_eval_card` (called at the end of the eval stage) writes a copy with the
scores filled in, `<run>/eval/MODEL_CARD.md`, ready to replace the README.md when the model is published.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

EVALUATION = "## Evaluation"
EVALUATION_PENDING = (
    "Scores are added by the eval stage, which runs after this export: base vs tuned accuracy on an lm-eval "
    "multiple-choice task built from held-out scenes (which line does the character say next?). After "
    "`recipe run`, the card with the scores is `runs/<name>/eval/MODEL_CARD.md`."
)
NO_DATA_LICENSE = (
    "The licence of the training data is not recorded in the recipe. Check the terms of the data's source "
    "before you share this model or its outputs, and set `export.data_license` in the recipe so that this card "
    "states them."
)


def fenced(text: str, info: str = "text") -> str:
    """A Markdown code block that `text` cannot close early (the fence is longer than any backtick run in it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, line breaks as spaces, None as a dash."""
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def front_matter(meta: dict) -> str:
    """YAML front matter (keys in the given order, None values left out)."""
    kept = {key: value for key, value in meta.items() if value is not None and value != []}
    return "---\n" + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def card_metadata(facts: dict, kind: str) -> dict:
    """The front matter of a `kind` ("model" or "adapter") card."""
    base = facts.get("base", {})
    base_id = base.get("id")
    method = facts.get("method", "lora")
    tags = ["recipe-engine", "persona", "role-play", "text-generation", "sft", "trl"]
    if kind == "adapter":
        tags += ["peft", "lora"] + ([f"base_model:adapter:{base_id}"] if base_id else [])
    else:
        tags += ["merged" if method != "full" else "full-fine-tune"]
    return {
        "base_model": base_id,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "license": base.get("license"),
        "pipeline_tag": "text-generation",
        "tags": tags,
    }


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return cell(value)


def character_section(facts: dict) -> str:
    character = facts.get("character", {})
    parts = [
        "## Character",
        "",
        f"This model speaks as **{character.get('shown_name', '?')}** (speaker `{character.get('name', '?')}` in the data). "
        "The chat template carries the persona: a chat without a system message gets this system prompt.",
        "",
        fenced(character.get("system", "")),
    ]
    if character.get("first_message"):
        parts += ["", f"First message: {character['first_message']}"]
    return "\n".join(parts)


def base_section(facts: dict) -> str:
    base = facts.get("base", {})
    lines = ["## Base model", "", f"- Base: {base.get('name', '?')}"]
    if base.get("id"):
        lines.append(f"- Hugging Face id: [`{base['id']}`](https://huggingface.co/{base['id']})")
    lines.append(f"- Licence of the base model: {base.get('license') or 'unknown: check the base model card'}")
    if base.get("note"):
        lines.append(f"- Note: {base['note']}")
    lines.append(f"- Exported weights: {facts.get('dtype', '?')}")
    return "\n".join(lines)


def recipe_section(facts: dict) -> str:
    recipe = facts.get("recipe", {})
    lines = ["## Recipe", "", f"- Name: `{recipe.get('name', '?')}`"]
    if recipe.get("file"):
        lines.append(f"- File: `{recipe['file']}`")
    if recipe.get("description"):
        lines.append(f"- Description: {recipe['description']}")
    lines.append(f"- Prompt template: `{facts.get('template', '?')}`")
    lines += ["", f"Rebuild it with `recipe run {recipe.get('file') or '<recipe.yaml>'}` (the recipe engine)."]
    return "\n".join(lines)


DATA_ROWS = (
    ("train", "training samples (one character line each, with its context)"),
    ("heldout", "held-out samples (scenes never trained on; the evaluation uses them)"),
    ("train_scenes", "training scenes"),
    ("heldout_scenes", "held-out scenes"),
    ("skipped_no_context", "lines skipped for too little context"),
    ("dropped_too_long", "lines dropped as too long"),
    ("trimmed", "samples whose oldest context turns were cut to fit"),
    ("tokens_mean", "tokens per sample, mean"),
    ("tokens_p95", "tokens per sample, 95th percentile"),
    ("max_length", "token limit per sample"),
)


def data_section(facts: dict) -> str:
    dataset = facts.get("dataset") or {}
    lines = ["## Data", ""]
    rows = [(label, dataset[key]) for key, label in DATA_ROWS if key in dataset]
    if not rows:
        return "\n".join(lines + ["The dataset stage recorded no counts for this run."])
    lines += ["| | count |", "|---|---:|"] + [f"| {cell(label)} | {_number(value)} |" for label, value in rows]
    return "\n".join(lines)


TRAIN_ROWS = (
    ("method", "method"),
    ("steps", "optimizer steps"),
    ("first_loss", "first logged loss"),
    ("final_loss", "final logged loss"),
    ("tokens_per_s", "tokens per second"),
    ("train_runtime_s", "runtime (s)"),
    ("precision", "precision"),
    ("peak_rss_mb", "peak memory (MB)"),
)


def training_section(facts: dict) -> str:
    training = dict(facts.get("training") or {})
    training.setdefault("method", facts.get("method"))
    rows = [(label, training[key]) for key, label in TRAIN_ROWS if training.get(key) is not None]
    lines = ["## Training", "", "Supervised fine-tuning with TRL's SFTTrainer; the loss covers the character's lines only."]
    if rows:
        lines += ["", "| | value |", "|---|---:|"] + [f"| {cell(label)} | {_number(value)} |" for label, value in rows]
    preference = training.get("preference")
    if isinstance(preference, dict) and preference.get("method"):
        lines += ["", preference_text(preference)]
        rows = [(label, preference[key]) for key, label in PREFERENCE_ROWS if preference.get(key) is not None]
        lines += ["", "| preference phase | value |", "|---|---:|"] + [f"| {cell(label)} | {_number(value)} |" for label, value in rows]
    return "\n".join(lines)


PREFERENCE_ROWS = (
    ("method", "method"),
    ("beta", "beta"),
    ("pairs", "pairs"),
    ("batch_size", "pairs per step"),
    ("steps", "optimizer steps"),
    ("learning_rate", "peak learning rate"),
    ("first_loss", "first logged loss"),
    ("final_loss", "final logged loss"),
    ("reward_accuracy_last_quarter", "chosen preferred, last quarter of steps"),
    ("train_runtime_s", "runtime (s)"),
)


def preference_text(preference: dict) -> str:
    trainer = "CPOTrainer" if preference["method"] == "cpo" else "DPOTrainer"
    where = {"same_scene": "in the same training scene", "any_scene": "from any training scene"}.get(preference.get("rejected_from") or "", "from the training scenes")
    length = {"matched": ", the one nearest the real line in length", "any": ", drawn at random"}.get(preference.get("rejected_length") or "", "")
    return (f"Then preference tuning ({preference['method']}) with TRL's {trainer}: the chosen reply is the character's real line, "
            f"the rejected one another speaker's line {where}{length}.")


def license_section(facts: dict) -> str:
    license_text = facts.get("data_license")
    body = f"Training data: {license_text}" if license_text else NO_DATA_LICENSE
    return "\n".join(["## Licence of the data", "", body])


def usage_section(facts: dict, kind: str) -> str:
    base_id = facts.get("base", {}).get("id") or "<the base model folder>"
    name = facts.get("ollama_name", "persona")
    transformers_code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("path/to/model")\n'
        'model = AutoModelForCausalLM.from_pretrained("path/to/model")\n'
        'messages = [{"role": "user", "content": "Good morrow. What news?"}]  # the persona is in the template\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    peft_code = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")\n'
        'model = PeftModel.from_pretrained(base, "path/to/adapter")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")  # carries the persona chat template'
    )
    ollama_code = f"cd path/to/model\nollama create {name} -f Modelfile\nollama run {name}"
    parts = ["## How to use", ""]
    if kind == "adapter":
        parts += [
            "### PEFT",
            "",
            fenced(peft_code, "python"),
            "",
            "text-generation-webui loads this folder as a LoRA (adapter_config.json + adapter_model.safetensors) on "
            "the same base model. Use the same base the adapter was trained on: another copy (a different "
            "quantization, say) gives slightly different replies.",
            "",
            "### transformers and Ollama",
            "",
            "The merged model next to this folder (`../model`) loads without PEFT and has the Ollama Modelfile.",
        ]
    else:
        parts += [
            "### transformers",
            "",
            fenced(transformers_code, "python"),
            "",
            "`transformers serve path/to/model` serves it with an OpenAI-compatible API.",
            "",
            "### Ollama",
            "",
            fenced(ollama_code, "shell"),
            "",
            "The Modelfile in this folder imports the safetensors weights (`FROM .`), renders chats as the chat "
            "template does, sets the persona as SYSTEM and stops at the end-of-turn token the model learned.",
        ]
        if facts.get("has_adapter"):
            parts += ["", "### PEFT", "", "The LoRA adapter alone is in `../adapter` (its own README.md says how to load it)."]
    return "\n".join(parts)


def render_card(facts: dict, kind: str = "model", evaluation: Optional[dict] = None) -> str:
    """The whole README.md of a "model" (merged or fully fine-tuned) or "adapter" folder."""
    character = facts.get("character", {})
    recipe = facts.get("recipe", {})
    what = "LoRA adapter" if kind == "adapter" else "persona model"
    title = f"# {character.get('shown_name', '?')}: a {what} from the recipe `{recipe.get('name', '?')}`"
    intro = recipe.get("description") or f"A fine-tuned model that answers as {character.get('shown_name', '?')}."
    sections = [
        title,
        intro,
        character_section(facts),
        base_section(facts),
        recipe_section(facts),
        data_section(facts),
        training_section(facts),
        license_section(facts),
        usage_section(facts, kind),
        evaluation_section(evaluation),
    ]
    return front_matter(card_metadata(facts, kind)) + "\n" + "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------- evaluation


def _score(values: dict, metric: str) -> str:
    value, stderr = values.get(metric), values.get(f"{metric}_stderr")
    if value is None:
        return "-"
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def evaluation_section(results: Optional[dict]) -> str:
    """The Evaluation section: the placeholder, or the eval stage's base vs tuned scores (its results.json)."""
    if not results:
        return f"{EVALUATION}\n\n{EVALUATION_PENDING}"
    if "tasks" in results:
        return tasks_section(results)
    lines = [
        EVALUATION,
        "",
        f"lm-eval (version {results.get('lm_eval', '?')}) multiple-choice task `{results.get('task', '?')}`: "
        f"{results.get('items', '?')} held-out lines of the character, each against {(results.get('choices') or 1) - 1} other "
        f"lines; the model must prefer the real one. Chance is {results.get('chance', 0):.2f}. "
        "Scores with their standard error:",
        "",
        "| model | acc | acc_norm |",
        "|---|---:|---:|",
    ]
    for who in ("base", "tuned"):
        values = results.get(who) or {}
        lines.append(f"| {who} | {_score(values, 'acc')} | {_score(values, 'acc_norm')} |")
    return "\n".join(lines)


def tuned_minus_base(gain: Optional[dict], metric: str) -> Optional[float]:
    """The eval stage's paired gain as tuned - base (its bits-per-byte gain counts bits saved, so the sign flips)."""
    if gain is None:
        return None
    return -gain["diff"] if metric == "bits_per_byte" else gain["diff"]


def _paired(task: dict, metric: str) -> str:
    gain = ((task.get("comparison") or {}).get("paired") or {}).get(metric)
    if gain is None:  # results written by eval stage version 2 kept acc's paired gain only
        return "—"
    return f"{tuned_minus_base(gain, metric):+.3f} ± {gain['paired_se']:.3f}"


def tasks_section(results: dict) -> str:
    """The Evaluation section for the eval stage's results.json: one table row per task and metric, and the
    per-task verdict (paired comparison of base and tuned on the same items)."""
    lines = [
        EVALUATION,
        "",
        f"lm-eval (version {results.get('lm_eval', '?')}) tasks built from held-out scenes the model never trained on; "
        "base and tuned scored on the same items, standard errors after ±; tuned - base is paired per item "
        "(bits per byte: lower is better).",
        "",
        "| task | items | chance | metric | base | tuned | tuned - base |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, task in results["tasks"].items():
        metrics = ("bits_per_byte",) if task.get("kind") == "perplexity" else tuple(
            m for m in ("acc", "acc_norm", "acc_mutual_info") if m in (task.get("tuned") or {})
        )
        chance = f"{task['chance']:.2f}" if task.get("chance") else "—"
        for metric in metrics:
            lines.append(
                f"| `{name}` | {task.get('items', '?')} | {chance} | {metric} | "
                f"{_score(task.get('base') or {}, metric)} | {_score(task.get('tuned') or {}, metric)} | {_paired(task, metric)} |"
            )
    lines.append("")
    lines += [f"- {task['verdict']}" for task in results["tasks"].values() if task.get("verdict")]
    return "\n".join(lines)


def with_evaluation(card: str, results: dict) -> str:
    """`card` with its Evaluation section (up to the next `## ` heading) replaced by the scores; appended when
    the card has none."""
    section = evaluation_section(results)
    match = re.search(rf"^{re.escape(EVALUATION)}[ \t]*$", card, flags=re.MULTILINE)
    if match is None:
        return card.rstrip("\n") + "\n\n" + section + "\n"
    following = re.search(r"^## ", card[match.end() :], flags=re.MULTILINE)
    end = match.end() + following.start() if following else len(card)
    rest = card[end:]
    return card[: match.start()] + section + ("\n\n" + rest if rest else "\n")


def write_eval_card(export_dir: Path, path: Path, results: dict) -> Path:
    """`path` = the export's model card (model/README.md) with the scores in its Evaluation section; the export
    folder is only read. An export without a card gets a short card of the scores alone."""
    source = export_dir / "model" / "README.md"
    card = source.read_text(encoding="utf-8") if source.is_file() else f"# {results.get('task', 'model')}\n"
    path.write_text(with_evaluation(card, results), encoding="utf-8")
    return path
