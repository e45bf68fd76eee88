"""One training process of a launched run: `python -m engine.train_worker SPEC.json`.

The train stage writes SPEC.json (plain JSON: the train config, model and dataset paths, the output folder,
the cache key, the checkpoint to resume from) and starts this module through the recipe's launcher
(accelerate, torchrun, DeepSpeed, srun + torchrun). Every rank trains; rank 0 prints and writes the reports.
A user error is written to <out>/worker_error.txt so the stage can report it in one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m engine.train_worker SPEC.json", file=sys.stderr)
        return 2
    from rich.console import Console

    from engine.errors import RecipeUserError
    from engine.stages.train import train_process

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    console = Console(quiet=not is_main, highlight=False)
    try:
        train_process(spec, console)
    except RecipeUserError as exc:
        if is_main:
            (Path(spec["out"]) / "worker_error.txt").write_text(str(exc) + "\n", encoding="utf-8")
        print(f"error: {exc}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
