"""Train-stage throughput: the engine's train stage vs a plain TRL SFTTrainer script, and vs the CPU's matmul limit.

    RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/train_throughput.py

One invocation runs, one after the other, each in its own Python process, on the same model (the embedded
SmolLM2-135M-Instruct, converted folder from engine.models.resolve_base_model), the same data and the same
number of optimizer steps:

  engine       `recipe run recipes/shakespeare_falstaff.yaml --until train --force train --run-dir <tmp>
               --set train.max_steps=N --set train.save_steps=1000` (the CLI, so whatever the train stage
               does today is what is timed); figures from <tmp>/train/metrics.json.
  trl defaults a plain script: SFTTrainer(model=<model folder>, train_dataset=<the dataset stage's "train"
               split, prompt/completion columns>, args=SFTConfig(output_dir, max_steps=N, report_to="none",
               per_device_train_batch_size=<the recipe's train.batch_size>, include_num_input_tokens_seen=
               "non_padding", use_cpu=True without a GPU: TRL's default bf16=True makes TrainingArguments refuse
               a GPU-less machine otherwise), peft_config=LoraConfig(<the recipe's rank, alpha, dropout, target modules>));
               everything else is TRL 1.16's default (bf16 autocast, gradient checkpointing on, max_length
               1024, TRL's loss with its entropy/accuracy metrics, random order).
  ablations    the engine with one recipe key changed (train.gradient_checkpointing, train.group_by_length,
               train.batch_size 4 / 16, train.precision fp32 or bf16: whichever `auto` did not pick), and the
               loss: the engine has no key for it, so the plain script reproduces the engine's settings twice,
               once with the engine's plain cross-entropy (Trainer.compute_loss) and once with TRL's loss;
               optionally (--ablations all or full) train.method=full.

tokens/s is counted the same way for every variant: trainer.state.num_input_tokens_seen with
include_num_input_tokens_seen="non_padding" (the sum of the attention masks of every batch: prompt +
completion + the EOS TRL appends, after truncation to max_length; padding excluded), divided by the Trainer's
own train_runtime (the training loop of trainer.train(): model loading, dataset tokenization and process
start-up excluded; the first, slower step and the checkpoint the Trainer writes at the last step included,
for every variant alike). The engine's metrics.json gives tokens_seen and train_runtime_s; the plain script
reads the same two from its trainer. Engine rows also give tokens/s after step 1 (the engine logs every step;
from the first logged point to the last), which leaves out torch.compile's compilation and oneDNN's set-up.
With ablations, the engine runs once more at the end: the ratio of its two runs is the machine's drift.

Before that it measures the machine's matmul throughput (torch.mm, fp32 and bf16, all torch threads, the
best of a square 2048 product and the model's own MLP shape) and reports each variant's model FLOP/s
against it: tokens/s x FLOPs per token of the method (LoRA 4N + 6Nl + 3A, full 6N + 3A: see flops_model).
A CPU without native bf16 (AVX2 only: ~0.3 GFLOP/s bf16) would need hours for TRL's bf16 default, so when
bf16 matmuls measure 10x slower than fp32, the bf16 variants run min(steps, 2) steps and the table says so.

Writes bench/train_throughput.json (command, machine, figures) and bench/train_throughput.png.

Options: --steps N (optimizer steps per variant; default 6), --ablations LIST (comma-separated from gc,
group, bs4, bs16, precision, loss, compile (train.sft_args.torch_compile), dropout (LoRA dropout 0.05 where
the recipe has 0, else 0), attention (train.attention: sdpa where the engine ran eager, else eager), full,
or engine ones joined with + (dropout+attention: both at once);
"default" = gc, group, bs4, bs16, precision, loss; "all", or "none"), --quick (2 steps, no
ablations: a smoke of a few minutes), --recipe FILE (a recipe on the embedded model), --output FILE,
--keep (keep the temporary run folder and the per-variant logs), --repeats R (R rounds of the engine and its
ablations, the order rotated each round; each ablation is then reported as its median ratio to the engine row of
its own round, which the machine's drift affects far less than a ratio between rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("gc", "group", "bs4", "bs16", "precision", "loss", "compile", "dropout", "attention", "full")
DEFAULT_ABLATIONS = ("gc", "group", "bs4", "bs16", "precision", "loss")  # "all" adds compile, dropout, attention and full
SLOW_BF16_FACTOR = 10.0  # bf16 matmul this many times slower than fp32: the CPU has no native bf16


# ---------------------------------------------------------------- the machine


def machine() -> dict:
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx", "fma"))),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def matmul_gflops(dtype_name: str, shapes: list[tuple[int, int, int]], seconds: float = 1.5) -> dict:
    """Best GFLOP/s of torch.mm over the given (m, k, n) shapes: 2mkn FLOPs per product, best of repeats.

    The repeat count is chosen from a first timed product, so a CPU without native bf16 (~0.3 GFLOP/s on AVX2)
    does not spend minutes here: each shape gets about `seconds` of work at most (at least one product)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    results = []
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        flops = 2.0 * m * k * n
        started = time.perf_counter()
        torch.mm(a, b)  # warm-up: oneDNN builds its kernel for the shape
        first = time.perf_counter() - started
        if first > 4 * seconds:  # hopeless (no native support): one product is the figure
            results.append({"shape": [m, k, n], "gflops": round(flops / first / 1e9, 2), "repeats": 1})
            continue
        repeats = max(3, min(200, int(seconds / max(first, 1e-4))))
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        results.append({"shape": [m, k, n], "gflops": round(flops / best / 1e9, 2), "repeats": repeats})
    return {"best_gflops": max(r["gflops"] for r in results), "shapes": results}


# ---------------------------------------------------------------- FLOPs per token


def flops_model(model_dir: Path, lora: dict, mean_context: float) -> dict:
    """Model FLOPs per trained token (recomputation by gradient checkpointing not counted, as in MFU).

    N  = parameters of every matmul the tokens go through: the 7 projections of each layer plus the LM head
         (tied to the embedding here, but it is a real 2 x d x vocab matmul per token; the embedding lookup is not).
    Nl = LoRA parameters (r x (in + out) per adapted projection).
    A  = 2 x layers x s x d_attn: attention scores + weighted sum forward per token, s = token-weighted mean
         context (a token at position i attends to i keys; sum over a sequence of length L ~ L^2/2).
    LoRA: forward 2N + 2Nl + A; backward through the frozen weights needs only input gradients, 2N (no weight
         gradients), plus 4Nl for the adapters and 2A for attention: total 4N + 6Nl + 3A.
    Full fine-tuning: 6N + 3A (the usual 6N): given for reference; the engine trains LoRA.
    """
    config = json.loads((model_dir / "config.json").read_text())
    d = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or d // heads
    d_ff = config["intermediate_size"]
    vocab = config["vocab_size"]
    d_attn = heads * head_dim
    shapes = {"q_proj": (d, d_attn), "k_proj": (d, kv_heads * head_dim), "v_proj": (d, kv_heads * head_dim), "o_proj": (d_attn, d),
              "gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d)}  # fmt: skip
    per_layer = sum(i * o for i, o in shapes.values())
    n_layers = layers * per_layer
    n_head = d * vocab
    n = n_layers + n_head
    targets = list(shapes) if lora["target_modules"] == "all-linear" else lora["target_modules"]
    n_lora = layers * sum(lora["rank"] * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    attn = 2.0 * layers * mean_context * d_attn
    return {
        "N_matmul_params": n,
        "N_layers": n_layers,
        "N_lm_head": n_head,
        "N_lora": n_lora,
        "attention_flops_fwd_per_token": round(attn),
        "mean_context_tokens": round(mean_context, 1),
        "lora_flops_per_token": round(4 * n + 6 * n_lora + 3 * attn),
        "full_flops_per_token": round(6 * n + 3 * attn),
        "formula": "LoRA: 4N + 6Nl + 3A; full: 6N + 3A; N = projection + LM-head matmul parameters, Nl = LoRA "
        "parameters, A = 2 x layers x s x d_attn (s = token-weighted mean context); recomputation not counted",
    }


# ---------------------------------------------------------------- the plain TRL script (a worker process)


def plain_worker(cfg: dict) -> int:
    """Runs in its own process: a plain SFTTrainer on the dataset stage's train split; writes cfg['result']."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    train = load_from_disk(cfg["data"], keep_in_memory=True)["train"].select_columns(["prompt", "completion"])
    lora = LoraConfig(r=cfg["lora"]["rank"], lora_alpha=cfg["lora"]["alpha"], lora_dropout=cfg["lora"]["dropout"],
                      target_modules=cfg["lora"]["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    kwargs = dict(
        output_dir=cfg["out"],
        max_steps=cfg["steps"],
        report_to="none",
        per_device_train_batch_size=cfg["batch_size"],
        include_num_input_tokens_seen="non_padding",  # measurement only: the same count the engine logs
    )
    if not torch.cuda.is_available():
        # needed to run at all: with TRL's default bf16=True and no GPU, TrainingArguments raises "Your setup
        # doesn't support bf16/gpu. You need to assign use_cpu if you want to train the model on CPU."
        kwargs["use_cpu"] = True
    model = cfg["model"]
    trainer_class = SFTTrainer
    if cfg["mode"] == "engine_settings":  # the engine's SFTConfig choices, in a plain script
        bf16 = cfg["precision"] == "bf16"
        kwargs.update(
            max_length=cfg["max_length"],
            completion_only_loss=True,
            packing=False,
            train_sampling_strategy="group_by_length",
            bf16=bf16,
            activation_checkpointing=False,
            learning_rate=cfg["learning_rate"],
            lr_scheduler_type=cfg.get("lr_scheduler", "cosine"),
            warmup_steps=cfg.get("warmup_steps", 0),
            weight_decay=cfg.get("weight_decay", 0.0),
            optim=cfg.get("optimizer", "adamw_torch"),
            max_grad_norm=cfg.get("max_grad_norm", 1.0),
            seed=cfg.get("seed", 0),
            data_seed=cfg.get("seed", 0),
            logging_steps=5,
            logging_first_step=True,
            save_steps=1000,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
        if cfg["loss"] == "plain":

            class PlainLossSFTTrainer(SFTTrainer):  # as engine/stages/train.py
                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                    inputs["use_cache"] = False
                    return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

            trainer_class = PlainLossSFTTrainer
    args = SFTConfig(**kwargs)
    trainer = trainer_class(model=model, args=args, train_dataset=train, peft_config=lora)
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    runtime = float(output.metrics.get("train_runtime") or wall)  # the Trainer's own clock, as the engine reports
    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    import resource

    result = {
        "steps": state.global_step,
        "tokens_seen": state.num_input_tokens_seen,
        "train_runtime_s": round(runtime, 2),
        "train_wall_s": round(wall, 2),
        "tokens_per_s": round(state.num_input_tokens_seen / runtime, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": output.metrics.get("train_loss"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "resolved_args": {
            "bf16": args.bf16,
            "activation_checkpointing": args.activation_checkpointing,
            "max_length": args.max_length,
            "learning_rate": args.learning_rate,
            "optim": str(getattr(args.optim, "value", args.optim)),
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "loss_type": args.loss_type,
            "completion_only_loss": args.completion_only_loss,
            "train_sampling_strategy": args.train_sampling_strategy,
            "padding_free": args.padding_free,
            "packing": args.packing,
            "logging_steps": args.logging_steps,
            "save_strategy": str(getattr(args.save_strategy, "value", args.save_strategy)),
            "model_dtype": str(next(trainer.model.parameters()).dtype),
            "trainer_class": trainer_class.__name__,
        },
    }
    Path(cfg["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- running the variants


def run_logged(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return code, time.perf_counter() - started


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_engine(name: str, recipe: str, run_dir: Path, steps: int, sets: list[str], logs: Path, env: dict) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "recipe"), "run", recipe, "--until", "train", "--force", "train", "--run-dir", str(run_dir),
           "--set", f"train.max_steps={steps}", "--set", "train.save_steps=1000", "--set", "train.logging_steps=1"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    log = logs / f"{name}.log"
    code, wall = run_logged(cmd, log, env)
    metrics_path = run_dir / "train" / "metrics.json"
    if code != 0 or not metrics_path.is_file():
        raise RuntimeError(f"{name}: `{shlex.join(cmd)}` failed (exit {code}):\n{tail(log)}")
    metrics = json.loads(metrics_path.read_text())
    keep = ("method", "learning_rate", "steps", "tokens_seen", "train_runtime_s", "train_wall_s", "first_loss", "final_loss", "mean_train_loss", "peak_rss_mb", "precision", "attention")
    out = {k: metrics.get(k) for k in keep}
    out["tokens_per_s"] = round(metrics["tokens_seen"] / metrics["train_runtime_s"], 1)  # same formula as the plain script
    out["engine_reported_tokens_per_s"] = metrics.get("tokens_per_s")
    out["after_step1_tokens_per_s"] = after_first_step_rate(run_dir / "train" / "log_history.json")
    return {**out, "process_wall_s": round(wall, 1), "command": shlex.join(cmd[1:])}


def after_first_step_rate(log_history: Path) -> float | None:
    """tokens/s from the first logged step to the last: leaves out step 1 (oneDNN set-up, torch.compile's
    compilation), which at a few steps weighs on the whole-run figure. None without two logged points."""
    try:
        points = [e for e in json.loads(log_history.read_text()) if "num_input_tokens_seen" in e and "train_runtime" in e]
    except (OSError, ValueError):
        return None
    if len(points) < 2 or points[-1]["train_runtime"] <= points[0]["train_runtime"]:
        return None
    first, last = points[0], points[-1]
    return round((last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (last["train_runtime"] - first["train_runtime"]), 1)


def run_plain(name: str, cfg: dict, logs: Path, env: dict, tmp: Path) -> dict:
    cfg = {**cfg, "out": str(tmp / f"out-{name}"), "result": str(tmp / f"{name}.json")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    log = logs / f"{name}.log"
    code, wall = run_logged(cmd, log, env)
    if code != 0 or not Path(cfg["result"]).is_file():
        raise RuntimeError(f"{name}: the plain TRL script failed (exit {code}):\n{tail(log)}")
    shutil.rmtree(cfg["out"], ignore_errors=True)
    return {**json.loads(Path(cfg["result"]).read_text()), "process_wall_s": round(wall, 1)}


def mean_context(data_dir: Path, model_dir: Path, max_length: int) -> float:
    """Token-weighted mean sequence length of the train split (prompt + completion + EOS, cut at max_length)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    train = load_from_disk(str(data_dir))["train"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = tok(list(train["prompt"]), add_special_tokens=False)["input_ids"]
    lines = tok(list(train["completion"]), add_special_tokens=False)["input_ids"]
    lengths = [min(len(p) + len(c) + 1, max_length) for p, c in zip(prompts, lines)]
    return sum(x * x for x in lengths) / max(1, sum(lengths))


def paired_ratios(rows: list[dict]) -> dict:
    """Each engine ablation's tokens/s over the engine row of the same round (rows carry "round"; the first pass is
    round 1): median, lowest and highest per variant. Empty with a single round."""
    import statistics

    rounds: dict[int, dict[str, float]] = {}
    for row in rows:
        if row["kind"] == "engine" and not row["variant"].startswith("engine again"):
            rounds.setdefault(row.get("round", 1), {})[row["variant"]] = row["tokens_per_s"]
    if len(rounds) < 2:
        return {}
    ratios: dict[str, list[float]] = {}
    for figures in rounds.values():
        for variant, rate in figures.items():
            if variant != "engine" and figures.get("engine"):
                ratios.setdefault(variant, []).append(rate / figures["engine"])
    return {variant: {"median": round(statistics.median(values), 3), "low": round(min(values), 3), "high": round(max(values), 3), "rounds": len(values)}
            for variant, values in ratios.items()}  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = any("round" in r for r in rows)  # --repeats: the same variant several times, one bar per round
    names = [r["variant"] + (f", round {r.get('round', 1)}" if rounds and r["kind"] == "engine" and not r["variant"].startswith("engine again") else "")
             for r in rows][::-1]  # fmt: skip
    values = [r["tokens_per_s"] for r in rows][::-1]
    colors = ["tab:blue" if r["kind"] == "engine" else "tab:orange" for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    bars = ax.barh(names, values, color=colors)
    for bar, row in zip(bars, rows[::-1]):
        label = f"{row['tokens_per_s']:.0f}"
        if row.get("peak_fraction") is not None:
            label += f"  ({100 * row['peak_fraction']:.1f} % of {row['precision']} matmul peak)"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlabel("non-padding tokens / s of the training loop (blue: engine CLI, orange: plain TRL script)")
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/shakespeare_falstaff.yaml")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 6; 2 with --quick)")
    parser.add_argument("--ablations", default=None, help=f"comma-separated from {', '.join(ABLATIONS)}, or engine ones joined with + (dropout+attention); 'default' ({','.join(DEFAULT_ABLATIONS)}), 'all' or 'none' (default: default; none with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the engine and its ablations (rotated order); >1 reports each ablation's median ratio to the engine row of its own round")
    parser.add_argument("--quick", action="store_true", help="2 steps, engine vs TRL defaults only: a ~2-minute smoke")
    parser.add_argument("--output", default=str(ROOT / "bench" / "train_throughput.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: the output's name with .png)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder and the logs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return plain_worker(json.loads(args.worker))

    steps = args.steps or (2 if args.quick else 6)
    chosen = args.ablations or ("none" if args.quick else "default")
    ablations = list(ABLATIONS) if chosen == "all" else list(DEFAULT_ABLATIONS) if chosen == "default" else [] if chosen == "none" else [a.strip() for a in chosen.split(",") if a.strip()]
    # "a+b" changes two engine keys at once (e.g. dropout+attention); "loss" runs the plain script, so it stays alone
    unknown = [a for a in ablations if any(part not in ABLATIONS for part in a.split("+")) or ("+" in a and "loss" in a.split("+"))]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if unknown:
        parser.error(f"unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")

    host = machine()  # before the work: the load average says how quiet the machine was
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not env.get("RECIPE_DATA_PATH") and (ROOT.parent / "shared" / "data").is_dir():
        env["RECIPE_DATA_PATH"] = str(ROOT.parent / "shared" / "data")
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")})
    sys.path.insert(0, str(ROOT))
    # only engine.models in this process: everything else goes through the `recipe` CLI, so the figures are those
    # of whatever the train stage does today, and an engine module being edited cannot break the main process
    from engine.models import ModelConfig, resolve_base_model

    recipe_path = args.recipe if Path(args.recipe).is_absolute() else str(ROOT / args.recipe)
    started = time.perf_counter()
    model_dir = resolve_base_model(ModelConfig())  # the embedded SmolLM2-135M-Instruct; converts once (~50 s, excluded)
    print(f"model: {model_dir} ({time.perf_counter() - started:.1f} s to resolve)", flush=True)

    # 1. the machine's matmul limit
    config = json.loads((model_dir / "config.json").read_text())
    shapes = [(2048, 2048, 2048), (1600, config["hidden_size"], config["intermediate_size"])]  # 1600 = batch 8 x ~200 tokens
    print("matmul throughput (torch.mm, best of repeats) ...", flush=True)
    peaks = {name: matmul_gflops(name, shapes) for name in ("fp32", "bf16")}
    for name, peak in peaks.items():
        print(f"  {name}: {peak['best_gflops']:.1f} GFLOP/s  " + ", ".join(f"{'x'.join(map(str, s['shape']))}: {s['gflops']}" for s in peak["shapes"]), flush=True)
    slow_bf16 = peaks["bf16"]["best_gflops"] * SLOW_BF16_FACTOR < peaks["fp32"]["best_gflops"]

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-throughput-"))
    logs = tmp / "logs"
    logs.mkdir()
    run_dir = tmp / "run"
    rows: list[dict] = []
    try:
        # 2. the data: source -> clean -> dataset through the CLI, once (cached for every engine variant)
        cmd = [str(ROOT / ".venv" / "bin" / "recipe"), "run", recipe_path, "--until", "dataset", "--run-dir", str(run_dir)]
        code, wall = run_logged(cmd, logs / "dataset.log", env)
        data_dir = run_dir / "dataset" / "data"
        if code != 0 or not data_dir.is_dir():
            raise RuntimeError(f"the dataset stage failed (exit {code}):\n{tail(logs / 'dataset.log')}")
        from datasets import load_from_disk

        n_train = len(load_from_disk(str(data_dir))["train"])
        print(f"dataset: {n_train} train samples ({wall:.1f} s)", flush=True)

        def record(variant: str, kind: str, what: str, result: dict) -> None:
            max_length = result.get("resolved_args", {}).get("max_length", train_cfg["max_length"]) or 1024
            row = {"variant": variant, "kind": kind, "what": what, "max_length": max_length, "method": result.get("method") or "lora", **result}
            rows.append(row)
            print(f"  -> {result['tokens_per_s']} tokens/s ({result['tokens_seen']} tokens, {result['steps']} steps, "
                  f"{result['train_runtime_s']} s, {result['precision']}, process {result['process_wall_s']} s)", flush=True)  # fmt: skip

        # 3. the engine as configured, then TRL's defaults
        print(f"[engine] recipe settings, {steps} steps ...", flush=True)
        engine_result = run_engine("engine", recipe_path, run_dir, steps, [], logs, env)
        # the train and model sections as the engine resolved them (includes, defaults), from the stage record
        material = json.loads((run_dir / "train" / ".stage.json").read_text())["material"]["config"]
        train_cfg, model_cfg = material["train"], material["model"]
        if model_cfg.get("base") != "embedded" or model_cfg.get("random_init") or model_cfg.get("config_overrides"):
            raise RuntimeError(f"this benchmark compares on the embedded model; the recipe's model section is {model_cfg}")
        lora = {k: train_cfg["lora"][k] for k in ("rank", "alpha", "dropout", "target_modules")}
        flops_by_length = {ml: flops_model(model_dir, lora, mean_context(data_dir, model_dir, ml))
                           for ml in sorted({train_cfg["max_length"], 1024})}  # fmt: skip
        record("engine", "engine", "the recipe as it is", engine_result)
        engine_precision = rows[0]["precision"]
        plain_base = {"model": str(model_dir), "data": str(data_dir), "lora": lora, "batch_size": train_cfg["batch_size"],
                      "max_length": train_cfg["max_length"], "learning_rate": engine_result.get("learning_rate") or train_cfg.get("learning_rate") or 2e-4,
                      **{k: train_cfg[k] for k in ("lr_scheduler", "warmup_steps", "weight_decay", "optimizer", "max_grad_norm", "seed") if k in train_cfg}}  # fmt: skip
        plain_steps = min(steps, 2) if slow_bf16 else steps
        note = f" (only {plain_steps}: this CPU has no native bf16 and TRL defaults to bf16)" if plain_steps != steps else ""
        print(f"[trl defaults] plain SFTTrainer script, {plain_steps} steps{note} ...", flush=True)
        record("trl defaults", "plain", "SFTConfig defaults + batch size, LoRA as the recipe",
               run_plain("trl_defaults", {**plain_base, "mode": "defaults", "steps": plain_steps}, logs, env, tmp))  # fmt: skip

        # 4. ablations: one engine choice changed at a time
        other_dropout = "0" if lora["dropout"] else "0.05"  # the dropout ablation flips the recipe's choice
        other_attention = "sdpa" if engine_result.get("attention") == "eager" else "eager"  # and so does attention
        engine_ablations = {
            "gc": ("engine, gradient checkpointing on", ["train.gradient_checkpointing=true"]),
            "group": ("engine, group_by_length off", ["train.group_by_length=false"]),
            "bs4": ("engine, batch size 4", ["train.batch_size=4"]),
            "bs16": ("engine, batch size 16", ["train.batch_size=16"]),
            "precision": (f"engine, {'fp32' if engine_precision == 'bf16' else 'bf16'}",
                          [f"train.precision={'fp32' if engine_precision == 'bf16' else 'bf16'}"]),
            "compile": ("engine, torch.compile", ["train.sft_args.torch_compile=true"]),
            "dropout": (f"engine, LoRA dropout {other_dropout}", [f"train.lora.dropout={other_dropout}"]),
            "attention": (f"engine, {other_attention} attention", [f"train.attention={other_attention}"]),
            "full": ("engine, full fine-tuning", ["train.method=full"]),
        }  # fmt: skip
        for key in ablations:
            if "+" in key:
                parts = [engine_ablations[part] for part in key.split("+")]
                engine_ablations[key] = ("engine, " + " + ".join(label.removeprefix("engine, ") for label, _ in parts),
                                         [item for _, sets in parts for item in sets])  # fmt: skip
            if key in engine_ablations:
                label, sets = engine_ablations[key]
                n = min(steps, 2) if key == "precision" and engine_precision == "fp32" and slow_bf16 else steps
                print(f"[{label}] {n} steps ...", flush=True)
                record(label, "engine", " ".join(f"--set {s}" for s in sets),
                       run_engine(key, recipe_path, run_dir, n, sets, logs, env))  # fmt: skip
            elif key == "loss":
                for loss, label in (("plain", "plain script, engine settings, plain loss"), ("trl", "plain script, engine settings, TRL loss")):
                    print(f"[{label}] {steps} steps ...", flush=True)
                    cfg = {**plain_base, "mode": "engine_settings", "loss": loss, "precision": engine_precision, "steps": steps}
                    record(label, "plain", f"engine's SFTConfig choices, {loss} loss", run_plain(f"loss_{loss}", cfg, logs, env, tmp))
        # 5. more rounds: the engine and its ablations again, in a rotated order, so that each ablation can be compared
        # with the engine row of its own round (the machine's speed drifts by as much as the effects measured)
        engine_keys = [key for key in ablations if key in engine_ablations]
        for round_index in range(1, args.repeats):
            order = ["engine", *engine_keys]
            order = order[round_index % len(order):] + order[:round_index % len(order)]
            for key in order:
                label, sets = ("engine", []) if key == "engine" else engine_ablations[key]
                print(f"[round {round_index + 1}: {label}] {steps} steps ...", flush=True)
                record(label, "engine", " ".join(f"--set {s}" for s in sets) or "the recipe as it is",
                       run_engine(f"{key}_round{round_index + 1}", recipe_path, run_dir, steps, sets, logs, env))  # fmt: skip
                rows[-1]["round"] = round_index + 1
        if ablations and args.repeats == 1:
            # a shared machine's speed drifts (2026-11-30: TRL defaults ran at 96.8 tokens/s in one invocation and
            # 163.8 twenty minutes later): the engine once more at the end says how far the ratios can be trusted
            print(f"[engine again] drift check, {steps} steps ...", flush=True)
            record("engine again (drift check)", "engine", "the recipe as it is, after the ablations",
                   run_engine("engine_again", recipe_path, run_dir, steps, [], logs, env))  # fmt: skip
        # 6. the limit drifts with the machine too (2026-11-30: bf16 691 to 2399 GFLOP/s on the same machine name):
        # measured again after the runs, and the % below is of the higher of the two, so it is never flattered
        print("matmul throughput again, after the runs ...", flush=True)
        peaks_after = {name: matmul_gflops(name, shapes) for name in ("fp32", "bf16")}
        for name, peak in peaks_after.items():
            print(f"  {name}: {peak['best_gflops']:.1f} GFLOP/s (before: {peaks[name]['best_gflops']:.1f})", flush=True)
            if peak["best_gflops"] > peaks[name]["best_gflops"]:
                peaks[name] = {**peak, "before_runs_gflops": peaks[name]["best_gflops"]}
            else:
                peaks[name] = {**peaks[name], "after_runs_gflops": peak["best_gflops"]}
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # 7. FLOPs per token and the two ratios
    for row in rows:
        flops = flops_by_length[row["max_length"]]
        peak = peaks.get(row["precision"], {}).get("best_gflops")
        row["flops_per_token"] = flops["full_flops_per_token" if row.get("method") == "full" else "lora_flops_per_token"]
        row["model_gflops"] = round(row["tokens_per_s"] * row["flops_per_token"] / 1e9, 2)
        row["peak_fraction"] = round(row["model_gflops"] / peak, 4) if peak else None
        row["fp32_peak_fraction"] = round(row["model_gflops"] / peaks["fp32"]["best_gflops"], 4)
    engine, trl = rows[0], rows[1]
    vs_trl = round(engine["tokens_per_s"] / trl["tokens_per_s"], 2)

    header = f"{'variant':<44} {'tok/s':>7} {'>step1':>7} {'x engine':>8} {'tokens':>7} {'steps':>5} {'train s':>8} {'prec':>5} {'GFLOP/s':>8} {'% peak':>7} {'RSS MB':>7}"
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        share = f"{100 * row['peak_fraction']:.1f}" if row["peak_fraction"] is not None else "-"
        later = row.get("after_step1_tokens_per_s")
        print(f"{row['variant']:<44} {row['tokens_per_s']:>7.1f} {later if later is not None else '-':>7} {row['tokens_per_s'] / engine['tokens_per_s']:>8.2f} {row['tokens_seen']:>7} "
              f"{row['steps']:>5} {row['train_runtime_s']:>8.1f} {row['precision']:>5} {row['model_gflops']:>8.1f} {share:>7} {row['peak_rss_mb']:>7.0f}")  # fmt: skip
    print()
    print(f"engine / TRL defaults: {vs_trl}x ({engine['tokens_per_s']} vs {trl['tokens_per_s']} tokens/s)")
    print(f"engine vs the {engine['precision']} matmul limit: {engine['model_gflops']} of {peaks[engine['precision']]['best_gflops']} GFLOP/s "
          f"= {100 * engine['peak_fraction']:.1f} % (LoRA, {flops_by_length[engine['max_length']]['lora_flops_per_token'] / 1e6:.0f} MFLOP/token)")  # fmt: skip
    again = next((row for row in rows if row["variant"].startswith("engine again")), None)
    if again:
        drift = again["tokens_per_s"] / engine["tokens_per_s"]
        print(f"drift: the engine ran at {again['tokens_per_s']} tokens/s after the ablations, {drift:.2f}x its first run: "
              f"ratios nearer 1 than {abs(drift - 1):.2f} are within the machine's drift")  # fmt: skip
    paired = paired_ratios(rows)
    if paired:
        print("ratio to the engine row of the same round (median, lowest and highest over the rounds):")
        for variant, summary in paired.items():
            print(f"  {variant:<44} {summary['median']:.2f}x  ({summary['low']:.2f} to {summary['high']:.2f}, {summary['rounds']} rounds)")
    if trl["steps"] != engine["steps"]:
        print(f"note: TRL defaults ran {trl['steps']} steps, the engine {engine['steps']}")

    command = "RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/train_throughput.py" + "".join(
        f" {shlex.quote(arg)}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    report = {
        "command": command,
        "recipe": args.recipe,
        "train_config": train_cfg,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**host, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "libraries": library_versions(),
        "steps": steps,
        "train_samples": n_train,
        "token_count": "trainer.state.num_input_tokens_seen with include_num_input_tokens_seen='non_padding' (sum of attention "
        "masks: prompt + completion + EOS after truncation), over the wall time of trainer.train()",
        "matmul_gflops": peaks,
        "flops_per_token": {str(k): v for k, v in flops_by_length.items()},
        "engine_vs_trl_defaults": vs_trl,
        "engine_drift": round(again["tokens_per_s"] / engine["tokens_per_s"], 3) if again else None,
        "engine_peak_fraction": engine["peak_fraction"],
        "engine_peak_dtype": engine["precision"],
        "paired_ratios": paired,
        "variants": rows,
    }
    Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    png = Path(args.plot) if args.plot else Path(args.output).with_suffix(".png")
    plot(rows, png, f"SmolLM2-135M LoRA SFT, {steps} steps per variant, batch {train_cfg['batch_size']}: engine {vs_trl}x TRL defaults\n"
         f"{host['cpu_model']}, {host['nproc']} cores, load average at start {host['load_average_at_start'][0]:.2f}")  # fmt: skip
    print(f"wrote {args.output} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
