"""The export stage on a tiny random model: the merged folder reloads with plain transformers and reproduces
base + adapter, its chat template carries the persona, generation stops at the learned EOS, bf16 export.

    python -m pytest -q tests/test_stage_export.py
"""

from __future__ import annotations

import io
import json
import os
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
from engine.stages.export import ExportConfig, run_export
from engine.stages.train import TrainConfig, load_base_model, run_train

TINY_MODEL = ModelConfig(random_init=True, config_overrides=dict(TINY_OVERRIDES))
CHARACTER = CharacterConfig(name="FALSTAFF", display_name="Sir John Falstaff")
LINES = [
    ("HAL", "Now, Hal, what time of day is it, lad?", "Indeed, you come near me now, Hal."),
    ("POINS", "Good morrow, sweet Hal.", "Marry, then, sweet wag, when thou art king."),
    ("HOSTESS", "O Jesu, my lord the prince!", "A plague of all cowards, I say."),
    ("PETO", "Give me a cup of sack, boy.", "I am a rogue if I drunk today."),
]


def make_recipe(export: ExportConfig, train: TrainConfig | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        name="tiny-falstaff",
        model=TINY_MODEL,
        train=train or TrainConfig(),
        character=CHARACTER,
        dataset=SimpleNamespace(template="tokenizer"),
        export=export,
    )


def console() -> Console:
    return Console(file=io.StringIO(), width=200, record=True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(TINY_MODEL))


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, tokenizer) -> Path:
    """A finished train stage folder: a few steps at a high learning rate, so the adapter really moves the model."""
    from datasets import Dataset, DatasetDict

    from engine.templates import render_prompt

    root = tmp_path_factory.mktemp("run")
    rows = {"scene": [], "prompt": [], "completion": [], "context": [], "turn_index": []}
    for i in range(16):
        speaker, text, reply = LINES[i % len(LINES)]
        rows["scene"].append(f"play/s{i % len(LINES)}")
        rows["prompt"].append(render_prompt("tokenizer", tokenizer, [{"role": "user", "content": f"{speaker}: {text}"}], CHARACTER))
        rows["completion"].append(reply)
        rows["context"].append([{"speaker": speaker, "text": text}])
        rows["turn_index"].append(1)
    data = Dataset.from_dict(rows)
    DatasetDict({"train": data, "heldout": data.select(range(2))}).save_to_disk(str(root / "dataset" / "data"))

    config = TrainConfig(max_steps=4, save_steps=2, batch_size=4, learning_rate=1e-2, max_length=128)
    out = root / "train"
    out.mkdir()
    ctx = StageContext(
        recipe=make_recipe(ExportConfig(), config), config=config, out=out, run_dir=root,
        upstream={"dataset": root / "dataset"}, inputs={}, console=console(),
    )  # fmt: skip
    run_train(ctx)
    return out


def export_ctx(tmp_path: Path, train_dir: Path, config: ExportConfig) -> StageContext:
    out = tmp_path / "export"
    out.mkdir()
    return StageContext(
        recipe=make_recipe(config), config=config, out=out, run_dir=tmp_path, upstream={"train": train_dir}, inputs={}, console=console()
    )


def logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def test_config():
    assert ExportConfig().dtype == "auto"
    with pytest.raises(ValidationError):
        ExportConfig(dtype="int8")
    with pytest.raises(ValidationError):
        ExportConfig(dtyp="bf16")
    assert all(field.description for field in ExportConfig.model_fields.values())
    stage = STAGES["export"]
    assert stage.needs == ("train",) and stage.reads == ("export", "model", "character", "dataset")


def test_export_merges_and_reloads(tmp_path, train_dir, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.templates import render_prompt

    summary = run_export(export_ctx(tmp_path, train_dir, ExportConfig()))
    model_dir = tmp_path / "export" / "model"
    assert summary["dtype"] == "fp32"  # auto: the base's dtype
    assert summary["logits_max_diff"] < 1e-3 and summary["merge_logits_max_diff"] < 1e-3
    assert summary["size_mb"] > 1
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())

    # plain transformers, nothing from this project: the same logits as base + adapter
    exported = AutoModelForCausalLM.from_pretrained(model_dir)
    exported.eval()
    assert exported.dtype == torch.float32
    messages = [{"role": "user", "content": "HAL: Good morrow, Jack."}]
    prompt = render_prompt("tokenizer", tokenizer, messages, CHARACTER)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    base = load_base_model(resolve_base_model(TINY_MODEL), torch.float32)
    base_logits = logits(base, inputs)
    tuned = PeftModel.from_pretrained(base, str(train_dir / "adapter")).eval()
    expected = logits(tuned, inputs)
    got = logits(exported, inputs)
    assert (got - expected).abs().max().item() < 1e-3
    assert (got - base_logits).abs().max().item() > 1e-3  # the adapter did change the model

    # the persona is baked into the exported chat template: no system message needed, same prompt as in training
    exported_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = exported_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == prompt
    assert CHARACTER.system in rendered and "Sir John Falstaff" in rendered and "SmolLM" not in rendered
    assert exported_tokenizer.chat_template != tokenizer.chat_template

    # generation ends at the token TRL appended to every line
    generation = json.loads((model_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.eos_token_id == (eos if isinstance(eos, int) else eos[0])
    assert generation["pad_token_id"] is not None
    out = exported.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_export_bf16(tmp_path, train_dir):
    import torch
    from transformers import AutoModelForCausalLM

    summary = run_export(export_ctx(tmp_path, train_dir, ExportConfig(dtype="bf16")))
    model_dir = tmp_path / "export" / "model"
    assert summary["dtype"] == "bf16" and summary["logits_max_diff"] < 1e-3
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    params = sum(p.numel() for p in reloaded.parameters())
    assert (model_dir / "model.safetensors").stat().st_size < params * 2 + 100_000  # two bytes a weight


def test_export_without_adapter_is_an_error(tmp_path):
    empty = tmp_path / "train"
    empty.mkdir()
    with pytest.raises(StageError, match="no LoRA adapter"):
        run_export(export_ctx(tmp_path, empty, ExportConfig()))
