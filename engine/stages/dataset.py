"""dataset: window the cleaned turns into (prompt, completion) samples for the character, split by scene.

Each line the character speaks becomes one sample: up to `context_turns` preceding turns of the same scene
(never across a scene break) rendered with the recipe's prompt template (engine/templates.py) as `prompt`,
and the line itself as `completion` (no EOS: TRL appends the tokenizer's). Whole scenes are held out, chosen
by a seeded hash of the scene id, so a scene's split never changes when other data is added, and no scene is
in both splits. Samples longer than `max_length` tokens lose their oldest context turns until they fit.

Each training sample also carries `other_lines`: up to 8 lines other speakers say in the same scene (never a
duplicate of the character's line), from which the train stage's preference phase draws rejected replies.

Speaker-conditioned training (`speakers: all`, as the South Park seed trained): every other speaker's lines in
the training scenes become samples too, each prompt rendered with that speaker as the character (its name
where the template names the character, a plain system prompt), so the model learns that the name in the
prompt selects the voice. Those samples carry no `other_lines` (preference pairs stay the character's), and
the held-out split is always the character's lines only.

Output: `data/` (a datasets.DatasetDict with `train` and `heldout`, Arrow on disk) and `preview.md`.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import StageError
from engine.models import base_model_input, resolve_base_model
from engine.persona import CharacterConfig
from engine.registry import InputFile, StageContext, register_stage
from engine.templates import (
    TEMPLATES_DIR,
    available_templates,
    context_to_messages,
    render_prompt,
    unknown_template_message,
)


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_turns: int = Field(4, ge=0, description="How many preceding turns of the same scene form a sample's context (never across scenes).")
    min_context_turns: int = Field(1, ge=0, description="Skip character lines with fewer preceding turns than this in their scene (e.g. a scene's first line).")
    template: str = Field("tokenizer", description="Prompt template: 'tokenizer' (the base model's chat template with the persona system prompt) or the name of a file in templates/ without .jinja.")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of scenes held out for evaluation, picked by a seeded hash of the scene id (stable as data grows).")
    heldout_scenes: list[str] = Field(default_factory=list, description="Scene ids to hold out, as fnmatch patterns ('henry-iv-part-1/*'); when given, exactly these are held out and heldout_fraction is ignored.")
    split_seed: int = Field(0, description="Seed of the scene hash that picks held-out scenes and of the sample caps.")
    max_train_samples: Optional[int] = Field(None, ge=1, description="Keep at most this many training samples, drawn at random with split_seed (smoke runs).")
    max_heldout_samples: Optional[int] = Field(None, ge=1, description="Keep at most this many held-out samples, drawn at random with split_seed.")
    max_length: int = Field(256, ge=8, description="Token budget of prompt + completion + EOS; longer samples lose their oldest context turns until they fit (down to min_context_turns), and one that still does not fit is dropped.")
    speakers: Union[Literal["character", "all"], list[str]] = Field(
        "character",
        description="Whose lines in the training scenes become samples: 'character' (the character's only); 'all' (every speaker's, "
        "each prompt naming its own speaker as the character: speaker-conditioned training); or a list of speaker names (plus the "
        "character). Held-out samples are always the character's.",
    )
    min_speaker_lines: int = Field(
        20, ge=1, description="With speakers 'all': only speakers with at least this many lines in the data give samples (drops one-off extras)."
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in available_templates():  # a glob of templates/: no transformers import here
            raise ValueError(unknown_template_message(value))
        return value

    @model_validator(mode="after")
    def _context_bounds(self) -> "DatasetConfig":
        if self.min_context_turns > self.context_turns:
            raise ValueError(
                f"min_context_turns ({self.min_context_turns}) is larger than context_turns ({self.context_turns}): "
                "no sample could ever qualify; lower min_context_turns or raise context_turns"
            )
        return self


def dataset_inputs(recipe: Any) -> dict[str, InputFile]:
    """The base model's bytes (its tokenizer and chat template) and a file template's text enter the cache key."""
    from engine.datafiles import sha256_file

    inputs = {"base_model": base_model_input(recipe.model)}
    template_file = TEMPLATES_DIR / f"{recipe.dataset.template}.jinja"
    if recipe.dataset.template != "tokenizer" and template_file.is_file():
        inputs["template"] = InputFile(path=template_file, sha256=sha256_file(template_file))
    return inputs


def read_scenes(path: Path) -> dict[str, list[dict]]:
    """turns.jsonl -> {scene: turns in order}, scenes in the order they first appear."""
    scenes: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                turn = json.loads(line)
                scenes.setdefault(str(turn["scene"]), []).append(turn)
    for turns in scenes.values():
        turns.sort(key=lambda turn: turn["index"])  # stable: equal indices keep file order
    return scenes


def scene_draw(scene: str, seed: int) -> float:
    """A number in [0, 1) fixed by the scene id and the seed: the scene is held out when it is below the fraction."""
    digest = hashlib.sha256(f"{seed}\0{scene}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_scene_ids(scene_ids: list[str], cfg: DatasetConfig) -> set[str]:
    if cfg.heldout_scenes:
        return {scene for scene in scene_ids if any(fnmatch.fnmatchcase(scene, pattern) for pattern in cfg.heldout_scenes)}
    return {scene for scene in scene_ids if scene_draw(scene, cfg.split_seed) < cfg.heldout_fraction}


def speaker_persona(speaker: str) -> CharacterConfig:
    """The persona a speaker-conditioned sample of another speaker is rendered with: the speaker's own name,
    and the default system prompt (the character's own prompt describes the character, not them)."""
    return CharacterConfig(name=speaker)


def conditioned_speakers(cfg: DatasetConfig, speakers: Counter, name: str) -> set[str]:
    """The speakers besides the character whose training-scene lines become samples."""
    if cfg.speakers == "character":
        return set()
    if cfg.speakers == "all":
        return {speaker for speaker, count in speakers.items() if speaker != name and count >= cfg.min_speaker_lines}
    return {speaker for speaker in cfg.speakers if speaker != name}


OTHER_LINES = 8  # per training sample: the preference phase draws its rejected replies from these


def other_speaker_lines(turns: list[dict], name: str, completion: str, rng: random.Random) -> list[str]:
    """Up to OTHER_LINES distinct lines that other speakers say in the same scene, none a (near-)duplicate of
    the character's line: the rejected replies of a preference pair ("same context, another speaker")."""
    pool = sorted({str(t["text"]) for t in turns if t["speaker"] != name and str(t["text"]).strip()})
    rng.shuffle(pool)
    picked: list[str] = []
    target = " ".join(completion.lower().split())
    for line in pool:
        candidate = " ".join(line.lower().split())
        if candidate == target or difflib.SequenceMatcher(None, candidate, target).ratio() >= 0.9:
            continue
        picked.append(line)
        if len(picked) == OTHER_LINES:
            break
    return picked


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    rank = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values))))  # nearest rank
    return sorted_values[rank - 1]


def _cap(samples: list[dict], limit: Optional[int], seed: int) -> list[dict]:
    if limit is None or len(samples) <= limit:
        return samples
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def _fenced(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def write_preview(path: Path, samples: list[dict], template: str, character: str) -> None:
    parts = [f"# Dataset preview: {character}, template `{template}`\n", "The first training samples as the model sees them.\n"]
    for number, sample in enumerate(samples[:3], 1):
        parts.append(f"## Sample {number} (scene `{sample['scene']}`, turn {sample['turn_index']})\n")
        parts.append("### prompt\n\n" + _fenced(sample["prompt"]) + "\n")
        parts.append("### completion (the loss is on this, plus the tokenizer's EOS)\n\n" + _fenced(sample["completion"]) + "\n")
    path.write_text("\n".join(parts), encoding="utf-8")


@register_stage(
    "dataset",
    config=DatasetConfig,
    version="3",
    reads=("dataset", "character", "model"),
    needs=("clean",),
    libraries=("transformers", "tokenizers", "datasets", "jinja2"),
    external_inputs=dataset_inputs,
)
def run_dataset(ctx: StageContext) -> dict:
    """Window the character's lines into prompt/completion samples, split by scene, saved as a DatasetDict."""
    from datasets import Dataset, DatasetDict, Features, List, Value
    from rich.progress import track
    from transformers import AutoTokenizer

    cfg: DatasetConfig = ctx.config
    persona = ctx.recipe.character
    name = persona.name
    scenes = read_scenes(ctx.upstream["clean"] / "turns.jsonl")

    speakers = Counter(turn["speaker"] for turns in scenes.values() for turn in turns)
    if speakers[name] == 0:
        top = ", ".join(f"{speaker} ({count})" for speaker, count in speakers.most_common(5))
        raise StageError(
            "dataset",
            f"the character '{name}' has no lines in the cleaned turns; the most frequent speakers are: {top}. "
            "fix: set character.name to the speaker as spelled in the data, or map aliases to it in the clean stage",
        )

    heldout_ids = heldout_scene_ids(list(scenes), cfg)
    if cfg.heldout_scenes and not heldout_ids:
        examples = ", ".join(list(scenes)[:5])
        raise StageError(
            "dataset",
            f"dataset.heldout_scenes {cfg.heldout_scenes} match no scene; scene ids look like: {examples}",
        )

    folder = resolve_base_model(ctx.recipe.model, ctx.console)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=ctx.recipe.model.trust_remote_code)
    eos = tokenizer.eos_token or ""

    extra_speakers = conditioned_speakers(cfg, speakers, name)
    missing = [speaker for speaker in (cfg.speakers if isinstance(cfg.speakers, list) else []) if speakers[speaker] == 0]
    if missing:
        top = ", ".join(f"{speaker} ({count})" for speaker, count in speakers.most_common(8))
        raise StageError(
            "dataset",
            f"dataset.speakers names {', '.join(missing)}, who say nothing in the cleaned turns; the most frequent speakers are: {top}. "
            "fix: spell them as in the data, or use speakers: all",
        )
    personas = {name: persona, **{speaker: speaker_persona(speaker) for speaker in extra_speakers}}

    def build(context: list[dict], completion: str, speaker: str) -> tuple[str, list[int]]:
        try:
            prompt = render_prompt(cfg.template, tokenizer, context_to_messages(context, speaker), personas[speaker])
        except ValueError as error:  # e.g. a base tokenizer without a chat template
            raise StageError("dataset", str(error)) from None
        return prompt, tokenizer(prompt + completion + eos)["input_ids"]  # as TRL tokenizes it

    counts: Counter[str] = Counter()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    progress = track(
        scenes.items(),
        total=len(scenes),
        description=f"dataset: {speakers[name]} lines of {name}"
        + (f" + {sum(speakers[s] for s in extra_speakers)} of {len(extra_speakers)} other speakers" if extra_speakers else "")
        + f", template '{cfg.template}'",
        console=ctx.console,
        transient=True,
    )
    for scene, turns in progress:
        split = "heldout" if scene in heldout_ids else "train"
        for position, turn in enumerate(turns):
            speaker = str(turn["speaker"])
            if speaker != name and not (split == "train" and speaker in extra_speakers):
                continue
            context = turns[max(0, position - cfg.context_turns) : position] if cfg.context_turns else []
            if len(context) < cfg.min_context_turns:
                counts["skipped_no_context"] += 1
                continue
            completion = str(turn["text"])
            prompt, ids = build(context, completion, speaker)
            was_trimmed = False
            while len(ids) > cfg.max_length and len(context) > cfg.min_context_turns:
                context = context[1:]  # the oldest turn goes first
                prompt, ids = build(context, completion, speaker)
                was_trimmed = True
            if len(ids) > cfg.max_length:
                counts["dropped_too_long"] += 1
                continue
            counts["trimmed"] += was_trimmed
            # held-out samples get none: nothing of a held-out scene may ever reach training; another speaker's
            # sample gets none either: preference pairs are the character's
            rng = random.Random(f"{cfg.split_seed}\0{scene}\0{turn['index']}")
            others = other_speaker_lines(turns, name, completion, rng) if split == "train" and speaker == name else []
            splits[split].append(
                {
                    "scene": scene,
                    "speaker": speaker,
                    "prompt": prompt,
                    "completion": completion,
                    "context": [{"speaker": str(t["speaker"]), "text": str(t["text"])} for t in context],
                    "turn_index": int(turn["index"]),
                    "other_lines": others,
                    "_ids": ids,
                }
            )

    # TRL masks the prompt's tokens; when the prompt's last token merges with the completion's first one (a
    # prompt ending in ':' before a line starting with '('), training sees a slightly different prompt
    kept = splits["train"] + splits["heldout"]
    for sample, prompt_ids in zip(kept, tokenizer([s["prompt"] for s in kept])["input_ids"] if kept else []):
        counts["boundary_merges"] += sample["_ids"][: len(prompt_ids)] != prompt_ids

    for split, fix in (
        ("train", "lower dataset.heldout_fraction or hold out fewer scenes with dataset.heldout_scenes"),
        ("heldout", "raise dataset.heldout_fraction, change dataset.split_seed, or name scenes in dataset.heldout_scenes"),
    ):
        if not splits[split]:
            raise StageError(
                "dataset",
                f"the {split} split is empty ({len(splits['train'])} train, {len(splits['heldout'])} held-out samples; "
                f"{counts['skipped_no_context']} skipped for too little context, {counts['dropped_too_long']} too long); fix: {fix}",
            )

    splits["train"] = _cap(splits["train"], cfg.max_train_samples, cfg.split_seed)
    splits["heldout"] = _cap(splits["heldout"], cfg.max_heldout_samples, cfg.split_seed + 1)

    features = Features(
        {
            "scene": Value("string"),
            "speaker": Value("string"),
            "prompt": Value("string"),
            "completion": Value("string"),
            "context": List({"speaker": Value("string"), "text": Value("string")}),
            "turn_index": Value("int64"),
            "other_lines": List(Value("string")),
        }
    )
    columns = list(features)
    data = DatasetDict(
        {split: Dataset.from_list([{k: s[k] for k in columns} for s in rows], features=features) for split, rows in splits.items()}
    )
    data.save_to_disk(str(ctx.out / "data"))
    write_preview(ctx.out / "preview.md", splits["train"], cfg.template, persona.shown_name)

    lengths = sorted(len(s["_ids"]) for rows in splits.values() for s in rows)
    return {
        "train": len(splits["train"]),
        "heldout": len(splits["heldout"]),
        "train_scenes": len({s["scene"] for s in splits["train"]}),
        "other_speaker_samples": sum(s["speaker"] != name for s in splits["train"]),
        "train_speakers": len({s["speaker"] for s in splits["train"]}),
        "heldout_scenes": len({s["scene"] for s in splits["heldout"]}),
        "skipped_no_context": counts["skipped_no_context"],
        "dropped_too_long": counts["dropped_too_long"],
        "trimmed": counts["trimmed"],
        "boundary_merges": counts["boundary_merges"],
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "tokens_p50": _percentile(lengths, 0.50),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": lengths[-1],
        "max_length": cfg.max_length,
        "template": cfg.template,
    }
