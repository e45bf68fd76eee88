"""The train stage's preference phase (TRL DPOTrainer after SFT) on a tiny model: pairs come from training
scenes only, the phase learns to prefer the character's line, writes its reports and final adapter, and a
rerun after a crash in the phase does not redo the finished SFT.

    python -m pytest -q tests/test_preference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.preference import PreferenceSettings, build_pairs, without_unused_bos
from engine.stages.train import KEY_FILE, TrainConfig, run_train
from test_stage_train import LEARNABLE_MODEL, TRAIN_KEY, build_dataset, make_ctx, recording_console, tokenizer  # noqa: F401 (a fixture)

OTHERS = ["Away, you scullion!", "I'll tickle your catastrophe.", "Peace, ye fat guts!", "Thou art a blasted fool."]


@pytest.fixture(scope="module")
def pair_dataset_dir(tmp_path_factory, tokenizer) -> Path:
    """The train test's fake dataset, each training sample with other speakers' lines as the dataset stage writes them."""
    from datasets import load_from_disk

    plain = build_dataset(tmp_path_factory.mktemp("plain"), tokenizer)
    data = load_from_disk(str(plain / "data"))
    data["train"] = data["train"].add_column("other_lines", [OTHERS[i % 4 :] + OTHERS[: i % 4] for i in range(len(data["train"]))])
    data["heldout"] = data["heldout"].add_column("other_lines", [[] for _ in range(len(data["heldout"]))])
    folder = tmp_path_factory.mktemp("pairs")
    data.save_to_disk(str(folder / "data"))
    return folder


def test_settings_defaults_and_errors():
    settings = TrainConfig().preference
    assert settings.method == "none" and settings.beta == 0.1 and settings.rejected_from == "same_scene"
    assert PreferenceSettings(method="dpo").peak_learning_rate("lora") == 5e-5
    assert PreferenceSettings(method="dpo").peak_learning_rate("full") == 5e-7
    with pytest.raises(ValidationError, match="preference.method"):
        TrainConfig(preference={"method": "orpo"})
    with pytest.raises(ValidationError, match="pairs_per_sample"):
        TrainConfig(preference={"method": "dpo", "pairs_per_sample": 0})
    for field in PreferenceSettings.model_fields.values():
        assert field.description


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_phase_recomputes_activations_only_when_the_recipe_asks(tmp_path, checkpointing):
    """TRL's DPO and CPO configs default gradient checkpointing to on; the recipe's key must win, as in SFT."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DPOConfig
    from trl.experimental.cpo import CPOConfig

    from engine.stages.train import shared_trainer_args

    cfg = TrainConfig(gradient_checkpointing=checkpointing)
    shared = shared_trainer_args(cfg, {}, "fp32", cuda=False, world=1, is_main=True)
    for config_class in (DPOConfig, CPOConfig):
        args = config_class(output_dir=str(tmp_path), **shared)
        assert args.activation_checkpointing is checkpointing and args.gradient_checkpointing is checkpointing, config_class


def test_pairs_come_from_the_samples_own_scene_and_never_repeat_the_line():
    train = {
        "prompt": ["p1", "p2", "p3"],
        "completion": ["mine one", "mine two", "mine three"],
        "other_lines": [["a1", "a2", "a3"], ["b1", "b2"], []],
    }
    pairs = build_pairs(train, PreferenceSettings(method="dpo", pairs_per_sample=2), seed=0)
    assert len(pairs) == 4  # the third sample has no other speaker in its scene: no pair
    assert {p["rejected"] for p in pairs if p["prompt"] == "p1"} <= {"a1", "a2", "a3"}
    assert {p["rejected"] for p in pairs if p["prompt"] == "p2"} == {"b1", "b2"}
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert pairs == build_pairs(train, PreferenceSettings(method="dpo", pairs_per_sample=2), seed=0)  # seeded
    anywhere = build_pairs(train, PreferenceSettings(method="dpo", rejected_from="any_scene"), seed=1)
    assert len(anywhere) == 3 and {p["rejected"] for p in anywhere} <= {"a1", "a2", "a3", "b1", "b2"}
    capped = build_pairs(train, PreferenceSettings(method="dpo", pairs_per_sample=2, max_pairs=3), seed=0)
    assert len(capped) == 3


def test_matched_rejected_lines_are_the_scene_lines_nearest_the_real_one_in_length():
    train = {
        "prompt": ["p1"],
        "completion": ["a line of medium size"],  # 21 characters
        "other_lines": [["no", "a rejected line, similar", "this other line is very much longer than the real one", "short one"]],
    }
    matched = PreferenceSettings(method="dpo", pairs_per_sample=2)
    assert matched.rejected_length == "matched"  # the default: it beat random rejected lines (bench/persona)
    for seed in range(5):  # whatever the seeded shuffle, the two nearest in length win
        assert [p["rejected"] for p in build_pairs(train, matched, seed=seed)] == ["a rejected line, similar", "short one"]
    anything = PreferenceSettings(method="dpo", rejected_length="any")
    drawn = {p["rejected"] for seed in range(20) for p in build_pairs(train, anything, seed=seed)}
    assert drawn == set(train["other_lines"][0])  # any: every line of the scene can be drawn, the far ones too


def test_cpo_gets_no_bos_the_tokenizer_would_not_add(tokenizer):
    # SmolLM2's bos_token (<|im_start|>) is never added by the tokenizer: CPO, which prepends bos_token to a prompt
    # not starting with it, would train on a prefix SFT, eval and serving never see
    assert tokenizer.bos_token_id is not None and tokenizer("Below is a script")["input_ids"][0] != tokenizer.bos_token_id
    plain = without_unused_bos(tokenizer)
    assert plain.bos_token_id is None and tokenizer.bos_token_id is not None, "the original tokenizer is left as it is"
    assert plain("Below is a script")["input_ids"] == tokenizer("Below is a script")["input_ids"]

    class AddsBos:  # a tokenizer that does add its BOS: CPO's prepending is then what the model always sees
        bos_token_id = 7

        def __call__(self, text):
            return {"input_ids": [7, 42]}

    adds = AddsBos()
    assert without_unused_bos(adds) is adds


def train_with_phase(tmp_path: Path, dataset_dir: Path, cfg: TrainConfig) -> tuple[Path, object, dict, dict]:
    """Run the train stage (SFT, then the phase) on the tiny model: its folder, console, summary and phase metrics."""
    console = recording_console()
    out = tmp_path / "train"
    summary = run_train(make_ctx(out, dataset_dir, cfg, console, LEARNABLE_MODEL))
    return out, console, summary, json.loads((out / "metrics.json").read_text())["preference"]


def test_dpo_after_sft_learns_and_reports(tmp_path, pair_dataset_dir):
    cfg = TrainConfig(
        max_steps=4, save_steps=100, batch_size=4, learning_rate=1e-2, logging_steps=1, max_length=128,
        lora={"target_modules": "all-linear"},
        preference={"method": "dpo", "max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "beta": 0.5},
    )  # fmt: skip
    out, console, summary, phase = train_with_phase(tmp_path, pair_dataset_dir, cfg)

    assert summary["steps"] == 4 and summary["preference"] == "dpo" and summary["preference_steps"] == 12
    assert phase["pairs"] == 24 and phase["first_loss"] == pytest.approx(0.6931, abs=0.01)  # policy == reference at step 1
    assert phase["final_loss"] < 0.5 * phase["first_loss"], phase  # the repeated pairs are learned
    assert phase["reward_accuracy_last_quarter"] > 0.9
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "tokenizer_config.json").is_file()
    assert not (out / "adapter" / "ref").exists(), "TRL's frozen reference adapter must not be exported"
    assert (out / "sft" / "adapter_model.safetensors").is_file()  # the SFT adapter stays for comparison
    assert (out / "preference.png").read_bytes()[:4] == b"\x89PNG" and (out / "loss.png").is_file()
    assert not (out / "preference_checkpoints").exists()
    text = console.export_text()
    assert "reference = the SFT model" in text and "first pair" in text


def test_cpo_after_sft_needs_no_reference_and_learns_the_absolute_margin(tmp_path, pair_dataset_dir):
    cfg = TrainConfig(
        max_steps=4, save_steps=100, batch_size=4, learning_rate=1e-2, logging_steps=1, max_length=128,
        lora={"target_modules": "all-linear"},
        preference={"method": "cpo", "max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "beta": 0.5, "sft_weight": 0.5},
    )  # fmt: skip
    out, console, summary, phase = train_with_phase(tmp_path, pair_dataset_dir, cfg)

    assert summary["preference"] == "cpo" and summary["preference_steps"] == 12
    assert phase["method"] == "cpo" and phase["pairs"] == 24
    # no reference: unlike DPO's ln 2 at step 1 (policy == reference), CPO's first loss is the sigmoid of the
    # policy's own margin plus the chosen line's NLL, well above ln 2
    assert phase["first_loss"] > 1.0, phase
    # CPO's reward is beta x the policy's own summed log-probability: "accuracy" = the chosen line is the likelier one,
    # the ranking next-line acc makes; the repeated pairs end up ranked right
    assert phase["reward_accuracy_last_quarter"] > 0.9, phase
    assert phase["final_loss"] < phase["first_loss"], phase
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter" / "ref").exists()
    assert "reference = none (reference-free)" in console.export_text()


def test_dpo_after_full_fine_tuning_trains_every_weight_against_the_sft_model(tmp_path, pair_dataset_dir):
    cfg = TrainConfig(
        method="full", max_steps=4, save_steps=100, batch_size=4, learning_rate=1e-3, logging_steps=1, max_length=128,
        preference={"method": "dpo", "max_steps": 12, "batch_size": 4, "learning_rate": 1e-3, "beta": 0.5},
    )  # fmt: skip
    out, console, summary, phase = train_with_phase(tmp_path, pair_dataset_dir, cfg)

    assert summary["preference"] == "dpo" and summary["preference_steps"] == 12
    assert phase["first_loss"] == pytest.approx(0.6931, abs=0.01)  # the reference is the SFT model, loaded a second time
    assert phase["final_loss"] < 0.5 * phase["first_loss"] and phase["reward_accuracy_last_quarter"] > 0.9, phase
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    assert not (out / "adapter").exists() and not (out / "sft").exists()  # the whole SFT model is not kept twice
    text = console.export_text()
    assert "every weight" in text and "reference = the SFT model" in text  # no adapter in either phase


def test_rerun_after_a_crash_in_the_phase_skips_the_finished_sft(tmp_path, pair_dataset_dir, monkeypatch):
    import engine.stages.train as train_module

    cfg = TrainConfig(
        max_steps=2, save_steps=100, batch_size=4, max_length=128,
        preference={"method": "dpo_sft", "max_steps": 2, "batch_size": 4},
    )  # fmt: skip
    out = tmp_path / "train"
    real_sft = train_module.sft_phase

    def sft_then_crash(spec, console):
        real_sft(spec, console)
        raise KeyboardInterrupt  # the kill arrives once SFT is written, before the phase starts

    monkeypatch.setattr(train_module, "sft_phase", sft_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(make_ctx(out, pair_dataset_dir, cfg, recording_console(), LEARNABLE_MODEL))
    assert not (out / "sft" / KEY_FILE).exists(), "an SFT cut off before it returned is not marked finished"

    monkeypatch.setattr(train_module, "sft_phase", lambda spec, console: (_ for _ in ()).throw(AssertionError("SFT ran again")))
    (out / "sft").mkdir(exist_ok=True)
    # what a finished SFT leaves: its weights (from the first attempt), its metrics and the marker with this key
    (out / "sft" / KEY_FILE).write_text(json.dumps({"key": TRAIN_KEY}))
    console = recording_console()
    summary = run_train(make_ctx(out, pair_dataset_dir, cfg, console, LEARNABLE_MODEL))
    assert summary["preference"] == "dpo_sft" and summary["preference_steps"] == 2
    assert "SFT already finished" in console.export_text()
