"""Model cards from plain facts: Hugging Face front matter, every section, the eval stage's scores filled in.

    python -m pytest -q tests/test_modelcard.py
"""

from __future__ import annotations

import yaml

from engine.modelcard import (
    EVALUATION_PENDING,
    NO_DATA_LICENSE,
    fenced,
    render_card,
    with_evaluation,
    write_eval_card,
)

FACTS = {
    "recipe": {"name": "southpark_cartman", "file": "recipes/southpark_cartman.yaml", "description": "Cartman's lines, season 18 held out."},
    "character": {"name": "Cartman", "shown_name": "Eric Cartman", "system": "You are Eric Cartman.\nScrew you guys.", "first_message": "What?"},
    "base": {"name": "SmolLM2-135M-Instruct", "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "template": "southpark_alpaca",
    "dtype": "fp32",
    "method": "lora",
    "dataset": {"train": 2000, "heldout": 310, "train_scenes": 250, "heldout_scenes": 12, "tokens_mean": 101.5, "max_length": 256},
    "training": {"steps": 60, "first_loss": 3.21, "final_loss": 2.05, "tokens_per_s": 180.2, "precision": "bf16", "train_runtime_s": 412.3},
    "data_license": None,
    "ollama_name": "southpark_cartman",
    "has_adapter": True,
}
RESULTS = {
    "task": "southpark_cartman_next_line", "items": 100, "choices": 4, "chance": 0.25, "lm_eval": "0.4.13",
    "base": {"acc": 0.31, "acc_stderr": 0.046, "acc_norm": 0.29, "acc_norm_stderr": 0.045, "n": 100, "cached": True},
    "tuned": {"acc": 0.42, "acc_stderr": 0.049, "acc_norm": 0.4, "acc_norm_stderr": 0.049, "n": 100},
}  # fmt: skip


def front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def headings(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("## ")]


def test_model_card_front_matter_and_sections():
    card = render_card(FACTS, "model")
    meta = front(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation" and "persona" in meta["tags"]
    assert headings(card) == [
        "## Character", "## Base model", "## Recipe", "## Data", "## Training", "## Licence of the data", "## How to use", "## Evaluation",
    ]  # fmt: skip
    assert "You are Eric Cartman.\nScrew you guys." in card  # the system prompt, whole, in a code block
    assert "`recipes/southpark_cartman.yaml`" in card and "Cartman's lines, season 18 held out." in card
    assert "| training samples (one character line each, with its context) | 2000 |" in card
    assert "| final logged loss | 2.05 |" in card and "| method | lora |" in card and "| precision | bf16 |" in card
    assert NO_DATA_LICENSE in card and "export.data_license" in card
    assert "ollama create southpark_cartman -f Modelfile" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "../adapter" in card
    assert card.rstrip().endswith(EVALUATION_PENDING)


def test_a_preference_phase_is_on_the_card():
    preference = {"method": "dpo", "beta": 0.1, "pairs": 309, "rejected_from": "same_scene", "rejected_length": "matched", "batch_size": 4,
                  "steps": 60, "learning_rate": 0.001, "final_loss": 0.62, "reward_accuracy_last_quarter": 0.7667, "train_runtime_s": 706.8}
    card = render_card({**FACTS, "training": {**FACTS["training"], "preference": preference}}, "model")
    assert ("Then preference tuning (dpo) with TRL's DPOTrainer: the chosen reply is the character's real line, the rejected one "
            "another speaker's line in the same training scene, the one nearest the real line in length.") in card
    assert "| pairs per step | 4 |" in card and "| chosen preferred, last quarter of steps | 0.7667 |" in card
    assert "preference tuning" not in render_card(FACTS, "model")  # SFT only: nothing said about a phase that did not run


def test_adapter_card():
    card = render_card({**FACTS, "data_license": "CC BY-SA 3.0; dialogue (c) South Park Studios"}, "adapter")
    meta = front(card)
    assert meta["library_name"] == "peft" and "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    assert 'PeftModel.from_pretrained(base, "path/to/adapter")' in card and "text-generation-webui" in card
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
    assert "Training data: CC BY-SA 3.0; dialogue (c) South Park Studios" in card and NO_DATA_LICENSE not in card


def test_unknown_facts_are_left_out():
    card = render_card({"recipe": {"name": "x"}, "character": {"name": "X", "shown_name": "X", "system": "s"}, "base": {"name": "a folder"}}, "model")
    meta = front(card)
    assert "base_model" not in meta and "license" not in meta  # never a made-up id or licence
    assert "The dataset stage recorded no counts" in card and "unknown: check the base model card" in card


def test_fence_outlasts_backticks():
    block = fenced("use ``` here and ```` there")
    assert block.startswith("`````text\n") and block.endswith("\n`````")


def test_evaluation_filled_in_and_other_sections_kept(tmp_path):
    card = render_card(FACTS, "model")
    scored = with_evaluation(card, RESULTS)
    assert EVALUATION_PENDING not in scored
    assert "| base | 0.310 ± 0.046 | 0.290 ± 0.045 |" in scored and "| tuned | 0.420 ± 0.049 | 0.400 ± 0.049 |" in scored
    assert "`southpark_cartman_next_line`" in scored and "Chance is 0.25" in scored and "against 3 other lines" in scored
    assert scored.split("## Evaluation")[0] == card.split("## Evaluation")[0]  # nothing else changes
    assert with_evaluation(scored, RESULTS) == scored  # idempotent

    # a section after Evaluation survives; a card without one gets it appended
    middle = card.replace("## Evaluation", "## Evaluation", 1) + "\n## Citation\n\nnone\n"
    assert with_evaluation(middle, RESULTS).endswith("## Citation\n\nnone\n")
    assert with_evaluation("# plain\n", RESULTS).startswith("# plain\n\n## Evaluation\n")

    # the eval stage's call: reads the export's card, writes its own copy
    export = tmp_path / "export"
    (export / "model").mkdir(parents=True)
    (export / "model" / "README.md").write_text(card, encoding="utf-8")
    written = write_eval_card(export, tmp_path / "MODEL_CARD.md", RESULTS)
    assert written.read_text(encoding="utf-8") == scored
    assert (export / "model" / "README.md").read_text(encoding="utf-8") == card  # the export folder is untouched
    bare = write_eval_card(tmp_path / "no-export", tmp_path / "BARE.md", RESULTS)
    assert "| tuned | 0.420 ± 0.049 |" in bare.read_text(encoding="utf-8")


def test_task_scores_show_the_paired_change_where_the_stage_kept_it():
    from engine.modelcard import tasks_section

    task = {
        "kind": "next_line", "items": 200, "chance": 0.25, "verdict": "t: +0.035 ± 0.013 paired",
        "base": {"acc": 0.19, "acc_stderr": 0.028, "acc_norm": 0.28, "acc_norm_stderr": 0.032},
        "tuned": {"acc": 0.225, "acc_stderr": 0.03, "acc_norm": 0.38, "acc_norm_stderr": 0.034},
        "comparison": {"metric": "acc", "diff": 0.035, "paired_se": 0.013, "paired": {"acc": {"diff": 0.035, "paired_se": 0.013}, "acc_norm": {"diff": 0.1, "paired_se": 0.03}}},
    }  # fmt: skip
    ppl = {"kind": "perplexity", "items": 50, "chance": None, "base": {"bits_per_byte": 1.5}, "tuned": {"bits_per_byte": 1.25},
           "comparison": {"paired": {"bits_per_byte": {"diff": 0.25, "paired_se": 0.02}}}}  # fmt: skip
    old = {**task, "comparison": {"metric": "acc", "diff": 0.035, "paired_se": 0.013}}  # eval stage version 2
    section = tasks_section({"lm_eval": "0.4.13", "tasks": {"t": task, "p": ppl, "old": old}})
    assert "| `t` | 200 | 0.25 | acc_norm | 0.280 ± 0.032 | 0.380 ± 0.034 | +0.100 ± 0.030 |" in section
    assert "| `p` | 50 | — | bits_per_byte | 1.500 | 1.250 | -0.250 ± 0.020 |" in section  # fewer bits: a drop
    assert "| `old` | 200 | 0.25 | acc_norm | 0.280 ± 0.032 | 0.380 ± 0.034 | — |" in section
