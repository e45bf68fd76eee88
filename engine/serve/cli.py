"""`recipe serve` and `recipe chat`: click commands only; models, torch and fastapi load inside the commands."""

from __future__ import annotations

import os
import sys

import click

from engine.serve.config import PRECISIONS

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
API_KEY_ENV = "RECIPE_API_KEY"

targets_argument = click.argument("targets", metavar="RECIPE|EXPORT_DIR...", nargs=-1, required=True, type=click.Path())
run_dir_option = click.option("--run-dir", "run_dirs", multiple=True, type=click.Path(file_okay=False), help="Where a recipe ran (default runs/<name>); one per recipe, in order.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe key, e.g. --set serve.temperature=0.3. Repeatable.")
precision_option = click.option("--precision", type=click.Choice(PRECISIONS), help="Weights in memory (default: the recipe's serve.precision; auto = bf16 on CUDA, fp32 on CPU).")
device_option = click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), help="Where the model runs (default: the recipe's serve.device).")
trust_option = click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own code (export folders only; a recipe says model.trust_remote_code).")


def load_engines(targets, run_dirs, overrides, precision, device, trust_remote_code, echo=True):
    from engine.serve.models import Engine, resolve_targets

    characters = resolve_targets(tuple(targets), tuple(run_dirs), tuple(overrides), trust_remote_code)
    engines = {}
    for character in characters:
        engine = Engine(character, precision=precision, device=device)
        engines[character.id] = engine
        if echo:
            click.echo(f"loaded {character.id} ({character.name}) from {character.path}: {engine.precision} on {engine.device}, context {engine.max_context}", err=True)
    return engines


@click.command()
@targets_argument
@run_dir_option
@set_option
@precision_option
@device_option
@trust_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but localhost exposes the API to the network.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar=API_KEY_ENV, help=f"Require 'Authorization: Bearer KEY' on every /v1 route (or set ${API_KEY_ENV}).")
@click.option("--max-request-bytes", default=1_000_000, show_default=True, type=int, help="Largest request body accepted (413 above).")
@click.option("--max-queue", default=16, show_default=True, type=int, help="Requests that may wait per model (503 above); generation runs one at a time per model.")
def serve(targets, run_dirs, overrides, precision, device, trust_remote_code, host, port, api_key, max_request_bytes, max_queue) -> None:
    """Serve exported personas: an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions,
    streaming over SSE) and a chat page at /. Several recipes serve several characters; a request's `model`
    picks one."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    if host not in LOCAL_HOSTS:
        click.secho(
            f"warning: binding {host}: the API is reachable from the network"
            + ("" if api_key else "; no API key is set (--api-key or $" + API_KEY_ENV + "), so anyone who reaches it can use it"),
            fg="yellow",
            err=True,
        )
    import uvicorn

    from engine.serve.app import create_app

    engines = load_engines(targets, run_dirs, overrides, precision, device, trust_remote_code)
    for engine in engines.values():
        engine.max_queue = max_queue
    app = create_app(engines, api_key=api_key or None, max_request_bytes=max_request_bytes)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {', '.join(engines)} at http://{shown}:{port}/ (API: http://{shown}:{port}/v1){' with an API key' if api_key else ''}", err=True)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


@click.command()
@click.argument("target", metavar="RECIPE|EXPORT_DIR", type=click.Path())
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where the recipe ran (default runs/<name>).")
@set_option
@precision_option
@device_option
@trust_option
@click.option("--max-tokens", type=int, help="Reply length (default: the recipe's serve.max_tokens).")
@click.option("--temperature", type=float, help="Sampling temperature (default: the recipe's serve.temperature).")
def chat(target, run_dir, overrides, precision, device, trust_remote_code, max_tokens, temperature) -> None:
    """Chat with a persona in the terminal: streaming replies, history, /reset, /system TEXT, /quit."""
    import warnings

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.serve.chat import run_chat

    engines = load_engines((target,), (run_dir,) if run_dir else (), overrides, precision, device, trust_remote_code)
    overrides_ = {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature}.items() if v is not None}
    run_chat(next(iter(engines.values())), overrides_, sys.stdin, sys.stdout)
