"""How the train stage starts its processes: the recipe's `launch:` section and the command it becomes.

Launchers are files in launchers/, never hidden in Python: an accelerate YAML starts processes with
`accelerate launch --config_file FILE`, a DeepSpeed JSON is handed to the HF Trainer (`deepspeed=FILE`) and
its processes are started by torchrun, and `command` is any process starter given whole (the SLURM script
passes `srun ... torchrun --nnodes ... --rdzv-endpoint ...`). Each started process runs
`python -m engine.train_worker SPEC.json`; the other stages always run once, in the calling process.

The launch section is not part of any stage's cache key: it says how to compute, not what. The global batch
(train.batch_size x gradient_accumulation_steps) is the same whatever the number of processes; each process
gets batch_size / processes samples per step, so a two-process run follows the one-process loss.

Nothing here imports torch: `recipe validate` checks a launch section instantly.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LAUNCHERS_DIR = Path(__file__).resolve().parents[1] / "launchers"
# short names for the files users reach for most; any file in launchers/ (or a path) works too
ALIASES = {
    "accelerate": "accelerate_multi_cpu.yaml",
    "accelerate_gpu": "accelerate_multi_gpu.yaml",
    "deepspeed": "deepspeed_zero2.json",
    "deepspeed_zero2": "deepspeed_zero2.json",
    "deepspeed_zero3": "deepspeed_zero3_offload.json",
    "deepspeed_zero3_offload": "deepspeed_zero3_offload.json",
}


class LaunchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    launcher: str = Field(
        "none",
        description=(
            "How training processes start: 'none' (in this process), 'torchrun', an alias (accelerate, accelerate_gpu, "
            "deepspeed, deepspeed_zero2, deepspeed_zero3_offload) or a file in launchers/ (.yaml = accelerate config, "
            ".json = DeepSpeed config) or a path to one."
        ),
    )
    num_processes: int = Field(1, ge=1, description="Processes per node (one per GPU; on CPU, each gets cores / processes threads).")
    command: Optional[str] = Field(
        None,
        description="A whole process starter, e.g. the SLURM script's 'srun torchrun --nnodes ... --rdzv-endpoint ...'; "
        "`-m engine.train_worker SPEC` is appended. Replaces the launcher's own starter (a DeepSpeed JSON still applies).",
    )
    main_process_port: Optional[int] = Field(
        None, ge=1, le=65535, description="Port of the local rendezvous (accelerate, torchrun); null = a free port."
    )

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, value: str) -> str:
        if value not in ("none", "torchrun"):
            resolve_launcher_file(value)  # raises ValueError with the choices
        return value

    @model_validator(mode="after")
    def _processes_need_a_launcher(self) -> "LaunchConfig":
        if self.launcher == "none" and self.num_processes > 1 and not self.command:
            raise ValueError(
                f"num_processes is {self.num_processes} but launcher is 'none' (one process); "
                "set launcher to accelerate (CPU or GPU) or torchrun"
            )
        return self


def available_launchers() -> list[str]:
    files = sorted(p.name for p in LAUNCHERS_DIR.glob("*") if p.suffix in (".yaml", ".json")) if LAUNCHERS_DIR.is_dir() else []
    return ["none", "torchrun", *ALIASES, *files]


def resolve_launcher_file(name: str) -> Path:
    """An alias, a file name in launchers/ or a path -> the launcher file (ValueError naming the choices)."""
    candidates = [LAUNCHERS_DIR / ALIASES[name]] if name in ALIASES else [LAUNCHERS_DIR / name, Path(name)]
    for path in candidates:
        if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
            return path.resolve()
    if "/" in name or name.endswith((".yaml", ".yml", ".json")) and not (LAUNCHERS_DIR / name).exists():
        what = "is not a file" if Path(name).exists() else "not found"
        if Path(name).is_file():
            what = "is not a .yaml, .yml or .json file"
        raise ValueError(f"launcher file '{name}' {what}; name an accelerate YAML or DeepSpeed JSON file, or one of: {', '.join(available_launchers())}")
    import difflib

    close = difflib.get_close_matches(name, available_launchers(), n=1)
    hint = f" — did you mean '{close[0]}'?" if close else "."
    raise ValueError(f"unknown launcher '{name}'{hint} Available: {', '.join(available_launchers())}")


def deepspeed_config(launch: LaunchConfig) -> Optional[Path]:
    """The DeepSpeed JSON the Trainer gets, when the launcher is one."""
    if launch.launcher in ("none", "torchrun"):
        return None
    path = resolve_launcher_file(launch.launcher)
    return path if path.suffix == ".json" else None


def is_in_process(launch: LaunchConfig) -> bool:
    return launch.launcher == "none" and not launch.command


def free_port() -> int:
    """A TCP port nobody listens on now (two runs on one machine must not share a rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_command(launch: LaunchConfig, spec: Path, python: str = sys.executable) -> list[str]:
    """The argv that starts the training processes, each running `-m engine.train_worker spec`."""
    worker = ["-m", "engine.train_worker", str(spec)]
    if launch.command:
        return shlex.split(launch.command) + worker
    port = launch.main_process_port or free_port()
    torchrun = [
        python, "-m", "torch.distributed.run", f"--nproc-per-node={launch.num_processes}",
        "--nnodes=1", f"--master-port={port}",
    ]  # fmt: skip
    if launch.launcher == "torchrun" or deepspeed_config(launch) is not None:
        return torchrun + worker
    config = resolve_launcher_file(launch.launcher)
    return [
        python, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(launch.num_processes), "--main_process_port", str(port),
        *worker,
    ]  # fmt: skip
