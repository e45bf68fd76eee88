"""The train stage's optional preference phase: TRL's DPOTrainer (or CPOTrainer) after supervised fine-tuning.

A pair is (prompt, chosen, rejected): the prompt and the character's real line of a training sample, and a
line another speaker says in the same scene (`rejected_from: same_scene`, the dataset's `other_lines`) or in
any training scene (`any_scene`); by default (`rejected_length: matched`) the candidates nearest the real line
in length, so that a pair teaches what the character says rather than how long he talks, as the next-line
task's length-matched distractors test it. Held-out samples carry no `other_lines` and are never read here, so no
held-out scene contributes a pair. The phase starts from the SFT result (`<out>/sft`): with LoRA the SFT
adapter is trained further and TRL keeps a frozen copy of it as the reference model (so `beta` holds the
policy near the SFT model, not near the base); with full fine-tuning TRL loads the SFT weights a second time
as the reference. Method `cpo` (TRL's CPOTrainer) needs no reference: its loss compares the policy's own summed
log-probabilities of the chosen and the rejected line (the quantity next-line `acc` ranks choices by), plus
`sft_weight` times the chosen line's NLL, and each step skips the reference forward pass. Checkpoints go to
`<out>/preference_checkpoints` with the train key, as SFT's do.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

LOSS_TYPES = {"dpo": ["sigmoid"], "ipo": ["ipo"], "dpo_sft": ["sigmoid", "sft"]}


class PreferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "dpo", "ipo", "dpo_sft", "cpo"] = Field(
        "none",
        description="Preference tuning after SFT: none; dpo (TRL DPOTrainer, sigmoid loss); ipo; dpo_sft (DPO plus the "
        "chosen line's NLL, as in RPO); cpo (TRL CPOTrainer: reference-free, the policy's own log-probability margin plus "
        "sft_weight x the chosen line's NLL). Chosen = the character's real line, rejected = another speaker's line.",
    )
    beta: float = Field(
        0.1, gt=0, description="dpo/ipo/dpo_sft: how strongly the policy is held to the reference (the SFT model); cpo: the "
        "temperature of the log-probability margin."
    )
    pairs_per_sample: int = Field(1, ge=1, le=8, description="Pairs built from each training sample (each with its own rejected line).")
    rejected_from: Literal["same_scene", "any_scene"] = Field(
        "same_scene",
        description="Where rejected lines come from: same_scene = another speaker's line in the sample's own (training) scene; "
        "any_scene = another speaker's line from any training scene.",
    )
    rejected_length: Literal["matched", "any"] = Field(
        "matched",
        description="Which of the scene's other lines become rejected lines: matched = the ones nearest the real line in "
        "length (so the pair differs in what is said, not in how much, as next_line's length-matched distractors do); "
        "any = drawn at random.",
    )
    max_steps: int = Field(60, ge=1, description="Optimizer steps of the preference phase.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step, across all processes.")
    learning_rate: Optional[float] = Field(
        None, gt=0, description="Peak learning rate of the phase; null = 5e-5 for lora and qlora, 5e-7 for full fine-tuning."
    )
    sft_weight: float = Field(1.0, ge=0, description="Weight of the chosen line's NLL term of dpo_sft and cpo (the preference term's weight is 1).")
    max_pairs: Optional[int] = Field(None, ge=1, description="Use at most this many pairs (a seeded sample); null = all.")

    def peak_learning_rate(self, train_method: str) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-7 if train_method == "full" else 5e-5


def build_pairs(train: Any, settings: PreferenceSettings, seed: int) -> list[dict]:
    """Preference pairs from the train split (columns prompt, completion, other_lines)."""
    from engine.stages.eval import length_gap  # the eval's measure, so rejected lines match as its distractors do

    rng = random.Random(seed)
    prompts, lines, others = list(train["prompt"]), list(train["completion"]), list(train["other_lines"])
    everyone = sorted({line for pool in others for line in pool}) if settings.rejected_from == "any_scene" else []
    pairs = []
    for prompt, line, pool in zip(prompts, lines, others):
        if settings.rejected_from == "any_scene":
            candidates = [other for other in rng.sample(everyone, min(len(everyone), 4 * settings.pairs_per_sample)) if other != line]
        else:
            candidates = list(pool)
            rng.shuffle(candidates)
        if settings.rejected_length == "matched":
            candidates.sort(key=lambda other: length_gap(other, line))  # stable: equal gaps keep the seeded order
        for rejected in candidates[: settings.pairs_per_sample]:
            pairs.append({"prompt": prompt, "chosen": line, "rejected": rejected})
    if settings.max_pairs is not None and len(pairs) > settings.max_pairs:
        pairs = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), settings.max_pairs))]
    return pairs


def without_unused_bos(tokenizer: Any) -> Any:
    """The tokenizer CPOTrainer gets: CPO puts `bos_token` in front of every prompt that does not start with it,
    but SFT, the eval and serving tokenize a prompt the way the tokenizer does. For a tokenizer that adds no BOS
    of its own (SmolLM2: its bos_token <|im_start|> only opens chat turns, so a file template's prompt would
    gain one) CPO gets a copy without bos_token; any other tokenizer is passed as it is."""
    if tokenizer.bos_token_id is None or tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer
    plain = copy.deepcopy(tokenizer)
    plain.bos_token = None
    return plain


def plot_preference(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history if "loss" in entry and "step" in entry]
    losses = [entry["loss"] for entry in history if "loss" in entry and "step" in entry]
    accuracies = [(entry["step"], entry["rewards/accuracies"]) for entry in history if "rewards/accuracies" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, marker="o", markersize=3, label="preference loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if accuracies:
        right = ax.twinx()
        right.plot([s for s, _ in accuracies], [a for _, a in accuracies], color="tab:green", marker="s", markersize=3, label="reward accuracy")
        right.set_ylabel("chosen preferred (share of pairs)")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_preference_phase(spec: dict, cfg: Any, sft_metrics: dict, console: Any) -> dict:
    """DPO (or CPO) on the SFT result; saves the final adapter (or model) where export reads it and returns the metrics."""
    import os

    import torch
    from datasets import Dataset, load_from_disk
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from engine.errors import StageError
    from engine.stages.train import (
        attention_kwargs,
        find_resume_checkpoint,
        load_base_model,
        load_training_model,
        peak_rss_mb,
        record_key_callback,
        resolve_precision,
        rounded,
        shared_trainer_args,
    )

    settings: PreferenceSettings = cfg.preference
    out = Path(spec["out"])
    sft_dir = out / "sft"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    precision = resolve_precision(cfg.precision)
    cuda = torch.cuda.is_available()
    if settings.batch_size % world:
        raise StageError(
            "train", f"train.preference.batch_size={settings.batch_size} does not divide among {world} processes; use a multiple of {world}"
        )

    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 writes sft/ (tokenizer, marker) after the others have saved their part

    train = load_from_disk(spec["dataset"], keep_in_memory=True)["train"]
    if "other_lines" not in train.column_names:
        raise StageError("train", "the dataset has no other_lines column (it was built by an older engine); rerun with --force dataset")
    pairs = build_pairs(train, settings, cfg.seed)
    if not pairs:
        raise StageError(
            "train",
            "train.preference found no rejected lines: no other speaker talks in the training scenes; set train.preference.method: none "
            "or use rejected_from: any_scene",
        )
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.method == "full":
        model = load_base_model(sft_dir, torch.float32, spec.get("trust_remote_code", False), **attention_kwargs(cfg.attention))
    else:
        base = load_training_model(cfg, Path(spec["model_path"]), precision, spec.get("trust_remote_code", False))
        model = PeftModel.from_pretrained(base, str(sft_dir), is_trainable=True)  # TRL copies it as the "ref" adapter

    common = dict(
        output_dir=str(out / "preference_checkpoints"),
        max_steps=settings.max_steps,
        learning_rate=settings.peak_learning_rate(cfg.method),
        warmup_steps=min(cfg.warmup_steps, settings.max_steps // 4),
        per_device_train_batch_size=settings.batch_size // world,
        max_length=cfg.max_length,
        beta=settings.beta,
        **shared_trainer_args(cfg, spec, precision, cuda, world, is_main),
    )
    callbacks = [record_key_callback(spec["key"])]
    if settings.method == "cpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO lives in trl.experimental; the engine pins TRL
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="sigmoid", cpo_alpha=settings.sft_weight, **common)
        trainer = CPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=without_unused_bos(tokenizer), callbacks=callbacks
        )  # fmt: skip
        reference = "none (reference-free)"
    else:
        loss_type = LOSS_TYPES[settings.method]
        args = DPOConfig(loss_type=loss_type, loss_weights=[1.0, settings.sft_weight] if len(loss_type) == 2 else None, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, callbacks=callbacks)
        reference = "the SFT model"
    if is_main:
        console.print(
            f"preference ({settings.method}, beta {settings.beta}): {len(pairs)} pairs (rejected: another speaker's line, "
            f"{settings.rejected_from.replace('_', ' ')}, {'nearest in length' if settings.rejected_length == 'matched' else 'any length'}), "
            f"{settings.max_steps} steps, batch {settings.batch_size}, "
            f"lr {settings.peak_learning_rate(cfg.method):g}, reference = {reference}"
        )
        first = pairs[0]
        console.print(f"  first pair: prompt …{first['prompt'][-80:]!r}\n    chosen   {first['chosen'][:100]!r}\n    rejected {first['rejected'][:100]!r}", markup=False)
    resume = find_resume_checkpoint(out / "preference_checkpoints", console, spec["key"])
    if resume and is_main:
        console.print(f"[bold]resuming the preference phase from {resume.name}[/bold]")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started

    final = out / ("model" if cfg.method == "full" else "adapter")
    trainer.save_model(str(final))
    if not is_main:
        return {}
    shutil.rmtree(final / "ref", ignore_errors=True)  # PEFT saves TRL's frozen reference copy of the adapter beside it
    tokenizer.save_pretrained(str(final))

    history = trainer.state.log_history
    logged = [entry for entry in history if "loss" in entry]
    last = logged[-1] if logged else {}
    tail = logged[-max(1, len(logged) // 4) :]  # the last quarter of the logged steps: less noisy than the last one

    def tail_mean(name: str) -> Optional[float]:
        values = [entry[name] for entry in tail if name in entry]
        return round(sum(values) / len(values), 4) if values else None

    phase = {
        "method": settings.method,
        "beta": settings.beta,
        "pairs": len(pairs),
        "rejected_from": settings.rejected_from,
        "rejected_length": settings.rejected_length,
        "batch_size": settings.batch_size,
        "steps": trainer.state.global_step,
        "first_loss": logged[0]["loss"] if logged else None,
        "final_loss": last.get("loss"),
        "reward_accuracy_last_quarter": tail_mean("rewards/accuracies"),
        "reward_margin_last_quarter": tail_mean("rewards/margins"),
        "train_runtime_s": round(float(result.metrics.get("train_runtime") or runtime), 2),
        "learning_rate": settings.peak_learning_rate(cfg.method),
        "resumed_from": resume.name if resume else None,
    }
    metrics = dict(sft_metrics)
    metrics["preference"] = phase
    metrics["peak_rss_mb"] = max(float(sft_metrics.get("peak_rss_mb") or 0), peak_rss_mb())
    (out / "preference_log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_preference(history, out / "preference.png", f"{spec.get('recipe_name', '')}: {settings.method}, beta {settings.beta}")
    shutil.rmtree(out / "preference_checkpoints", ignore_errors=True)
    if cfg.method == "full":
        shutil.rmtree(sft_dir, ignore_errors=True)  # a whole model: the final one is in model/
    console.print(
        f"preference: {phase['steps']} steps, loss {rounded(phase['first_loss'])} -> {rounded(phase['final_loss'])}, chosen preferred in "
        f"{phase['reward_accuracy_last_quarter']} of the last quarter's pairs (margin {phase['reward_margin_last_quarter']}), "
        f"{phase['train_runtime_s']} s"
    )
    return metrics
