"""export stage: one self-contained model folder that plain transformers (and `transformers serve`) can load.

The LoRA adapter from the train stage is merged into the base weights (PEFT merge_and_unload), saved as
safetensors in the chosen dtype, with the tokenizer alongside. The tokenizer's chat template has the persona
baked in (engine.templates.export_chat_template), so a chat with no system message still talks to the
character, and the generation config stops at the EOS the model learned to emit after each line.

    model/    config.json, generation_config.json, model.safetensors, tokenizer files, chat_template.jinja

The folder is reloaded with `AutoModelForCausalLM.from_pretrained` and its logits on a short chat are compared
with the merged model in memory before the stage counts as done.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import StageError
from engine.models import base_model_input, resolve_base_model
from engine.registry import StageContext, register_stage

MAX_RELOAD_DIFF = 1e-3
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Weight dtype of the exported model; auto = the base model's dtype."
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


@register_stage(
    "export",
    config=ExportConfig,
    version="1",
    reads=("export", "model", "character", "dataset"),
    needs=("train",),
    libraries=("torch", "transformers", "peft"),
    external_inputs=lambda recipe: {"base_model": base_model_input(recipe.model)},
)
def run_export(ctx: StageContext) -> dict:
    """Merge the adapter into the base and save a standalone model with the persona chat template."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.stages.train import load_base_model
    from engine.templates import export_chat_template

    cfg: ExportConfig = ctx.config
    recipe = ctx.recipe
    console = ctx.console
    adapter = ctx.upstream["train"] / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise StageError("export", f"no LoRA adapter in {adapter}; rerun the train stage (`recipe run --force train`)")
    base_path = resolve_base_model(recipe.model, console)

    # merge in fp32 whatever the export dtype, then cast once
    base = load_base_model(base_path, torch.float32, recipe.model.trust_remote_code)
    dtype_name = base_dtype_name(base.config) if cfg.dtype == "auto" else cfg.dtype
    dtype = getattr(torch, DTYPES[dtype_name])
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base_path)
    try:
        tokenizer.chat_template = export_chat_template(recipe.dataset.template, tokenizer, recipe.character)
    except ValueError as exc:  # an unknown template name or a tokenizer without a template
        raise StageError("export", str(exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = probe_inputs(tokenizer)

    tuned = PeftModel.from_pretrained(base, str(adapter))
    tuned.eval()
    adapter_logits = logits_of(tuned, inputs)
    merged = tuned.merge_and_unload()
    merged.eval()
    merged_logits = logits_of(merged, inputs)
    merge_diff = (merged_logits - adapter_logits).abs().max().item()

    # generation stops at the token the model learned to end a line with (TRL appended the tokenizer's EOS)
    gen = merged.generation_config
    eos = tokenizer.eos_token_id
    previous = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    others = [i for i in previous if i is not None and i != eos]
    gen.eos_token_id = [eos, *others] if others else eos
    gen.pad_token_id = tokenizer.pad_token_id
    merged.config.eos_token_id = eos
    merged.config.pad_token_id = tokenizer.pad_token_id

    out = ctx.out / "model"
    merged.to(dtype)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    # the reference is what was saved, seen in fp32: the reload must reproduce it exactly (up to kernel noise)
    merged.to(torch.float32)
    saved_logits = logits_of(merged, inputs)
    dtype_diff = (saved_logits - merged_logits).abs().max().item()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    reloaded.eval()
    reload_diff = (logits_of(reloaded, inputs) - saved_logits).abs().max().item()
    if not reload_diff < MAX_RELOAD_DIFF:
        raise StageError(
            "export",
            f"the saved model in {out} does not reproduce the merged model: logits differ by up to {reload_diff:.3g} "
            f"(limit {MAX_RELOAD_DIFF}); this is a bug, please report it with the recipe",
        )
    # the persona sits in the template as an escaped Jinja literal: check what it renders, not its source
    rendered = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(
        [{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=False
    )
    if recipe.character.system not in rendered and recipe.character.shown_name not in rendered:
        raise StageError("export", f"the exported chat template does not carry the persona of {recipe.character.shown_name}")

    size_mb = folder_size_mb(out)
    cast = f", {dtype_name} vs fp32 {dtype_diff:.2g}" if dtype_name != "fp32" else ""
    console.print(f"export: {out} ({dtype_name}, {size_mb} MB); max |Δlogits| reload {reload_diff:.2g}, merge vs adapter {merge_diff:.2g}{cast}")
    return {
        "dtype": dtype_name,
        "size_mb": size_mb,
        "logits_max_diff": reload_diff,
        "merge_logits_max_diff": merge_diff,
        "dtype_logits_max_diff": dtype_diff,
        "eos_token": tokenizer.eos_token,
    }
