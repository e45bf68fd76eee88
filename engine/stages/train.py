"""train stage: LoRA supervised fine-tuning of the base model on the dataset's prompt/completion samples.

TRL's SFTTrainer does the work: the loss covers the character's line only (`completion_only_loss`), and TRL
appends the tokenizer's EOS to every completion, so the model also learns where its reply ends. Checkpoints
go to `<out>/checkpoints` every `save_steps`; after a crash the runner hands the same folder back and training
resumes from the newest complete checkpoint. Outputs:

    adapter/            the LoRA adapter (PEFT) and the tokenizer it was trained with
    log_history.json    every logged step (loss, learning rate, grad norm, tokens seen)
    metrics.json        first/final loss, steps, samples, runtime, tokens/s, peak memory, precision
    loss.png            loss against step

Defaults suit the embedded 135M model on a 2-core CPU: gradient checkpointing off (it costs ~40 % there), bf16
only where the hardware computes it natively.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import StageError
from engine.models import base_model_input, resolve_base_model
from engine.registry import StageContext, register_stage

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)  # fmt: skip


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, description="LoRA rank r: the width of the low-rank update.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get an adapter, or 'all-linear' for every linear layer but the output head.",
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["lora"] = Field("lora", description="Fine-tuning method; 'lora' trains a low-rank adapter on a frozen base.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    max_steps: Optional[int] = Field(60, ge=0, description="Optimizer steps to train; null or 0 trains for num_epochs instead.")
    num_epochs: Optional[float] = Field(None, gt=0, description="Passes over the train split; used only when max_steps is null or 0.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: str = Field("cosine", description=f"Learning-rate schedule after warmup: one of {', '.join(SCHEDULERS)}.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Samples per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step (effective batch = batch_size x this).")
    max_length: int = Field(256, ge=8, description="Tokens per sample (prompt + line + EOS); longer samples are cut at the end.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; auto = bf16 where the GPU or CPU (AMX / AVX512-BF16) supports it, else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch samples of similar length together (less padding, more tokens/s); false = plain random order."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~40 % slower on CPU.")
    save_steps: int = Field(20, ge=1, description="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (the oldest are deleted).")
    logging_steps: int = Field(5, ge=1, description="Log loss and learning rate every this many steps.")
    seed: int = Field(0, description="Seed for the adapter's initialisation and the data order.")

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            close = difflib.get_close_matches(value, SCHEDULERS, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown lr_scheduler '{value}'{hint} Available: {', '.join(SCHEDULERS)}")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if not self.max_steps and self.num_epochs is None:
            raise ValueError("set max_steps (e.g. 60) or, with max_steps: 0, num_epochs (e.g. 1)")
        return self


# ---------------------------------------------------------------- helpers shared with export


def load_base_model(path: Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """The base model as a plain (trainable, saveable) model.

    A folder converted from a gguf keeps `quantization_config: {quant_method: gguf}` in its config.json, which
    makes transformers treat the loaded model as quantized and refuse `save_pretrained`; the weights are plain
    floats, so that entry is dropped.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant is not None and str(getattr(quant_method, "value", quant_method)) == "gguf":
        del config.quantization_config
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16)."""
    import torch

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(setting: str) -> str:
    """'auto' -> 'bf16' where the hardware has it natively, else 'fp32'; explicit settings are checked."""
    import torch

    cuda = torch.cuda.is_available()
    if setting == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if setting == "fp16" and not cuda:
        raise StageError("train", "precision fp16 needs a CUDA GPU; set train.precision to bf16, fp32 or auto")
    if setting == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise StageError("train", "this GPU does not support bf16; set train.precision to fp16, fp32 or auto")
    return setting


# ---------------------------------------------------------------- resuming


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from, or None when it looks complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "unreadable trainer_state.json"
    if not any((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in ADAPTER_WEIGHTS):
        return "no adapter weights"
    return None


def find_resume_checkpoint(checkpoints: Path, console: Any) -> Optional[Path]:
    """The newest complete checkpoint-N under `checkpoints`, warning about (and skipping) broken ones."""
    if not checkpoints.is_dir():
        return None
    found = []
    for folder in checkpoints.iterdir():
        match = CHECKPOINT_RE.match(folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    for _step, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        console.print(f"[yellow]warning: skipping {folder.name}: {problem} (incomplete or corrupt, probably cut off by a crash)[/yellow]")
    return None


# ---------------------------------------------------------------- checks and reports


def check_completions_fit(train: Any, tokenizer: Any, max_length: int, console: Any) -> dict:
    """Every sample must keep at least one completion token after truncation to max_length (TRL would drop it
    silently otherwise). Tokenizes prompts and lines in one batch each: cheap next to training."""
    prompts = tokenizer(list(train["prompt"]))["input_ids"]
    lines = tokenizer(list(train["completion"]))["input_ids"]
    cut = 0
    for index, (prompt, line) in enumerate(zip(prompts, lines)):
        if len(prompt) >= max_length:
            scene = train[index]["scene"] if "scene" in train.column_names else "?"
            raise StageError(
                "train",
                f"train sample {index} (scene {scene!r}) has a {len(prompt)}-token prompt, so nothing of the character's line "
                f"is left after truncation to train.max_length={max_length}; raise train.max_length (to at least "
                f"{len(prompt) + len(line) + 1}) or lower dataset.context_turns",
            )
        if len(prompt) + len(line) + 1 > max_length:  # +1: the EOS that TRL appends
            cut += 1
    if cut:
        console.print(
            f"[yellow]note: {cut} of {len(prompts)} samples are cut at train.max_length={max_length} before their EOS "
            "(the model sees less of those lines and does not learn where they end); raise train.max_length to keep them whole[/yellow]"
        )
    return {"samples": len(prompts), "cut_at_max_length": cut}


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot([s for s, _ in points], [l for _, l in points], marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------- the stage


@register_stage(
    "train",
    config=TrainConfig,
    version="1",
    reads=("train", "model"),
    needs=("dataset",),
    libraries=("torch", "transformers", "trl", "peft", "accelerate"),
    external_inputs=lambda recipe: {"base_model": base_model_input(recipe.model)},
    resumable=True,  # the runner hands an interrupted run's folder back: checkpoints survive a crash
)
def run_train(ctx: StageContext) -> dict:
    """LoRA fine-tuning (TRL SFTTrainer + PEFT) on the character's lines, resumable from checkpoints."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer, Trainer
    from trl import SFTConfig, SFTTrainer

    cfg: TrainConfig = ctx.config
    console = ctx.console
    base_path = resolve_base_model(ctx.recipe.model, console)
    precision = resolve_precision(cfg.precision)
    cuda = torch.cuda.is_available()
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        console.print("[yellow]warning: this CPU has no native bf16 (AMX / AVX512-BF16): bf16 will be slower than fp32[/yellow]")

    # keep_in_memory: TRL's map() calls would otherwise write cache files into the finished dataset stage folder
    data = load_from_disk(str(ctx.upstream["dataset"] / "data"), keep_in_memory=True)
    train = data["train"]
    if len(train) == 0:
        raise StageError("train", "the dataset's train split is empty; check the character name and dataset settings")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fit = check_completions_fit(train, tokenizer, cfg.max_length, console)
    # only the two text columns: TRL then sees a prompt-completion dataset and masks the prompt from the loss
    train = train.select_columns(["prompt", "completion"])

    # LoRA: the frozen base is held in the compute dtype (as LLaMA-Factory does: half the memory traffic);
    # PEFT keeps the adapter weights in fp32 and autocast does the mixed-precision matmuls.
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = load_base_model(base_path, base_dtype, ctx.recipe.model.trust_remote_code)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )

    checkpoints = ctx.out / "checkpoints"
    resume = find_resume_checkpoint(checkpoints, console)
    if resume is not None:
        console.print(f"[bold]resuming from {resume.name}[/bold]")

    args = SFTConfig(
        output_dir=str(checkpoints),
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        num_train_epochs=cfg.num_epochs if not cfg.max_steps else 1.0,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,  # the new name of gradient_checkpointing
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=not sys.stderr.isatty(),  # a log file gets one line per logging step instead of a bar
    )

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer with the model's own cross-entropy instead of TRL's fused, chunked LM-head loss.

        TRL 1.16 computes the loss (plus entropy and top-1 accuracy for its logs) in vocabulary chunks to save
        memory on GPUs; without Triton that loop runs in plain torch. Measured on 2 CPU threads, same losses to
        4 decimals: SmolLM2-135M fp32 111 -> 141 tokens/s, the tiny test model 2x. The labels (prompt masked with
        -100, EOS kept) are TRL's either way.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer = PlainLossSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ",".join(cfg.lora.target_modules)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    console.print(
        f"train: {len(train)} samples, {'%d steps' % cfg.max_steps if cfg.max_steps else '%g epochs' % cfg.num_epochs}, "
        f"batch {cfg.batch_size}x{cfg.gradient_accumulation_steps}, max_length {cfg.max_length}, {precision}, "
        f"LoRA r{cfg.lora.rank} on {targets}: {trainable:,} of {total:,} parameters trainable"
    )

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started
    state = trainer.state
    session_tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)

    adapter = ctx.out / "adapter"
    trainer.model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))

    history = state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    metrics = {
        "steps": state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": result.metrics.get("train_loss"),
        "samples_seen": state.global_step * cfg.batch_size * cfg.gradient_accumulation_steps,
        "tokens_seen": state.num_input_tokens_seen,
        "train_runtime_s": round(runtime, 2),
        "tokens_per_s": round(session_tokens / runtime, 1) if runtime > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "precision": precision,
        "device": "cuda" if cuda else "cpu",
        "trainable_params": trainable,
        "resumed_from": resume.name if resume else None,
        **fit,
    }
    (ctx.out / "log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(history, ctx.out / "loss.png", f"{ctx.recipe.name}: LoRA r{cfg.lora.rank}, lr {cfg.learning_rate:g}, {precision}")
    shutil.rmtree(checkpoints, ignore_errors=True)

    console.print(
        f"train: {metrics['steps']} steps, loss {metrics['first_loss']} -> {metrics['final_loss']}, "
        f"{metrics['tokens_per_s']} tokens/s, {metrics['train_runtime_s']} s, peak {metrics['peak_rss_mb']} MB"
    )
    return {
        "steps": metrics["steps"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "tokens_per_s": metrics["tokens_per_s"],
        "runtime_s": metrics["train_runtime_s"],
        "precision": precision,
        "trainable_params": trainable,
    }
