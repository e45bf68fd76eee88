"""The export stage on a tiny random model: the merged folder reloads with plain transformers and reproduces
base + adapter, its chat template carries the persona and renders training text exactly, generation stops at
the learned EOS; the adapter alone loads with PEFT; model cards and the Ollama Modelfile; bf16; method full.

    python -m pytest -q tests/test_stage_export.py
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


DATASET_SUMMARY = {"train": 16, "heldout": 2, "train_scenes": 4, "heldout_scenes": 2, "tokens_mean": 40.5, "max_length": 128}


def make_recipe(export: ExportConfig, train: Any = None) -> SimpleNamespace:
    return SimpleNamespace(
        name="tiny-falstaff",
        description="Falstaff's lines, for the tests.",
        model=TINY_MODEL,
        train=train or TrainConfig(),
        character=CHARACTER,
        dataset=SimpleNamespace(template="tokenizer"),
        export=export,
        eval=SimpleNamespace(repetition_penalty=1.3),
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
    (root / "dataset" / ".stage.json").write_text(json.dumps({"key": "test", "summary": DATASET_SUMMARY}))

    config = TrainConfig(max_steps=4, save_steps=2, batch_size=4, learning_rate=1e-2, max_length=128)
    out = root / "train"
    out.mkdir()
    ctx = StageContext(
        recipe=make_recipe(ExportConfig(), config), config=config, out=out, run_dir=root,
        upstream={"dataset": root / "dataset"}, inputs={}, console=console(),
    )  # fmt: skip
    run_train(ctx)
    return out


def export_ctx(tmp_path: Path, train_dir: Path, config: ExportConfig, train: Any = None) -> StageContext:
    out = tmp_path / "export"
    out.mkdir()
    upstream = {"dataset": train_dir.parent / "dataset", "train": train_dir}
    return StageContext(
        recipe=make_recipe(config, train), config=config, out=out, run_dir=tmp_path, upstream=upstream, inputs={}, console=console()
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, train_dir) -> SimpleNamespace:
    """One export with the default settings and a data licence, shared by the tests that read its folder."""
    root = tmp_path_factory.mktemp("exported")
    ctx = export_ctx(root, train_dir, ExportConfig(data_license="CC BY-SA 3.0 (test data)"))
    summary = run_export(ctx)
    return SimpleNamespace(summary=summary, model=ctx.out / "model", adapter=ctx.out / "adapter", log=ctx.console.export_text())


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
    assert ExportConfig().data_license is None and ExportConfig(data_license="MIT").data_license == "MIT"
    stage = STAGES["export"]
    assert stage.needs == ("dataset", "train") and stage.version == "2"
    assert {"export", "model", "character", "dataset", "name", "description"} <= set(stage.reads) and "eval" not in stage.reads  # an eval change never reruns export


def test_export_merges_and_reloads(exported, train_dir, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.templates import render_prompt

    summary = exported.summary
    model_dir = exported.model
    assert summary["dtype"] == "fp32" and summary["method"] == "lora"  # auto: the base's dtype
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


def test_adapter_alone_loads_with_peft(exported):
    """adapter/ is what PEFT and text-generation-webui load: on a fresh base it gives the merged model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert exported.summary["adapter"] is True
    assert (exported.adapter / "adapter_config.json").is_file() and (exported.adapter / "adapter_model.safetensors").is_file()
    adapter_tokenizer = AutoTokenizer.from_pretrained(exported.adapter)
    assert adapter_tokenizer.chat_template == AutoTokenizer.from_pretrained(exported.model).chat_template  # the persona template
    inputs = adapter_tokenizer(
        adapter_tokenizer.apply_chat_template([{"role": "user", "content": "HAL: Jack!"}], add_generation_prompt=True, tokenize=False),
        return_tensors="pt",
        add_special_tokens=False,
    )
    base = load_base_model(resolve_base_model(TINY_MODEL), torch.float32)
    tuned = PeftModel.from_pretrained(base, str(exported.adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(exported.model).eval()
    assert (logits(tuned, inputs) - logits(merged, inputs)).abs().max().item() < 1e-3


def front_matter(path: Path) -> dict:
    import yaml

    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_cards(exported):
    """model/README.md and adapter/README.md: Hub front matter, persona, data counts, training numbers, licence."""
    card = (exported.model / "README.md").read_text(encoding="utf-8")
    meta = front_matter(exported.model / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # random weights: no claim to be a fine-tune of the Hub model
    assert CHARACTER.system in card and "Sir John Falstaff" in card and "Falstaff's lines, for the tests." in card
    assert "| training samples (one character line each, with its context) | 16 |" in card  # the dataset stage's summary
    assert "| optimizer steps | 4 |" in card and "| method | lora |" in card
    assert "Training data: CC BY-SA 3.0 (test data)" in card
    assert "File: `None`" not in card and "recipe run <recipe.yaml>" in card
    assert "ollama create tiny-falstaff -f Modelfile" in card and card.rstrip().endswith("`runs/<name>/eval/MODEL_CARD.md`.")
    adapter_meta = front_matter(exported.adapter / "README.md")
    assert adapter_meta["library_name"] == "peft" and "lora" in adapter_meta["tags"]
    assert "PeftModel.from_pretrained" in (exported.adapter / "README.md").read_text(encoding="utf-8")


def test_modelfile(exported):
    """model/Modelfile: FROM the folder, a TEMPLATE (its exact rendering is tests/test_ollama.py's job), the persona
    as SYSTEM, a stop at the learned EOS, the eval's repetition penalty."""
    text = (exported.model / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ." in lines and 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER repeat_penalty 1.3" in lines
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text and f'SYSTEM "{CHARACTER.system}"' in lines
    assert "PARAMETER temperature 0.7" in lines and "PARAMETER num_ctx 4096" in lines
    assert exported.summary["ollama_template"] is True and exported.summary["ollama_stops"] == ["<|im_end|>"]
    assert "warning" not in exported.log


def training_and_exported_text(tokenizer, exported_tokenizer, template: str) -> tuple[str, str]:
    """One scene through both paths: TRL's training text (prompt + line + EOS) and the exported chat template's
    rendering of the same finished conversation."""
    from engine.templates import context_to_messages, render_prompt

    context = [
        {"speaker": "HAL", "text": "Now, Hal, what time of day is it, lad?"},
        {"speaker": "FALSTAFF", "text": "Indeed, you come near me now, Hal."},
        {"speaker": "POINS", "text": "Good morrow, sweet Hal."},
        {"speaker": "HAL", "text": "What says Monsieur Remorse?"},
    ]
    messages = context_to_messages(context, CHARACTER.name)
    line = "Marry, then, sweet wag, when thou art king."
    training = render_prompt(template, tokenizer, messages, CHARACTER) + line + tokenizer.eos_token
    rendered = exported_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": line}], tokenize=False)
    return training, rendered


@pytest.mark.parametrize("template", ["tokenizer", "characterllm_meta", "southpark_alpaca"])
def test_training_text_is_the_exported_rendering(exported, tokenizer, tmp_path, template):
    """What TRL trained on (render_prompt + line + EOS) is what the exported tokenizer renders for the same chat.

    Required precisely: the exported rendering starts with the training text, and what follows it is only
    whitespace the template writes after the EOS (ChatML's "\\n" after <|im_end|>; nothing for the file
    templates), i.e. nothing the model should have learned to generate.
    The tokenizer template is checked on the exported folder itself; the file templates on a tokenizer saved
    and reloaded with the chat template the export stage writes.
    """
    from transformers import AutoTokenizer

    from engine.templates import available_templates, export_chat_template

    assert template in available_templates()
    if template == "tokenizer":
        exported_tokenizer = AutoTokenizer.from_pretrained(exported.model)
    else:
        saved = AutoTokenizer.from_pretrained(resolve_base_model(TINY_MODEL))
        saved.chat_template = export_chat_template(template, saved, CHARACTER)
        saved.save_pretrained(str(tmp_path / "tok"))
        exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    training, rendered = training_and_exported_text(tokenizer, exported_tokenizer, template)
    assert rendered.startswith(training), f"training text and exported rendering differ:\n{training!r}\n{rendered!r}"
    tail = rendered[len(training) :]
    assert tail == ("\n" if template == "tokenizer" else "")


def test_export_full_fine_tune(tmp_path, tokenizer):
    """train.method full: the train stage's model/ is exported as it is (no merge, no adapter/), same checks."""
    import torch
    from transformers import AutoModelForCausalLM

    train = tmp_path / "run" / "train"
    (tmp_path / "run" / "dataset").mkdir(parents=True)
    model = load_base_model(resolve_base_model(TINY_MODEL), torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # "trained": differs from the base
    model.save_pretrained(str(train / "model"))
    tokenizer.save_pretrained(str(train / "model"))
    (train / "metrics.json").write_text(json.dumps({"steps": 3, "first_loss": 2.0, "final_loss": 1.0, "method": "full"}))

    ctx = export_ctx(tmp_path, train, ExportConfig(), train=SimpleNamespace(method="full"))
    summary = run_export(ctx)
    out = tmp_path / "export"
    assert summary["method"] == "full" and summary["adapter"] is False and summary["merge_logits_max_diff"] is None
    assert not (out / "adapter").exists() and summary["logits_max_diff"] < 1e-3
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    inputs = tokenizer("Good morrow", return_tensors="pt")
    assert (logits(exported, inputs) - logits(model, inputs)).abs().max().item() < 1e-3
    meta = front_matter(out / "model" / "README.md")
    assert "full-fine-tune" in meta["tags"]
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert "| method | full |" in card and "../adapter" not in card and (out / "model" / "Modelfile").is_file()


def test_full_fine_tune_without_model_is_an_error(tmp_path):
    empty = tmp_path / "train"
    empty.mkdir()
    with pytest.raises(StageError, match=r"no fine-tuned model in .*/train/model \(train.method full\)"):
        run_export(export_ctx(tmp_path, empty, ExportConfig(), train=SimpleNamespace(method="full")))
