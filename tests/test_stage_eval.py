"""The eval stage on a tiny random model used as both base and tuned: the distractor policy, the task folder
running under the plain `lm_eval` CLI with the same score, the outputs, the base-score cache and the errors.

    python -m pytest -q tests/test_stage_eval.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from rich.console import Console

from engine.errors import StageError
from engine.models import TINY_OVERRIDES, ModelConfig, resolve_base_model
from engine.persona import CharacterConfig
from engine.registry import StageContext
from engine.stages import eval as eval_stage
from engine.stages.eval import EvalConfig, build_items, normalise, run_eval, task_name

CHARACTER = "FALSTAFF"

# scene -> turns (speaker, text). s3 is short: one other line only, so its items need the fallback.
SCENES = {
    "h1/s1": [
        ("HAL", "Now, Hal, what time of day is it, lad?"),
        ("FALSTAFF", "Indeed, you come near me now, Hal."),
        ("POINS", "Good morrow, sweet Hal."),
        ("FALSTAFF", "Marry, then, sweet wag, when thou art king."),
        ("HAL", "What, in thy quips and thy quiddities?"),
        ("BARDOLPH", "  marry,   THEN, sweet wag, when thou art KING. "),  # the gold line of turn 3, respelled
        ("POINS", "Good morrow, sweet Hal."),  # a repeated line: never twice among the choices
        ("FALSTAFF", "Thou hast the most unsavoury similes."),
        ("HAL", "Thou didst well, for wisdom cries out in the streets."),
    ],
    "h1/s2": [
        ("HOSTESS", "O Jesu, my lord the prince!"),
        ("FALSTAFF", "A plague of all cowards, I say."),
        ("PETO", "Give me a cup of sack, boy."),
        ("GADSHILL", "We four set upon some dozen."),
        ("FALSTAFF", "I am a rogue if I drunk today."),
        ("HOSTESS", "The sheriff and all the watch are at the door."),
    ],
    "h1/s3": [
        ("WORCESTER", "Hear me, my liege."),
        ("FALSTAFF", "Rebellion lay in his way, and he found it."),
    ],
    "h1/s4": [  # a training scene: its lines are the last fallback only
        ("HOTSPUR", "My liege, I did deny no prisoners."),
        ("FALSTAFF", "Honour pricks me on."),
        ("DOUGLAS", "Another king! They grow like Hydra's heads."),
    ],
}
HELDOUT_SCENES = ("h1/s1", "h1/s2", "h1/s3")


def turns() -> list[dict]:
    return [
        {"scene": scene, "index": i, "speaker": speaker, "text": text, "meta": {}}
        for scene, lines in SCENES.items()
        for i, (speaker, text) in enumerate(lines)
    ]


def heldout_rows(render=lambda lines: "\n".join(lines)) -> list[dict]:
    """Rows shaped like the dataset stage's: `context` is the list of preceding turns {speaker, text}."""
    rows = []
    for scene in HELDOUT_SCENES:
        lines = SCENES[scene]
        for i, (speaker, text) in enumerate(lines):
            if speaker != CHARACTER:
                continue
            context = [{"speaker": s, "text": t} for s, t in lines[max(0, i - 3) : i]]
            prompt = render([f"{turn['speaker']}: {turn['text']}" for turn in context])
            rows.append({"scene": scene, "prompt": prompt, "completion": text, "context": context, "turn_index": i})
    return rows


# ---------------------------------------------------------------- the distractor policy (no model)


def test_distractors_same_scene_never_gold_no_duplicates_deterministic():
    cfg = EvalConfig(distractors=3, max_items=100, seed=0)
    items = build_items(heldout_rows(), turns(), CHARACTER, cfg)
    assert len(items) == 6
    golds = {f"{r['scene']}#{r['turn_index']}": r["completion"] for r in heldout_rows()}
    other_lines = {scene: {t.strip() for s, t in lines if s != CHARACTER} for scene, lines in SCENES.items()}
    for item in items:
        gold = item["choices"][item["label"]]
        distractors = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert len(item["choices"]) == 4 and gold == golds[item["id"]]
        keys = [normalise(c) for c in item["choices"]]
        assert len(set(keys)) == 4, "a duplicate (or the gold line respelled) among the choices"
        if item["scene"] in ("h1/s1", "h1/s2"):  # enough lines in the scene: all from it, by other speakers
            assert all(d in other_lines[item["scene"]] for d in distractors)
        else:  # h1/s3 has one other line: it is used, then other held-out scenes
            assert "Hear me, my liege." in distractors
            heldout_others = set().union(*(other_lines[s] for s in HELDOUT_SCENES))
            assert all(d in heldout_others for d in distractors)
    # the respelled gold line of turn 3 in h1/s1 is never offered against it
    turn3 = next(i for i in items if i["id"] == "h1/s1#3")
    assert all(normalise(c) != normalise("Marry, then, sweet wag, when thou art king.") for j, c in enumerate(turn3["choices"]) if j != turn3["label"])
    # seeded: the same every time, different with another seed; the gold position moves
    assert build_items(heldout_rows(), turns(), CHARACTER, cfg) == items
    assert build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(seed=1)) != items
    assert len({item["label"] for item in items}) > 1


def test_distractors_never_come_from_training_scenes_and_items_are_sampled():
    # one held-out scene with one other speaker's line: the training scenes are never used to fill up
    rows = [r for r in heldout_rows() if r["scene"] == "h1/s3"]
    with pytest.raises(StageError, match=r"only 1 distinct lines.*never come from training scenes.*eval.distractors to 1 or less"):
        build_items(rows, turns(), CHARACTER, EvalConfig(distractors=3))
    items = build_items(rows, turns(), CHARACTER, EvalConfig(distractors=1))
    assert [c for i, c in enumerate(items[0]["choices"]) if i != items[0]["label"]] == ["Hear me, my liege."]
    # no policy ever offers a line of a training scene (the tuned model trained on those)
    heldout_lines = {normalise(t) for scene in HELDOUT_SCENES for _, t in SCENES[scene]}
    training_only = {normalise(t) for scene, lines in SCENES.items() if scene not in HELDOUT_SCENES for _, t in lines} - heldout_lines
    assert training_only, "the fixture must have training-scene lines for this check to mean anything"
    for policy, k in (("same_scene", 3), ("character_other_scenes", 2), ("random", 3)):
        for item in build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(distractors=k, distractor_pool=policy)):
            for choice in item["choices"]:
                assert normalise(choice) not in training_only, (policy, item["id"], choice)
    # a seeded sample of max_items, in data order
    sample = build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(max_items=3, seed=5))
    assert len(sample) == 3 and sample == build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(max_items=3, seed=5))


def test_distractor_pool_character_other_scenes_and_random():
    cfg = EvalConfig(distractors=2, distractor_pool="character_other_scenes")
    items = build_items(heldout_rows(), turns(), CHARACTER, cfg)
    own_lines = {scene: {t for s, t in lines if s == CHARACTER} for scene, lines in SCENES.items()}
    for item in items:
        distractors = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        # the character's own lines, from OTHER held-out scenes only (never a training scene's line)
        allowed = set().union(*(own_lines[s] for s in HELDOUT_SCENES if s != item["scene"]))
        assert all(d in allowed for d in distractors), (item["id"], distractors)
    heldout_lines = {t.strip() for s in HELDOUT_SCENES for _, t in SCENES[s]}
    for item in build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(distractors=3, distractor_pool="random")):
        assert all(c.strip() in heldout_lines for c in item["choices"])
    with pytest.raises(StageError, match="distractor_pool character_other_scenes"):
        build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(distractors=9, distractor_pool="character_other_scenes"))


def test_task_name_is_sanitized():
    assert task_name("Fal.staff-Test") == "fal_staff_test_next_line"


# ---------------------------------------------------------------- the stage on a tiny model

MODEL = ModelConfig(random_init=True, config_overrides=dict(TINY_OVERRIDES))


@pytest.fixture(scope="module")
def tiny() -> Path:
    return resolve_base_model(MODEL, None)


def make_upstream(root: Path, tiny: Path, heldout: list[dict]) -> dict[str, Path]:
    from datasets import Dataset, DatasetDict

    clean = root / "clean"
    clean.mkdir(parents=True)
    with open(clean / "turns.jsonl", "w", encoding="utf-8") as handle:
        for turn in turns():
            handle.write(json.dumps(turn) + "\n")
    dataset = root / "dataset"
    columns = ("scene", "prompt", "completion", "context", "turn_index")
    split = Dataset.from_dict({c: [r[c] for r in heldout] for c in columns})
    DatasetDict({"train": split, "heldout": split.select(range(len(heldout)))}).save_to_disk(str(dataset / "data"))
    export = root / "export"
    export.mkdir()
    (export / "model").symlink_to(tiny, target_is_directory=True)
    return {"clean": clean, "dataset": dataset, "export": export}


def make_ctx(root: Path, upstream: dict[str, Path], out_name: str = "eval.tmp") -> StageContext:
    recipe = SimpleNamespace(
        name="Fal.staff-Test",
        model=MODEL,
        character=CharacterConfig(name=CHARACTER),
        eval=EvalConfig(max_items=8, batch_size=8, sample_replies=2, max_new_tokens=8, interviews={"max_questions": 2, "multi_turn": 1, "max_new_tokens": 6}),
    )
    out = root / out_name
    out.mkdir()
    return StageContext(recipe=recipe, config=recipe.eval, out=out, run_dir=root, upstream=upstream, inputs={}, console=Console(quiet=True))


def chat_rows(tiny: Path) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)

    def render(context: list[str]) -> str:
        messages = [{"role": "system", "content": "You are Falstaff."}, {"role": "user", "content": "\n".join(context) or "(the scene starts)"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return heldout_rows(render)


@pytest.fixture(scope="module")
def stage_run(tiny, tmp_path_factory):
    """One full run (base scored), then a second run whose base scores must come from the cache."""
    root = tmp_path_factory.mktemp("run")
    cache = root / "cache"
    scored: list[Path] = []
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(eval_stage, "cache_root", lambda: cache)  # only the eval-base cache: the model cache stays
        upstream = make_upstream(root, tiny, chat_rows(tiny))
        ctx = make_ctx(root, upstream)
        first = run_eval(ctx)
        final = root / "eval"
        ctx.out.rename(final)  # what the runner does when the stage returns

        real_score = eval_stage.score  # a spy: which models the second run scores
        patcher.setattr(eval_stage, "score", lambda model_dir, *a, **k: scored.append(model_dir) or real_score(model_dir, *a, **k))
        ctx2 = make_ctx(root, upstream, "eval.tmp2")
        ctx2.console = Console(file=io.StringIO(), width=400)
        second = run_eval(ctx2)
    log = ctx2.console.file.getvalue()
    return SimpleNamespace(root=root, final=final, first=first, second=second, scored=scored, cache=cache, tiny=tiny, log=log)


TASKS = ("fal_staff_test_next_line", "fal_staff_test_reply_choice", "fal_staff_test_heldout_ppl")


def test_stage_outputs(stage_run):
    summary = stage_run.first
    assert summary["task"] == "fal_staff_test_next_line" and summary["items"] == 6 and summary["chance"] == 0.25
    assert summary["tasks"] == list(TASKS)
    for who in ("base", "tuned"):
        assert set(summary[who]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
        assert 0.0 <= summary[who]["acc"] <= 1.0
    # the same tiny model is base and tuned: the same scores, and every verdict says so
    assert summary["base"]["acc"] == pytest.approx(summary["tuned"]["acc"])
    assert len(summary["verdicts"]) == 3 and all("identical per item" in line for line in summary["verdicts"])
    assert {row["metric"] for row in summary["table"]} == {"acc", "acc_norm", "acc_mutual_info", "bits_per_byte"}
    assert set(summary["sample"]) == {"context", "real", "generated"}
    assert summary["sample"]["context"].startswith("HAL: Now, Hal")  # the context turns as "SPEAKER: text" lines

    results = json.loads((stage_run.final / "results.json").read_text())
    next_line, reply, ppl = (results["tasks"][name] for name in TASKS)
    assert next_line["items"] == 6 and next_line["chance"] == 0.25 and next_line["tuned"]["n"] == 6
    assert next_line["tuned"]["acc"] == summary["tuned"]["acc"] and "acc_mutual_info" in next_line["tuned"]
    assert reply["choices"] == 5 and reply["chance"] == 0.2 and reply["items"] == 6  # Yothalia's five options
    assert ppl["kind"] == "perplexity" and ppl["chance"] is None and ppl["tuned"]["bits_per_byte"] > 0
    assert ppl["tuned"]["word_perplexity"] > 1 and ppl["items"] == 6
    assert results["timings"]["tuned_scoring_s"] > 0 and results["base_cached"] is False
    assert results["adapter_agreement"] is None  # this export has no adapter (as after a full fine-tune)
    # every metric compared per item; the same model twice differs by nothing, with no spread
    assert set(next_line["comparison"]["paired"]) == {"acc", "acc_norm", "acc_mutual_info"}
    assert set(ppl["comparison"]["paired"]) == {"bits_per_byte"}
    assert all(gain == {"diff": 0.0, "paired_se": 0.0} for task in (next_line, reply, ppl) for gain in task["comparison"]["paired"].values())
    assert all(row["change"] == 0.0 and row["change_se"] == 0.0 for row in summary["table"] if row["metric"] != "word_perplexity")
    per_item = json.loads((stage_run.final / "per_item.json").read_text())
    assert set(per_item) == set(TASKS) and len(per_item["fal_staff_test_next_line"]["tuned"]["acc_norm"]) == 6
    assert per_item["fal_staff_test_next_line"]["base"] == per_item["fal_staff_test_next_line"]["tuned"]
    assert (stage_run.final / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (stage_run.final / "samples.md").read_text()
    assert samples.count("**generated**") == 2 and "**real**" in samples
    assert results["interviews"]["interviews"] == 2 and (stage_run.final / "interviews.md").is_file()
    assert len((stage_run.final / "interviews.jsonl").read_text().splitlines()) == 2 and results["judge"] is None
    card = (stage_run.final / "MODEL_CARD.md").read_text()
    assert "| `fal_staff_test_heldout_ppl` | 6 | — | bits_per_byte |" in card and "identical per item" in card
    acc_norm_row = next(line for line in card.splitlines() if line.startswith("| `fal_staff_test_next_line`") and "| acc_norm |" in line)
    assert acc_norm_row.endswith("| +0.000 ± 0.000 |")  # the paired change, as the stage computed it

    for name, data_file, choices in ((TASKS[0], "items.jsonl", 4), (TASKS[1], "items.jsonl", 5), (TASKS[2], "lines.jsonl", None)):
        task = stage_run.final / "tasks" / name
        yaml_text = (task / f"{name}.yaml").read_text()
        assert f'"{data_file}"' in yaml_text and str(stage_run.root) not in yaml_text  # portable: no absolute path
        docs = [json.loads(line) for line in (task / data_file).read_text().splitlines()]
        assert len(docs) == 6
        if choices:
            assert all(len(d["choices"]) == choices and len({c.casefold() for c in d["choices"]}) == choices for d in docs)


def test_reply_choice_items_never_offer_the_gold_reply_twice():
    rows = [
        {"scene": f"s{i}", "turn_index": 1, "prompt": f"p{i}", "completion": text}
        for i, text in enumerate(["Banish plump Jack.", "banish  plump jack.", "Honour pricks me on.", "A plague of all cowards!", "I am not only witty.", "Give me a cup of sack."])
    ]
    items = eval_stage.build_reply_items(rows, EvalConfig(reply_choices=3, max_items=6))
    for item in items:
        gold = item["choices"][item["label"]]
        others = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert all(eval_stage.normalise(c) != eval_stage.normalise(gold) for c in others)
        assert len(item["choices"]) == 4
    assert items == eval_stage.build_reply_items(rows, EvalConfig(reply_choices=3, max_items=6))  # seeded
    with pytest.raises(StageError, match="reply_choices"):
        eval_stage.build_reply_items(rows, EvalConfig(reply_choices=5, max_items=6))
    docs = eval_stage.build_perplexity_docs(rows, EvalConfig(max_items=3))
    assert len(docs) == 3 and all(set(d) == {"id", "text"} for d in docs)


def test_distractor_length_matched_draws_the_lines_nearest_the_real_one_in_length():
    gold = "Honour pricks me on."  # 20 characters
    candidates = ["Ay.", "Hear me, my liege.", "A plague of all cowards, I say, and a vengeance too!", "Give me a cup of sack.",
                  "O Jesu!", "Another king! They grow like Hydra's heads, and every one of them is armed."]  # fmt: skip
    nearest = ["Hear me, my liege.", "Give me a cup of sack."]  # 18 and 22 characters: the two smallest length gaps
    for seed in range(5):
        assert sorted(eval_stage.draw_unlike(gold, candidates, 2, __import__("random").Random(seed), match_length=True)) == sorted(nearest)
    randomly = {tuple(eval_stage.draw_unlike(gold, candidates, 2, __import__("random").Random(seed))) for seed in range(20)}
    assert len(randomly) > 1 and any(set(pair) != set(nearest) for pair in randomly)
    # whole items: matched is the default, and its distractors are nearer the real line in length than random ones
    assert EvalConfig().distractor_length == "matched"

    def mean_gap(cfg: EvalConfig) -> float:
        gaps = [eval_stage.length_gap(choice, item["choices"][item["label"]])
                for item in build_items(heldout_rows(), turns(), CHARACTER, cfg)
                for i, choice in enumerate(item["choices"]) if i != item["label"]]  # fmt: skip
        return sum(gaps) / len(gaps)

    matched = mean_gap(EvalConfig(distractors=2))
    assert all(matched < mean_gap(EvalConfig(distractors=2, distractor_length="any", seed=seed)) for seed in range(5))
    # still never a training-scene line, and the scene first: h1/s1's items draw only from h1/s1's other speakers
    others_s1 = {t.strip() for s, t in SCENES["h1/s1"] if s != CHARACTER}
    for item in build_items(heldout_rows(), turns(), CHARACTER, EvalConfig(distractors=2)):
        if item["scene"] == "h1/s1":
            assert all(c in others_s1 for i, c in enumerate(item["choices"]) if i != item["label"])


def test_near_duplicates_are_not_distractors():
    rng = __import__("random").Random(0)
    chosen = eval_stage.draw_unlike("Banish plump Jack, and banish all the world.", [
        "Banish plump Jack, and banish all the world!", "banish plump jack and banish all the world", "Honour pricks me on.",
    ], 3, rng)  # fmt: skip
    assert chosen == ["Honour pricks me on."]


def test_verdict_uses_paired_standard_errors():
    task = eval_stage.Task(kind="next_line", name="t", folder=Path("."), items=[{}] * 40, choices=4)
    base = {"acc": 0.25, "per_item": {"acc": [0.0] * 30 + [1.0] * 10}}
    better = {"acc": 0.75, "per_item": {"acc": [1.0] * 30 + [1.0] * 10}}
    line = eval_stage.verdict(task, base, better)
    assert line["outcome"] == "better" and "tuned beats base beyond 2 standard errors" in line["line"] and "+0.750" in line["line"]
    noisy = {"acc": 0.275, "per_item": {"acc": [1.0] + [0.0] * 29 + [1.0] * 10}}
    assert eval_stage.verdict(task, base, noisy)["outcome"] == "no clear difference"
    ppl = eval_stage.Task(kind="perplexity", name="p", folder=Path("."), items=[{}] * 3, choices=None)
    worse = eval_stage.verdict(ppl, {"bits_per_byte": 1.0, "per_item": {"bits_per_byte": [[-10.0, 10]] * 3}}, {"bits_per_byte": 2.0, "per_item": {"bits_per_byte": [[-20.0, 10], [-21.0, 10], [-19.0, 10]]}})
    assert worse["outcome"] == "worse" and "bits/byte" in worse["line"]


def test_every_metric_gets_its_paired_gain():
    task = eval_stage.Task(kind="next_line", name="t", folder=Path("."), items=[{}] * 4, choices=4)
    base = {"per_item": {"acc": [0.0, 0.0, 1.0, 0.0], "acc_norm": [0.0, 0.0, 0.0, 0.0], "acc_mutual_info": [1.0] * 4, "loglik": [-1.0] * 16}}
    tuned = {"per_item": {"acc": [0.0, 1.0, 1.0, 0.0], "acc_norm": [1.0, 1.0, 1.0, 0.0], "acc_mutual_info": [1.0] * 4, "loglik": [-1.0] * 16}}
    gains = eval_stage.paired_gains(task, base, tuned)
    assert set(gains) == {"acc", "acc_norm", "acc_mutual_info"}  # not the log-likelihoods
    assert gains["acc"]["diff"] == pytest.approx(0.25) and gains["acc_norm"]["diff"] == pytest.approx(0.75)
    assert gains["acc_norm"]["paired_se"] == pytest.approx(0.25)  # diffs 1,1,1,0: sd 0.5, over sqrt(4)
    assert gains["acc_mutual_info"] == {"diff": 0.0, "paired_se": 0.0}
    ppl = eval_stage.Task(kind="perplexity", name="p", folder=Path("."), items=[{}] * 2, choices=None)
    better = eval_stage.paired_gains(ppl, {"per_item": {"bits_per_byte": [[-20.0, 10]] * 2}}, {"per_item": {"bits_per_byte": [[-10.0, 10]] * 2}})
    assert better["bits_per_byte"]["diff"] > 0  # fewer bits per byte is a gain
    assert eval_stage.tuned_minus_base(better["bits_per_byte"], "bits_per_byte") < 0  # ... and a drop in the table


def test_an_ignored_adapter_is_caught():
    task = eval_stage.Task(kind="next_line", name="t", folder=Path("."), items=[{}] * 4, choices=2)
    base = {"t": {"acc": 0.5, "per_item": {"acc": [1.0, 0.0, 1.0, 0.0], "loglik": [-5.0, -6.0] * 4}}}
    merged = {"t": {"acc": 1.0, "per_item": {"acc": [1.0] * 4, "loglik": [-2.0, -7.0] * 4}}}
    applied = {"t": {"acc": 1.0, "per_item": {"acc": [1.0] * 4, "loglik": [-2.001, -7.002] * 4}}}
    report = eval_stage.adapter_agreement([task], base, merged, applied)
    assert report["mean_abs_loglik_diff_adapter_vs_merged"] < 0.01 and report["t"]["acc_diff"] == 0.0
    with pytest.raises(StageError, match="base \\+ adapter does not reproduce the merged model.*the adapter was not applied"):
        eval_stage.adapter_agreement([task], base, merged, base)  # PEFT loaded nothing: scores of the base


def test_base_scores_cached(stage_run):
    assert len(stage_run.scored) == 1, "the second run must score only the tuned model"
    assert Path(stage_run.scored[0]).name == "model"  # the export's model folder
    assert len(list((stage_run.cache / "eval-base").glob("*.json"))) == 1
    assert stage_run.second["base"] == stage_run.first["base"]
    results = json.loads((stage_run.root / "eval.tmp2" / "results.json").read_text())
    assert results["base_cached"] is True and results["timings"]["base_scoring_s"] is None
    assert "base model scores reused from" in stage_run.log


@pytest.mark.parametrize("index", [0, 1, 2], ids=["next_line", "reply_choice", "heldout_ppl"])
def test_task_folder_runs_with_lm_eval_cli(stage_run, index):
    task_name_ = TASKS[index]
    folder = stage_run.final / "tasks" / task_name_
    lm_eval = Path(sys.executable).with_name("lm_eval")
    output = stage_run.root / f"cli-{index}"
    command = [
        str(lm_eval), "--include_path", ".", "--tasks", task_name_, "--model", "hf",
        "--model_args", f"pretrained={stage_run.tiny}", "--device", "cpu", "--batch_size", "4", "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(output.rglob("results_*.json")).read_text())["results"][task_name_]
    expected = json.loads((stage_run.final / "results.json").read_text())["tasks"][task_name_]["tuned"]
    metrics = ("bits_per_byte", "word_perplexity") if index == 2 else ("acc", "acc_norm", "acc_mutual_info")
    for metric in metrics:
        assert result[f"{metric},none"] == pytest.approx(expected[metric], rel=1e-6), metric


def test_no_heldout_items_is_a_stage_error(tiny, tmp_path):
    from datasets import Dataset, DatasetDict

    upstream = make_upstream(tmp_path, tiny, heldout_rows())
    data = upstream["dataset"] / "data"
    train = Dataset.from_list(heldout_rows())
    # no held-out split at all (datasets cannot reload an empty saved split, so this is how "none" looks)
    shutil.rmtree(data)
    DatasetDict({"train": train}).save_to_disk(str(data))
    with pytest.raises(StageError, match="no held-out items"):
        run_eval(make_ctx(tmp_path, upstream))
    # held-out rows whose real lines are all empty
    shutil.rmtree(data)
    blank = Dataset.from_list([{**row, "completion": "  "} for row in heldout_rows()[:2]])
    DatasetDict({"train": train, "heldout": blank}).save_to_disk(str(data))
    with pytest.raises(StageError, match="empty"):
        run_eval(make_ctx(tmp_path, upstream, "eval.tmp2"))
