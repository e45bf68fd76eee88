"""The `model` section: the embedded model's identity, the converted folder and tiny random models."""

from __future__ import annotations

import json

from engine.models import TINY_OVERRIDES, ModelConfig, base_model_input, embedded_gguf, resolve_base_model


def test_embedded_identity_is_the_gguf_sha256():
    item = base_model_input(ModelConfig())
    assert item.path == embedded_gguf() and len(item.sha256) == 64


def test_local_folder_identity_follows_its_bytes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    first = base_model_input(ModelConfig(base=str(tmp_path))).sha256
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert base_model_input(ModelConfig(base=str(tmp_path))).sha256 != first


def test_converted_and_tiny_folders_load_as_plain_models():
    from transformers import AutoModelForCausalLM

    base = resolve_base_model(ModelConfig())
    tiny = resolve_base_model(ModelConfig(random_init=True, config_overrides=TINY_OVERRIDES))
    for folder in (base, tiny):
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config  # else from_pretrained asks for the gguf again
        assert (folder / ".complete").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((tiny / "config.json").read_text())["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
