"""The train stage on a tiny random model: it learns, writes its reports, resumes after a SIGKILL (skipping a
corrupt checkpoint), and refuses samples whose line would be truncated away.

    python -m pytest -q tests/test_stage_train.py
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from pydantic import ValidationError
from rich.console import Console

from engine.errors import StageError
from engine.models import TINY_OVERRIDES, ModelConfig, resolve_base_model
from engine.persona import CharacterConfig
from engine.registry import STAGES, StageContext
from engine.stages.export import ExportConfig
from engine.stages.train import TrainConfig, attention_kwargs, find_resume_checkpoint, resolve_precision, run_train

TESTS = Path(__file__).resolve().parent
TINY_MODEL = ModelConfig(random_init=True, config_overrides=dict(TINY_OVERRIDES))
# The same tiny model with larger random weights: with the default 0.02 the frozen (tied) embeddings bound every
# logit near zero, so no adapter can move the loss far from ln(vocab); 0.2 lets 16 steps show real learning.
LEARNABLE_MODEL = ModelConfig(random_init=True, config_overrides={**TINY_OVERRIDES, "initializer_range": 0.2})
CHARACTER = CharacterConfig(name="FALSTAFF")
TRAIN_KEY = "k" * 64  # the cache key the runner would hand over; recorded in every checkpoint
EXCHANGES = [
    ("HAL", "Now, Hal, what time of day is it, lad?", "Indeed, you come near me now, Hal."),
    ("POINS", "Good morrow, sweet Hal.", "Marry, then, sweet wag, when thou art king."),
    ("HOSTESS", "O Jesu, my lord the prince!", "A plague of all cowards, I say."),
    ("PETO", "Give me a cup of sack, boy.", "I am a rogue if I drunk today."),
    ("HOTSPUR", "My liege, I did deny no prisoners.", "Honour pricks me on."),
    ("BARDOLPH", "Why, Sir John, my face does you no harm.", "No, I'll be sworn; I make as good use of it."),
]


def build_dataset(folder: Path, tokenizer, rows: int = 24, long_prompt_at: int | None = None) -> Path:
    """A fake upstream dataset stage folder: <folder>/data, a DatasetDict with splits train and heldout."""
    from datasets import Dataset, DatasetDict

    from engine.templates import render_prompt

    def split(count: int, offset: int, long_at: int | None) -> Dataset:
        records = {"scene": [], "prompt": [], "completion": [], "context": [], "turn_index": []}
        for i in range(count):
            speaker, text, reply = EXCHANGES[(i + offset) % len(EXCHANGES)]
            if i == long_at:
                text = " ".join([text] * 40)
            context = [{"speaker": speaker, "text": text}]
            messages = [{"role": "user", "content": f"{speaker}: {text}"}]
            records["scene"].append(f"play/s{(i + offset) % len(EXCHANGES)}")
            records["prompt"].append(render_prompt("tokenizer", tokenizer, messages, CHARACTER))
            records["completion"].append(reply)
            records["context"].append(context)
            records["turn_index"].append(1)
        return Dataset.from_dict(records)

    data = DatasetDict({"train": split(rows, 0, long_prompt_at), "heldout": split(4, 3, None)})
    data.save_to_disk(str(folder / "data"))
    return folder


def make_ctx(out: Path, dataset_dir: Path, config: TrainConfig, console, model: ModelConfig = TINY_MODEL) -> StageContext:
    recipe = SimpleNamespace(
        name="tiny-falstaff",
        model=model,
        train=config,
        character=CHARACTER,
        dataset=SimpleNamespace(template="tokenizer"),
        export=ExportConfig(),
    )
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        recipe=recipe, config=config, out=out, run_dir=out.parent, upstream={"dataset": dataset_dir}, inputs={}, console=console,
        key=TRAIN_KEY,
    )


def recording_console() -> Console:
    return Console(file=io.StringIO(), width=200, record=True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(TINY_MODEL))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tokenizer) -> Path:
    return build_dataset(tmp_path_factory.mktemp("dataset"), tokenizer)


# ---------------------------------------------------------------- config


def test_config_defaults_and_errors():
    cfg = TrainConfig()
    assert (cfg.method, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == ("lora", 16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.max_steps, cfg.batch_size, cfg.max_length, cfg.precision, cfg.gradient_checkpointing) == (60, 8, 256, "auto", False)
    assert TrainConfig(lora={"target_modules": "all-linear"}).lora.target_modules == "all-linear"
    assert TrainConfig(max_steps=None, num_epochs=2).num_epochs == 2
    with pytest.raises(ValidationError, match="lora.rnak"):
        TrainConfig(lora={"rnak": 8})
    with pytest.raises(ValidationError, match="did you mean 'cosine'"):
        TrainConfig(lr_scheduler="cosin")
    with pytest.raises(ValidationError, match="num_epochs"):
        TrainConfig(max_steps=0)
    for field in TrainConfig.model_fields.values():
        assert field.description
    assert TrainConfig().peak_learning_rate() == 2e-4 and TrainConfig(method="full").peak_learning_rate() == 2e-5
    assert TrainConfig(method="qlora", learning_rate=1e-4).peak_learning_rate() == 1e-4
    with pytest.raises(ValidationError, match="method"):
        TrainConfig(method="dora")
    assert TrainConfig(lora={"layers_to_transform": [0, 1], "modules_to_save": ["lm_head"]}).lora.layers_to_transform == [0, 1]
    stage = STAGES["train"]
    assert stage.needs == ("dataset",) and stage.reads == ("train", "model")


def test_precision():
    import torch

    from engine.hardware import cpu_has_bf16

    expected = ("bf16" if torch.cuda.is_bf16_supported() else "fp32") if torch.cuda.is_available() else ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="fp16 needs a CUDA GPU"):
            resolve_precision("fp16")


def test_attention_kernel_choice():
    assert TrainConfig().attention == "auto"
    assert attention_kwargs("auto") == {}  # transformers' default (sdpa): eager measured no faster here
    assert attention_kwargs("eager") == {"attn_implementation": "eager"}
    assert attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}
    with pytest.raises(ValidationError, match="attention"):
        TrainConfig(attention="flash")


# ---------------------------------------------------------------- training


def test_train_learns_and_reports(tmp_path, dataset_dir):
    cfg = TrainConfig(
        max_steps=16, save_steps=5, batch_size=4, learning_rate=1e-2, lr_scheduler="constant", logging_steps=1,
        lora={"target_modules": "all-linear"}, max_length=128,
    )  # fmt: skip
    console = recording_console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_train(make_ctx(tmp_path / "train", dataset_dir, cfg, console, LEARNABLE_MODEL))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # the libraries' own deprecation

    out = tmp_path / "train"
    assert summary["steps"] == 16 and summary["precision"] in ("fp32", "bf16")
    assert summary["trainable_params"] > 0 and summary["tokens_per_s"] > 0
    history = json.loads((out / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 16
    assert summary["first_loss"] == losses[0] and summary["final_loss"] == losses[-1]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses  # a repeated tiny dataset at a high lr is learned

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("first_loss", "final_loss", "steps", "samples_seen", "train_runtime_s", "tokens_per_s", "peak_rss_mb", "precision"):
        assert metrics[key] is not None, key
    assert metrics["samples_seen"] == 16 * 4 and metrics["peak_rss_mb"] > 50 and metrics["resumed_from"] is None
    assert metrics["attention"] == "sdpa"  # auto: transformers' default
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "tokenizer_config.json").is_file()
    assert not (out / "checkpoints").exists()
    assert not list(dataset_dir.rglob("cache-*.arrow")), "the upstream dataset folder must not be written to"
    assert f"16 steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}," in console.export_text()


def test_the_libraries_own_deprecation_is_not_repeated_at_the_user():
    """TRL and PEFT read `is_gradient_checkpointing`, which transformers deprecated: train_process silences that
    one warning (the user can do nothing about it); every other warning still shows."""
    from engine.stages.train import load_base_model, quiet_library_deprecations

    model = load_base_model(resolve_base_model(TINY_MODEL), None)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        model.is_gradient_checkpointing
    assert [str(w.message) for w in before if "is_gradient_checkpointing" in str(w.message)], "transformers no longer warns: drop the filter"
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        quiet_library_deprecations()
        model.is_gradient_checkpointing
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in after] == ["something else is deprecated"]


def test_completion_only_loss_covers_line_and_eos(tmp_path, tokenizer):
    """The labels TRL builds from our columns: the line and the EOS, nothing of the prompt."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from engine.stages.train import load_base_model

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "HAL: Hello"}], add_generation_prompt=True, tokenize=False)
    data = Dataset.from_dict({"prompt": [prompt], "completion": ["Honour pricks me on."]})
    model = load_base_model(resolve_base_model(TINY_MODEL), None)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=64, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    labelled = [token for token in row["labels"] if token != -100]
    assert tokenizer.decode(labelled) == "Honour pricks me on." + tokenizer.eos_token


def test_prompt_longer_than_max_length_is_refused(tmp_path, tokenizer):
    dataset = build_dataset(tmp_path / "dataset", tokenizer, rows=6, long_prompt_at=3)
    cfg = TrainConfig(max_steps=2, batch_size=2, max_length=96)
    with pytest.raises(StageError, match=r"sample 3 .*max_length=96.*raise train\.max_length.*dataset\.context_turns"):
        run_train(make_ctx(tmp_path / "train", dataset, cfg, recording_console()))
    assert not (tmp_path / "train" / "checkpoints").exists()  # refused before any training


# ---------------------------------------------------------------- resuming

RESUME_CFG = dict(max_steps=12, save_steps=2, save_total_limit=2, batch_size=4, learning_rate=1e-3, logging_steps=1, max_length=128)

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import transformers
step = transformers.Trainer.training_step
def slow_step(self, *args, **kwargs):  # slow enough to be killed mid-run
    time.sleep(0.3)
    return step(self, *args, **kwargs)
transformers.Trainer.training_step = slow_step
from pathlib import Path
from rich.console import Console
import test_stage_train as t
from engine.stages.train import TrainConfig, run_train
run_train(t.make_ctx(Path({out!r}), Path({dataset!r}), TrainConfig(**t.RESUME_CFG), Console(quiet=True)))
"""


def test_find_resume_checkpoint_skips_broken_ones(tmp_path):
    def checkpoint(step: int, state: bool = True, weights: bool = True) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if weights:
            (folder / "adapter_model.safetensors").write_bytes(b"weights")

    checkpoint(2)
    checkpoint(9)
    checkpoint(10, weights=False)
    checkpoint(12, state=False)
    (tmp_path / "checkpoint-14").write_text("not a folder")
    (tmp_path / "checkpoint-x").mkdir()
    console = recording_console()
    assert find_resume_checkpoint(tmp_path, console) == tmp_path / "checkpoint-9"
    text = console.export_text()
    assert "skipping checkpoint-12: no trainer_state.json" in text and "skipping checkpoint-10: no weights" in text
    assert find_resume_checkpoint(tmp_path / "missing", console) is None


def test_resume_after_sigkill(tmp_path, dataset_dir):
    out = tmp_path / "train"
    checkpoints = out / "checkpoints"
    script = CHILD.format(tests=str(TESTS), out=str(out), dataset=str(dataset_dir))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (checkpoints / "checkpoint-4" / "trainer_state.json").is_file():
            assert child.poll() is None, f"training ended before it could be killed:\n{child.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-4 within 240 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()

    # the newest complete checkpoint is damaged: the run must fall back to the one before it
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert len(steps) >= 2, steps
    (checkpoints / f"checkpoint-{steps[-1]}" / "trainer_state.json").unlink()

    console = recording_console()
    summary = run_train(make_ctx(out, dataset_dir, TrainConfig(**RESUME_CFG), console))
    text = console.export_text()
    assert f"skipping checkpoint-{steps[-1]}: no trainer_state.json" in text
    assert f"resuming from checkpoint-{steps[-2]}" in text
    assert summary["steps"] == 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == f"checkpoint-{steps[-2]}" and metrics["steps"] == 12
    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 13))  # the history before the kill was kept
    assert not checkpoints.exists()

    # the same data order, dropout and optimizer state as a run that was never interrupted
    reference = run_train(make_ctx(tmp_path / "reference", dataset_dir, TrainConfig(**RESUME_CFG), recording_console()))
    reference_history = json.loads((tmp_path / "reference" / "log_history.json").read_text())
    resumed_losses = [e["loss"] for e in history if "loss" in e]
    assert resumed_losses == pytest.approx([e["loss"] for e in reference_history if "loss" in e], abs=1e-4)
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)


def test_resume_never_uses_a_checkpoint_of_another_train_key(tmp_path):
    from engine.stages.train import KEY_FILE

    def checkpoint(step: int, key: str | None) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if key is not None:
            (folder / KEY_FILE).write_text(json.dumps({"key": key, "step": step}))

    checkpoint(4, TRAIN_KEY)
    checkpoint(6, None)  # cut off between the Trainer's save and the key record
    checkpoint(8, "x" * 64)  # written by another configuration
    console = recording_console()
    assert find_resume_checkpoint(tmp_path, console, TRAIN_KEY) == tmp_path / "checkpoint-4"
    text = console.export_text()
    assert "not resuming from checkpoint-8: written by another train configuration (key xxxxxxxxxxxx, this run kkkkkkkkkkkk)" in text
    assert "deleting it, training starts fresh" in text and not (tmp_path / "checkpoint-8").exists()
    assert f"skipping checkpoint-6: no readable {KEY_FILE}" in text
    # only stale ones: nothing to resume from, and nothing stale left for the Trainer's rotation to trip over
    assert find_resume_checkpoint(tmp_path, recording_console(), "y" * 64) is None
    assert not (tmp_path / "checkpoint-4").exists()


def test_sft_args_are_checked_against_trl_fields():
    import dataclasses

    from trl import SFTConfig

    from engine.trl_fields import SFT_CONFIG_FIELDS

    real = [field.name for field in dataclasses.fields(SFTConfig)]
    assert sorted(SFT_CONFIG_FIELDS) == sorted(real), (
        f"engine/trl_fields.py is stale for this TRL: add {sorted(set(real) - set(SFT_CONFIG_FIELDS))}, "
        f"remove {sorted(set(SFT_CONFIG_FIELDS) - set(real))}"
    )
    assert TrainConfig(sft_args={"neftune_noise_alpha": 5}).sft_args == {"neftune_noise_alpha": 5}
    with pytest.raises(ValidationError, match=r"'neftune_noise' is not a field of TRL's SFTConfig — did you mean 'neftune_noise_alpha'\?"):
        TrainConfig(sft_args={"neftune_noise": 5})
    with pytest.raises(ValidationError, match=r"'learning_rate' is not allowed here: set train.learning_rate"):
        TrainConfig(sft_args={"learning_rate": 1.0})


def test_guards_show_the_loss_mask_and_catch_a_collator_that_drops_eos(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from engine.stages.train import check_labels, load_base_model, show_loss_mask

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "HAL: Hello"}], add_generation_prompt=True, tokenize=False)
    data = Dataset.from_dict({"prompt": [prompt] * 3, "completion": ["Honour pricks me on.", "Banish plump Jack.", "I am not only witty."]})
    model = load_base_model(resolve_base_model(TINY_MODEL), None)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=64, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert check_labels(trainer, tokenizer, 64) == {"samples_with_eos_trained": 3}

    console = recording_console()
    show_loss_mask(trainer, tokenizer, console)
    text = console.export_text()
    assert f"⟦Honour pricks me on.{tokenizer.eos_token}⟧" in text and "HAL: Hello" in text.split("⟦Honour")[0]

    # a collator that masks padding by token id, with pad == eos: the EOS labels vanish
    collate = trainer.data_collator

    def pad_masking_collator(rows):
        batch = collate(rows)
        batch["labels"][batch["labels"] == tokenizer.eos_token_id] = -100
        return batch

    trainer.data_collator = pad_masking_collator
    with pytest.raises(StageError, match=r"masks the EOS token in the labels \(0 of 3 kept\).*distinct pad token"):
        check_labels(trainer, tokenizer, 64)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_qlora_and_full_methods_train_on_cpu(tmp_path, dataset_dir, method):
    cfg = TrainConfig(method=method, max_steps=3, save_steps=2, batch_size=4, logging_steps=1, max_length=128, eval_steps=2, attention="eager")
    console = recording_console()
    summary = run_train(make_ctx(tmp_path / "train", dataset_dir, cfg, console))
    out = tmp_path / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == method and metrics["final_eval_loss"] is not None
    assert metrics["learning_rate"] == (2e-5 if method == "full" else 2e-4)
    assert metrics["attention"] == "eager"  # the recipe's kernel reaches every method's loader
    if method == "full":
        assert (out / "model" / "model.safetensors").is_file() and not (out / "adapter").exists()
        assert metrics["trainable_params"] > 3_000_000  # every weight of the tiny model
        assert "every weight" in console.export_text()
    else:
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model").exists()
        assert "4-bit nf4 base" in console.export_text()
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 16


def test_packing_trains_padding_free(tmp_path, dataset_dir):
    with pytest.raises(ValidationError, match="padding_free without packing.*set packing: true"):
        TrainConfig(padding_free=True)
    cfg = TrainConfig(max_steps=2, save_steps=5, batch_size=4, logging_steps=1, max_length=128, packing=True, padding_free=True)
    summary = run_train(make_ctx(tmp_path / "train", dataset_dir, cfg, recording_console()))
    assert summary["steps"] == 2 and summary["tokens_per_s"] > 0
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["attention"] == "sdpa"
    assert (tmp_path / "train" / "adapter" / "adapter_model.safetensors").is_file()
