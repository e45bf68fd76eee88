"""Benchmark `recipe serve` against `transformers serve` on the same exported model, and its memory per precision.

    RECIPE_DATA_PATH=../shared/data .venv/bin/python bench/serve.py            # makes the export if needed
    .venv/bin/python bench/serve.py --export runs/shakespeare_falstaff/export/model

Without --export it runs `recipe run recipes/shakespeare_falstaff.yaml --until export --set train.max_steps=2`
into runs/bench_serve (the real SmolLM2-135M weights, a barely trained LoRA merged in: the same size and
speed as the full recipe's export). Then, for each server in turn (fp32 on the CPU, or --device cuda):
time to first token and decode tokens/s of one streaming client (median of --repeats), and aggregate
throughput with 1, 4 and 8 concurrent streaming clients; finally the resident memory (RSS) of `recipe serve`
loaded at nf4, int8 and fp32, after one request, and what the model alone adds to a process's RSS (the
server's Engine in a fresh process: RSS after loading and one reply minus RSS before loading). Every client
is the official `openai` package; replies are greedy (temperature 0) and their tokens are counted with the
model's tokenizer, the same way for both servers.
Figures go to bench/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Good morrow, Sir John. Tell me of the battle at Shrewsbury, and of your valour there."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return time.time() - start
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server not ready in time")


def rss_mb(pid: int) -> float:
    import psutil

    process = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20, 1)


class Bench:
    def __init__(self, url: str, model: str, tokenizer, max_tokens: int, extra: dict):
        from openai import OpenAI

        self.client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        self.model, self.tokenizer, self.max_tokens, self.extra = model, tokenizer, max_tokens, extra

    def stream(self, prompt: str = PROMPT) -> dict:
        start = time.perf_counter()
        first = None
        text = ""
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=self.max_tokens, temperature=0, stream=True, extra_body=self.extra,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter()
                text += chunk.choices[0].delta.content
        end = time.perf_counter()
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        first = first or end
        return {"ttft_s": first - start, "tokens": tokens, "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None, "wall_s": end - start}

    def concurrent(self, clients: int) -> dict:
        results: list[dict] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            result = self.stream(PROMPT + f" ({i})")
            with lock:
                results.append(result)

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        tokens = sum(r["tokens"] for r in results)
        return {"clients": clients, "tokens": tokens, "wall_s": round(wall, 2), "throughput_tok_s": round(tokens / wall, 1), "mean_ttft_s": round(statistics.mean(r["ttft_s"] for r in results), 3)}


def measure(name: str, command: list[str], url: str, model: str, tokenizer, args, extra: dict) -> dict:
    print(f"== {name}: {' '.join(command)}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(url, proc)
        bench = Bench(url, model, tokenizer, args.max_tokens, extra)
        bench.stream()  # warm-up (and, for transformers serve, the model load)
        singles = [bench.stream() for _ in range(args.repeats)]
        result = {
            "ready_s": round(ready, 1),
            "ttft_s": round(statistics.median(r["ttft_s"] for r in singles), 3),
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in singles if r["decode_tok_s"]), 1),
            "tokens_per_reply": [r["tokens"] for r in singles],
            "concurrent": [bench.concurrent(n) for n in (1, 4, 8)],
            "rss_mb": rss_mb(proc.pid),
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def memory(export: Path, precision: str, device: str, tokenizer) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "engine.cli", "serve", str(export), "--precision", precision, "--device", device, "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        model = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
        Bench(url, model, tokenizer, 16, {}).stream()
        result = {"precision": precision, "rss_mb": rss_mb(proc.pid)}
        if device == "cuda":
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            result["gpu_mb"] = sum(int(line.split(",")[1]) for line in out.strip().splitlines() if line.split(",")[0].strip() == str(proc.pid))
        print(json.dumps(result), flush=True)
        return result
    finally:
        proc.terminate()
        proc.wait(15)


# Loads one character with the server's own Engine in a fresh process and prints what the model adds to the
# process: resident memory (RSS) after loading and one 16-token reply, minus the RSS once torch, transformers
# and bitsandbytes and the model's class are imported; and the bytes of its parameters.
MODEL_MEMORY_PROBE = """
import json, sys
from pathlib import Path
from engine.serve.models import Engine, character_from_folder, load_kwargs, release_freed_heap
import bitsandbytes, psutil, transformers  # imported alike for every precision: only the model counts
def rss_mb():
    return psutil.Process().memory_info().rss / 2**20
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the model's class
load_kwargs(sys.argv[2], sys.argv[3])  # and whatever choosing the precision imports
release_freed_heap()
before = rss_mb()
engine = Engine(character_from_folder(Path(sys.argv[1])), precision=sys.argv[2], device=sys.argv[3])
ids = engine.chat_prompt_ids(engine.chat_messages([{'role': 'user', 'content': 'Hello there'}]))
''.join(engine.stream_text(ids, engine.sampling({'max_tokens': 16, 'temperature': 0})))
release_freed_heap()
weights = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**20
print(json.dumps({'model_rss_mb': round(rss_mb() - before, 1), 'weights_mb': round(weights, 1), 'rss_before_load_mb': round(before, 1)}))
"""


def model_memory(export: Path, precision: str, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MODEL_MEMORY_PROBE, str(export), precision, device], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True,
    ).stdout  # fmt: skip
    result = {"precision": precision, **json.loads(out.strip().splitlines()[-1])}
    print(json.dumps(result), flush=True)
    return result


def memory_figures(export: Path, device: str, tokenizer) -> dict:
    precisions = ("nf4", "int8", "fp32")
    return {
        "memory": [memory(export, p, device, tokenizer) for p in precisions],
        "model_memory": [model_memory(export, p, device) for p in precisions],
    }


def make_export() -> Path:
    run_dir = ROOT / "runs" / "bench_serve"
    export = run_dir / "export" / "model"
    if not (export / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", "recipes/shakespeare_falstaff.yaml", "--until", "export", "--set", "train.max_steps=2", "--run-dir", str(run_dir)],
            cwd=ROOT, check=True,
        )
    return export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="An exported model folder (default: make one in runs/bench_serve).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="Only the memory figures, written into the existing --out file.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "serve.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export = (args.export or make_export()).resolve()
    from transformers import AutoTokenizer

    from engine.serve.models import character_from_folder

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    if args.memory_only:
        figures = json.loads(args.out.read_text()) if args.out.is_file() else {"export": str(export), "device": args.device}
        figures.update(memory_figures(export, args.device, tokenizer))
        figures.pop("memory_before_malloc_trim", None)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    precision = "fp32" if args.device == "cpu" else "bf16"
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    figures: dict = {
        "export": str(export), "device": args.device, "precision": precision, "max_tokens": args.max_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_start": os.getloadavg()[0]},
    }
    port = free_port()
    figures["recipe_serve"] = measure(
        "recipe serve", [sys.executable, "-m", "engine.cli", "serve", str(export), "--precision", precision, "--device", args.device, "--port", str(port)],
        f"http://127.0.0.1:{port}", character_from_folder(export).id, tokenizer, args,
        {"repetition_penalty": 1.0, "first_message": False},  # what transformers serve does: no penalty, no greeting
    )
    port = free_port()
    tserve = str(Path(sys.executable).with_name("transformers"))
    figures["transformers_serve"] = measure(
        "transformers serve", [tserve, "serve", str(export), "--device", args.device if args.device == "cpu" else "cuda:0", "--dtype", dtype, "--port", str(port), "--host", "127.0.0.1"],
        f"http://127.0.0.1:{port}", str(export), tokenizer, args, {},
    )
    if not args.skip_memory:
        figures.update(memory_figures(export, args.device, tokenizer))
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
