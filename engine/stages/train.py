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
import logging
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
from engine.hardware import cpu_has_bf16
from engine.models import base_model_input, resolve_base_model
from engine.preference import PreferenceSettings
from engine.registry import StageContext, register_stage
from engine.trl_fields import SFT_CONFIG_FIELDS

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)  # fmt: skip


ENGINE_OWNED_SFT_ARGS = {
    # SFTConfig fields the engine sets from its own keys (or must control): sft_args may not set them
    "output_dir": "set by the engine (the stage folder)",
    "per_device_train_batch_size": "set train.batch_size (the global batch; divided among processes)",
    "num_train_epochs": "set train.num_epochs", "max_steps": "set train.max_steps",
    "learning_rate": "set train.learning_rate", "lr_scheduler_type": "set train.lr_scheduler",
    "warmup_steps": "set train.warmup_steps", "weight_decay": "set train.weight_decay",
    "gradient_accumulation_steps": "set train.gradient_accumulation_steps", "max_length": "set train.max_length",
    "packing": "set train.packing", "padding_free": "set train.padding_free",
    "bf16": "set train.precision", "fp16": "set train.precision", "use_cpu": "set by the engine from the hardware",
    "gradient_checkpointing": "set train.gradient_checkpointing", "activation_checkpointing": "set train.gradient_checkpointing",
    "save_steps": "set train.save_steps", "save_total_limit": "set train.save_total_limit", "save_strategy": "set train.save_steps",
    "logging_steps": "set train.logging_steps", "eval_steps": "set train.eval_steps", "eval_strategy": "set train.eval_steps",
    "seed": "set train.seed", "data_seed": "set train.seed", "optim": "set train.optimizer", "max_grad_norm": "set train.max_grad_norm",
    "completion_only_loss": "always on: the loss covers the character's line and its EOS only",
    "train_sampling_strategy": "set train.group_by_length", "deepspeed": "name a DeepSpeed launcher (launch.launcher)",
    "report_to": "set by the engine", "resume_from_checkpoint": "the engine resumes from its own checkpoints",
}  # fmt: skip


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, description="LoRA rank r: the width of the low-rank update.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get an adapter, or 'all-linear' for every linear layer but the output head.",
    )
    layers_to_transform: Optional[list[int]] = Field(
        None, description="Only these layer indices get adapters (e.g. [20, 21, 22, 23] for the top four); null = every layer."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens] after adding tokens).",
    )


class QuantizationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type of the frozen base (QLoRA uses nf4).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit per weight).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for each matmul; auto = the training precision."
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="How to fine-tune: lora = a low-rank adapter on a frozen base; qlora = the same on a 4-bit (bitsandbytes nf4) base; full = every weight is trained.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings (methods lora and qlora).")
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings, description="4-bit base settings (method qlora).")
    max_steps: Optional[int] = Field(60, ge=0, description="Optimizer steps to train; null or 0 trains for num_epochs instead.")
    num_epochs: Optional[float] = Field(None, gt=0, description="Passes over the train split; used only when max_steps is null or 0.")
    learning_rate: Optional[float] = Field(
        None, gt=0, description="Peak learning rate; null = 2e-4 for lora and qlora, 2e-5 for full fine-tuning."
    )
    lr_scheduler: str = Field("cosine", description=f"Learning-rate schedule after warmup: one of {', '.join(SCHEDULERS)}.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: str = Field("adamw_torch", description="Optimizer name as transformers knows it (adamw_torch, adamw_torch_fused, paged_adamw_8bit, adafactor, ...).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    batch_size: int = Field(8, ge=1, description="Samples per optimizer step and forward pass, across all processes (each of N processes takes batch_size / N).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step (effective batch = batch_size x this).")
    max_length: int = Field(256, ge=8, description="Tokens per sample (prompt + line + EOS); longer samples are cut at the end.")
    packing: bool = Field(
        False, description="Pack several samples into each max_length row (no padding; attention stays within each sample)."
    )
    padding_free: bool = Field(
        False, description="Concatenate the batch into one row without padding (position ids keep samples apart); needs packing: true."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; auto = bf16 where the GPU or CPU (AMX / AVX512-BF16) supports it, else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch samples of similar length together (less padding, more tokens/s); false = plain random order."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~40 % slower on CPU.")
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel while training (transformers' attn_implementation); auto = transformers' default (sdpa). "
        "flash_attention_2 needs a CUDA GPU and the flash-attn package.",
    )
    save_steps: int = Field(20, ge=1, description="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (the oldest are deleted).")
    logging_steps: int = Field(5, ge=1, description="Log loss and learning rate every this many steps.")
    eval_steps: Optional[int] = Field(
        None, ge=1, description="Compute the loss on the held-out split every this many steps (and at the end); null = never."
    )
    seed: int = Field(0, description="Seed for the adapter's initialisation and the data order.")
    preference: PreferenceSettings = Field(
        default_factory=PreferenceSettings,
        description="Optional preference phase after SFT (TRL DPOTrainer): the character's real line preferred over another speaker's line in the same context.",
    )
    sft_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further TRL SFTConfig fields, passed through as given (e.g. {neftune_noise_alpha: 5, torch_compile: true}); "
        "checked against TRL's field names at validate time.",
    )

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            close = difflib.get_close_matches(value, SCHEDULERS, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else "."
            raise ValueError(f"unknown lr_scheduler '{value}'{hint} Available: {', '.join(SCHEDULERS)}")
        return value

    @field_validator("sft_args")
    @classmethod
    def _known_sft_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for name in value:
            if name in ENGINE_OWNED_SFT_ARGS:
                problems.append(f"'{name}' is not allowed here: {ENGINE_OWNED_SFT_ARGS[name]}")
            elif name not in SFT_CONFIG_FIELDS:
                close = difflib.get_close_matches(name, SFT_CONFIG_FIELDS, n=1)
                hint = f" — did you mean '{close[0]}'?" if close else " (see trl.SFTConfig for the fields it knows)"
                problems.append(f"'{name}' is not a field of TRL's SFTConfig{hint}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if not self.max_steps and self.num_epochs is None:
            raise ValueError("set max_steps (e.g. 60) or, with max_steps: 0, num_epochs (e.g. 1)")
        if self.padding_free and not self.packing:
            raise ValueError(
                "padding_free without packing cannot enforce max_length in TRL 1.16 (it refuses the combination); "
                "set packing: true as well (BFD packing is padding-free)"
            )
        return self

    def peak_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if self.method == "full" else 2e-4


# ---------------------------------------------------------------- helpers shared with export


def load_base_model(path: Path, dtype: Any, trust_remote_code: bool = False, **load_kwargs: Any) -> Any:
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
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **load_kwargs)


def attention_kwargs(setting: str) -> dict:
    """from_pretrained keyword arguments for train.attention; none for auto, which keeps transformers' default (sdpa).

    auto stays with the default: eager measured no faster on the 2-core AMX CPU (SmolLM2-135M LoRA, Falstaff's
    samples, 3 rounds of bench/train_throughput.py: sdpa 0.99x eager, 0.79 to 1.10) although one synthetic step of
    8 x 168 tokens ran 1.2x faster with eager, and at 512+ tokens sdpa is 1.2-1.8x faster.
    """
    return {} if setting == "auto" else {"attn_implementation": setting}


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

KEY_FILE = "recipe_train_key.json"  # written into every checkpoint: which train configuration wrote it
WEIGHT_FILES = (
    "adapter_model.safetensors", "adapter_model.bin",  # lora, qlora
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",  # full
)  # fmt: skip


def checkpoint_problem(folder: Path, key: Optional[str] = None) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete (and, given a key, ours)."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "unreadable trainer_state.json"
    has_weights = any((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in WEIGHT_FILES)
    if not has_weights and not any(folder.glob("global_step*")):  # DeepSpeed keeps its shards in global_stepN/
        return "no weights"
    if key is not None:
        try:
            recorded = json.loads((folder / KEY_FILE).read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return f"no readable {KEY_FILE} (the checkpoint was cut off before it was recorded)"
        if recorded != key:
            return f"written by another train configuration (key {str(recorded)[:12]}, this run {key[:12]})"
    return None


def find_resume_checkpoint(checkpoints: Path, console: Any, key: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint-N under `checkpoints` written with this train key.

    Broken ones are skipped with a warning; ones written by another configuration are deleted (with a warning)
    so that training starts fresh instead of continuing from stale weights.
    """
    if not checkpoints.is_dir():
        return None
    found = []
    for folder in checkpoints.iterdir():
        match = CHECKPOINT_RE.match(folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    for _step, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder, key)
        if problem is None:
            return folder
        if problem.startswith("written by another"):
            console.print(f"[yellow]warning: not resuming from {folder.name}: {problem}; deleting it, training starts fresh[/yellow]")
            shutil.rmtree(folder, ignore_errors=True)
        else:
            console.print(f"[yellow]warning: skipping {folder.name}: {problem} (incomplete or corrupt, probably cut off by a crash)[/yellow]")
    return None


def record_key_callback(key: str) -> Any:
    """A TrainerCallback that writes the train key into each checkpoint once the Trainer has saved it."""
    from transformers import TrainerCallback

    from engine.cache import write_json_atomic

    class RecordTrainKey(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_json_atomic(folder / KEY_FILE, {"key": key, "step": state.global_step})

    return RecordTrainKey()


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


def check_labels(trainer: Any, tokenizer: Any, max_length: int) -> dict:
    """The labels TRL built, checked before any step: every sample trains on some tokens, the EOS after each
    whole line is trained, and the collator keeps it (a pad == eos collator that masks pads would drop it)."""
    data = trainer.train_dataset
    eos = tokenizer.eos_token_id
    labels_column = data["labels"]
    empty = [i for i, labels in enumerate(labels_column) if all(t == -100 for t in labels)]
    if empty:
        raise StageError(
            "train",
            f"{len(empty)} training sample(s) have no trained token after tokenization and truncation (first: sample {empty[0]}); "
            f"raise train.max_length (now {max_length}) or lower dataset.context_turns",
        )
    eos_trained = sum(1 for labels in labels_column if eos in labels)
    if eos_trained == 0:
        raise StageError(
            "train",
            f"no sample trains the EOS token {tokenizer.eos_token!r}: the model would never learn where a line ends; "
            "raise train.max_length so that lines end inside it",
        )
    rows = [data[i] for i in range(min(8, len(data)))]
    expected = sum(list(row["labels"]).count(eos) for row in rows)
    batch = trainer.data_collator(rows)
    kept = int((batch["labels"] == eos).sum())
    if kept < expected:
        raise StageError(
            "train",
            f"the data collator masks the EOS token in the labels ({kept} of {expected} kept): with pad token == EOS token "
            "a collator that masks padding by token id drops the EOS too, so the model never learns to stop; "
            "give the tokenizer a distinct pad token",
        )
    return {"samples_with_eos_trained": eos_trained}


def show_loss_mask(trainer: Any, tokenizer: Any, console: Any, limit: int = 1500) -> None:
    """Print the first training sample with its loss mask: masked tokens dim, trained ones ⟦bold⟧."""
    from rich.markup import escape

    row = trainer.train_dataset[0]
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(row["input_ids"], row["labels"]):
        trained = label != -100
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(token)
        else:
            spans.append((trained, [token]))
    parts = []
    for trained, tokens in spans:
        text = tokenizer.decode(tokens)
        if not trained and len(text) > limit:
            text = "…" + text[-limit:]
        parts.append(f"[bold green]⟦{escape(text)}⟧[/bold green]" if trained else f"[dim]{escape(text)}[/dim]")
    trained_count = sum(len(tokens) for trained, tokens in spans if trained)
    console.print(
        f"first sample, {len(row['input_ids'])} tokens, {trained_count} trained (⟦…⟧; the rest is masked from the loss):",
        soft_wrap=True,
    )
    console.print("".join(parts), soft_wrap=True)


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot([s for s, _ in points], [l for _, l in points], marker="o", markersize=3, label="train")
    if evals:
        ax.plot([s for s, _ in evals], [l for _, l in evals], marker="s", markersize=4, label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_attention(model: Any) -> Optional[str]:
    """The attention kernel the trained model ran with (transformers' resolved attn_implementation)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def rounded(loss: Optional[float]) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------- one training process


def load_training_model(cfg: TrainConfig, base_path: Path, precision: str, trust_remote_code: bool) -> Any:
    """The model as the method wants it: frozen base in the compute dtype (lora), 4-bit nf4 base (qlora), or
    fp32 master weights (full; autocast does the bf16 / fp16 matmuls)."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    kernel = attention_kwargs(cfg.attention)
    if cfg.method == "full":
        return load_base_model(base_path, torch.float32, trust_remote_code, **kernel)
    if cfg.method == "lora":
        # LoRA: the frozen base is held in the compute dtype (as LLaMA-Factory does: half the memory traffic);
        # PEFT keeps the adapter weights in fp32 and autocast does the mixed-precision matmuls.
        return load_base_model(base_path, dtypes[precision], trust_remote_code, **kernel)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = precision if cfg.quantization.compute_dtype == "auto" else cfg.quantization.compute_dtype
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization.quant_type,
        bnb_4bit_use_double_quant=cfg.quantization.double_quant,
        bnb_4bit_compute_dtype=dtypes[compute],
    )
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        model = load_base_model(
            base_path, dtypes[compute], trust_remote_code, quantization_config=quantization, device_map={"": device}, **kernel
        )
    except ImportError as exc:
        raise StageError("train", f"method qlora needs bitsandbytes: {exc}; install the train extra (pip install -e '.[train]')") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def shared_trainer_args(cfg: "TrainConfig", spec: dict, precision: str, cuda: bool, world: int, is_main: bool) -> dict:
    """The TrainingArguments fields SFT and the preference phase set the same way (hardware, checkpoints, logs)."""
    return dict(
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        max_grad_norm=cfg.max_grad_norm,
        # the new name of gradient_checkpointing; TRL's configs default the old name to True, so a phase that
        # did not pass it would recompute activations whatever the recipe says (SFT: 1.58x slower, DESIGN.md)
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        use_cpu=not cuda,
        ddp_backend="gloo" if world > 1 and not cuda else None,
        deepspeed=spec.get("deepspeed"),
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        disable_tqdm=not sys.stderr.isatty() or not is_main,  # a log file gets one line per logging step instead of a bar
    )


def quiet_library_deprecations() -> None:
    """TRL and PEFT read `is_gradient_checkpointing`, which transformers 5 renamed: the user can do nothing about
    that deprecation, and the trainer repeats it every few steps."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def train_process(spec: dict, console: Any) -> dict:
    """Train in this process (alone, or as one rank of a launched group). Every rank calls it; rank 0 writes
    the reports. `spec` is plain JSON (train_worker.py reads it from a file): config, model_path, dataset,
    out, key, resume, deepspeed, launcher, recipe_name, trust_remote_code.

    With a preference phase, SFT writes `<out>/sft` (marked complete with the train key) and the phase writes
    the final adapter; a rerun after a crash in the phase skips the finished SFT."""
    cfg = TrainConfig.model_validate(spec["config"])
    quiet_library_deprecations()
    if cfg.preference.method == "none":
        return sft_phase(spec, console)
    from engine.preference import run_preference_phase

    out = Path(spec["out"])
    marker = out / "sft" / KEY_FILE
    try:
        finished = json.loads(marker.read_text()).get("key") == spec["key"]
    except (OSError, ValueError, AttributeError):
        finished = False
    if finished:
        console.print("SFT already finished in an earlier attempt (sft/ carries this train key): going on with the preference phase")
        sft_metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    else:
        shutil.rmtree(out / "sft", ignore_errors=True)
        sft_metrics = sft_phase(spec, console)
        if int(os.environ.get("RANK", "0")) == 0:
            from engine.cache import write_json_atomic

            write_json_atomic(marker, {"key": spec["key"]})
    return run_preference_phase(spec, cfg, sft_metrics, console)


def sft_phase(spec: dict, console: Any) -> dict:
    """Supervised fine-tuning with TRL's SFTTrainer; the result goes to adapter/ (or model/), or to sft/ when
    a preference phase follows."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # bitsandbytes (imported by PEFT) tries to fetch a CPU kernel from the Hub on import and logs a warning
    # when it cannot; the engine runs offline and falls back to bitsandbytes' own kernel
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer, Trainer
    from trl import SFTConfig, SFTTrainer

    cfg = TrainConfig.model_validate(spec["config"])
    out = Path(spec["out"])
    base_path = Path(spec["model_path"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    precision = resolve_precision(cfg.precision)
    cuda = torch.cuda.is_available()
    if precision == "bf16" and not cuda and not cpu_has_bf16() and is_main:
        console.print("[yellow]warning: this CPU has no native bf16 (AMX / AVX512-BF16): bf16 will be slower than fp32[/yellow]")
    if cfg.batch_size % world:
        raise StageError(
            "train", f"train.batch_size={cfg.batch_size} does not divide among {world} processes; use a multiple of {world}"
        )

    # keep_in_memory: TRL's map() calls would otherwise write cache files into the finished dataset stage folder
    data = load_from_disk(spec["dataset"], keep_in_memory=True)
    train = data["train"]
    if len(train) == 0:
        raise StageError("train", "the dataset's train split is empty; check the character name and dataset settings")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fit = check_completions_fit(train, tokenizer, cfg.max_length, console)
    # only the two text columns: TRL then sees a prompt-completion dataset and masks the prompt from the loss
    train = train.select_columns(["prompt", "completion"])
    heldout = None
    if cfg.eval_steps and "heldout" in data and len(data["heldout"]):
        heldout = data["heldout"].select_columns(["prompt", "completion"])
        lengths = tokenizer(list(heldout["prompt"]))["input_ids"]
        heldout = heldout.select([i for i, ids in enumerate(lengths) if len(ids) < cfg.max_length])

    model = load_training_model(cfg, base_path, precision, spec.get("trust_remote_code", False))
    peft_config = None
    if cfg.method in ("lora", "qlora"):
        peft_config = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            layers_to_transform=cfg.lora.layers_to_transform,
            modules_to_save=cfg.lora.modules_to_save or None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    per_device = cfg.batch_size // world
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        num_train_epochs=cfg.num_epochs if not cfg.max_steps else 1.0,
        learning_rate=cfg.peak_learning_rate(),
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        eval_strategy="steps" if heldout is not None else "no",
        eval_steps=cfg.eval_steps if heldout is not None else None,
        include_num_input_tokens_seen="non_padding",
        **shared_trainer_args(cfg, spec, precision, cuda, world, is_main),
        **cfg.sft_args,
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

    trainer = PlainLossSFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=heldout, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[record_key_callback(spec["key"])],
    )  # fmt: skip
    if cfg.method == "qlora" and precision != "bf16":
        # TRL stores QLoRA adapters in bf16 (the paper's choice); without bf16 compute that is slow (CPU) or breaks
        # the fp16 grad scaler (GPU): keep them in fp32, like the LoRA method does
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    guards = check_labels(trainer, tokenizer, cfg.max_length)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if is_main:
        show_loss_mask(trainer, tokenizer, console)
        what = "every weight" if cfg.method == "full" else (
            f"{'4-bit ' + cfg.quantization.quant_type + ' base, ' if cfg.method == 'qlora' else ''}LoRA r{cfg.lora.rank} on "
            f"{cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ','.join(cfg.lora.target_modules)}"
        )  # fmt: skip
        console.print(
            f"train ({cfg.method}): {len(train)} samples, {'%d steps' % cfg.max_steps if cfg.max_steps else '%g epochs' % cfg.num_epochs}, "
            f"batch {cfg.batch_size}x{cfg.gradient_accumulation_steps}"
            f"{f' ({world} processes x {per_device})' if world > 1 else ''}, max_length {cfg.max_length}, {precision}, "
            f"lr {cfg.peak_learning_rate():g}, {what}: {trainable:,} of {total:,} parameters trainable"
        )

    resume = spec.get("resume")
    if resume and is_main:
        console.print(f"[bold]resuming from {Path(resume).name}[/bold]")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started
    state = trainer.state
    session_tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    loop_seconds = float(result.metrics.get("train_runtime") or runtime)  # the Trainer's own clock: the training loop

    # every rank takes part in saving (DeepSpeed ZeRO-3 gathers the shards); only the main one writes files
    saved = out / ("sft" if cfg.preference.method != "none" else "model" if cfg.method == "full" else "adapter")
    trainer.save_model(str(saved))
    if not is_main:
        return {}
    tokenizer.save_pretrained(str(saved))

    history = state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    metrics = {
        "method": cfg.method,
        "steps": state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": result.metrics.get("train_loss"),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "samples_seen": state.global_step * cfg.batch_size * cfg.gradient_accumulation_steps,
        "tokens_seen": state.num_input_tokens_seen,
        "train_runtime_s": round(loop_seconds, 2),
        "train_wall_s": round(runtime, 2),  # with model wrapping and (DeepSpeed) engine set-up
        "tokens_per_s": round(session_tokens / loop_seconds, 1) if loop_seconds > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "precision": precision,
        "attention": model_attention(trainer.model),
        "device": "cuda" if cuda else "cpu",
        "processes": world,
        "launcher": spec.get("launcher", "none"),
        "deepspeed": Path(spec["deepspeed"]).name if spec.get("deepspeed") else None,
        "learning_rate": cfg.peak_learning_rate(),
        "trainable_params": trainable,
        "resumed_from": Path(resume).name if resume else None,
        **fit,
        **guards,
    }
    (out / "log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss(history, out / "loss.png", f"{spec.get('recipe_name', '')}: {cfg.method}, lr {cfg.peak_learning_rate():g}, {precision}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    eval_note = f", held-out loss {metrics['final_eval_loss']:.4f}" if metrics["final_eval_loss"] is not None else ""
    console.print(
        f"train: {metrics['steps']} steps, loss {rounded(metrics['first_loss'])} -> {rounded(metrics['final_loss'])}{eval_note}, "
        f"{metrics['tokens_per_s']} tokens/s, {metrics['train_runtime_s']} s, peak {metrics['peak_rss_mb']} MB"
    )
    return metrics


# ---------------------------------------------------------------- the stage


def launched_training(spec: dict, launch: Any, console: Any) -> dict:
    """Start the launcher's processes on `spec` and wait; they write metrics.json (or worker_error.txt)."""
    import subprocess

    from engine.launch import worker_command

    out = Path(spec["out"])
    spec_path = out / "train_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    (out / "worker_error.txt").unlink(missing_ok=True)
    command = worker_command(launch, spec_path)
    env = dict(os.environ)
    if launch.num_processes > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.num_processes))
    console.print(f"launching: {' '.join(command)}", soft_wrap=True, markup=False)
    completed = subprocess.run(command, env=env)
    error = out / "worker_error.txt"
    if error.is_file():
        raise StageError("train", error.read_text(encoding="utf-8").strip().removeprefix("stage train: "))
    if completed.returncode != 0 or not (out / "metrics.json").is_file():
        raise StageError(
            "train",
            f"the training processes failed (exit code {completed.returncode}); their output is above. "
            f"The command was: {' '.join(command)}",
        )
    return json.loads((out / "metrics.json").read_text())


def check_launcher_possible(launch: Any) -> None:
    """DeepSpeed where it cannot run here says so before any process starts, naming the launcher that works."""
    from engine.launch import deepspeed_config

    ds = deepspeed_config(launch)
    if ds is None:
        return
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    except Exception as exc:  # a missing package, a missing compiler, an accelerator it cannot use
        raise StageError(
            "train",
            f"DeepSpeed cannot run on this machine ({type(exc).__name__}: {exc}); use launch.launcher: accelerate "
            "(data-parallel over gloo on CPU, NCCL on GPUs) or train in one process (launcher: none)",
        ) from None
    if accelerator.device_name() == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        # on a CPU DeepSpeed builds its communication op (and, with offload, its CPU Adam) with the system compiler
        raise StageError(
            "train",
            f"DeepSpeed on a CPU compiles its ops with a C++ compiler and none is installed; install g++, or use "
            f"launch.launcher: accelerate (data-parallel over gloo) instead of {ds.name}",
        )


@register_stage(
    "train",
    config=TrainConfig,
    version="2",
    reads=("train", "model"),
    needs=("dataset",),
    libraries=("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"),
    external_inputs=lambda recipe: {"base_model": base_model_input(recipe.model)},
    resumable=True,  # the runner hands an interrupted run's folder back: checkpoints survive a crash
)
def run_train(ctx: StageContext) -> dict:
    """Fine-tuning (TRL SFTTrainer; LoRA, QLoRA or full) on the character's lines, resumable from checkpoints."""
    from engine.launch import LaunchConfig, deepspeed_config, is_in_process

    cfg: TrainConfig = ctx.config
    console = ctx.console
    launch = getattr(ctx.recipe, "launch", None) or LaunchConfig()
    base_path = resolve_base_model(ctx.recipe.model, console)  # converted once here, before any worker starts
    resume = find_resume_checkpoint(ctx.out / "checkpoints", console, ctx.key or None)
    ds = deepspeed_config(launch)
    spec = {
        "config": cfg.model_dump(mode="json"),
        "model_path": str(base_path),
        "trust_remote_code": bool(getattr(ctx.recipe.model, "trust_remote_code", False)),
        "dataset": str(ctx.upstream["dataset"] / "data"),
        "out": str(ctx.out),
        "key": ctx.key,
        "resume": str(resume) if resume else None,
        "deepspeed": str(ds) if ds else None,
        "launcher": launch.launcher if not launch.command else "command",
        "recipe_name": ctx.recipe.name,
    }
    if is_in_process(launch):
        metrics = train_process(spec, console)
    else:
        check_launcher_possible(launch)
        metrics = launched_training(spec, launch, console)
    preference = metrics.get("preference") or {}
    return {
        "method": metrics["method"],
        "steps": metrics["steps"],
        **({"preference": preference["method"], "preference_steps": preference["steps"], "preference_final_loss": preference["final_loss"],
            "preference_reward_accuracy": preference["reward_accuracy_last_quarter"]} if preference else {}),
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "final_eval_loss": metrics["final_eval_loss"],
        "tokens_per_s": metrics["tokens_per_s"],
        "runtime_s": metrics["train_runtime_s"],
        "precision": metrics["precision"],
        "processes": metrics["processes"],
        "trainable_params": metrics["trainable_params"],
    }
