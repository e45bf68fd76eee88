"""What `recipe serve` and `recipe chat` serve: characters (a recipe's persona + its exported model), loaded at
one precision each, and generation with streaming, stop strings and cancellation.

A *target* is a recipe file (its export is `<run dir>/export/model`, the run dir being `runs/<name>` unless
given), a run folder (holding `export/model`) or an export folder itself. From a recipe the persona is the
recipe's `character` section and the defaults its `serve` section; from a folder alone they are read back from
what the export stage wrote: the Modelfile (SYSTEM, stop and sampling parameters) and the model card (name,
first message).

Generation is plain `model.generate` with a streamer, one at a time per model: each character has a
one-thread executor (the queue) in front of its model, so concurrent requests wait their turn; torch uses the
machine's cores for each one. Nothing here imports fastapi; torch and transformers are imported when a model
is loaded.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from engine.errors import RecipeUserError
from engine.serve.config import ServeConfig

MAX_DEFAULT_CONTEXT = 8192


class ServeError(RecipeUserError):
    """A target that cannot be served (no export, unknown precision on this machine, ...)."""


@dataclass
class Character:
    """One served persona: the model folder and everything a request falls back to."""

    id: str
    name: str
    path: Path
    system: Optional[str]
    first_message: Optional[str]
    config: ServeConfig
    stop: list[str] = field(default_factory=list)
    repetition_penalty: Optional[float] = None
    trust_remote_code: bool = False
    source: str = ""

    def defaults(self) -> dict:
        """Sampling defaults as the API names them (shown by /v1/models and the chat page)."""
        cfg = self.config
        return {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty if cfg.repetition_penalty is not None else self.repetition_penalty,
            "max_tokens": cfg.max_tokens,
            "stop": list(self.stop),
        }


# ---------------------------------------------------------------- reading an export back


def _modelfile_values(text: str, key: str) -> list[str]:
    """Values of `KEY value` lines of an Ollama Modelfile: "..." / \"\"\"...\"\"\" quoted, or bare."""
    found = []
    pattern = re.compile(rf'^{key}\s+("""(.*?)"""|"([^"\n]*)"|(\S.*?))\s*$', re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(text):
        value = next(group for group in match.groups()[1:] if group is not None)
        found.append(value)
    return found


def read_modelfile(folder: Path) -> dict:
    """SYSTEM, stops and PARAMETERs of the export's Modelfile ({} when there is none)."""
    path = folder / "Modelfile"
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    facts: dict[str, Any] = {"stop": [], "parameters": {}}
    system = _modelfile_values(text, "SYSTEM")
    if system:
        facts["system"] = system[0]
    for value in _modelfile_values(text, "PARAMETER"):
        name, _, rest = value.partition(" ")
        rest = rest.strip()
        if name == "stop":
            facts["stop"].append(rest[3:-3] if rest.startswith('"""') else rest.strip('"'))
        else:
            try:
                facts["parameters"][name] = float(rest)
            except ValueError:
                pass
    return facts


def read_card(folder: Path) -> dict:
    """The shown name, recipe name and first message from the export's model card (README.md)."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except OSError:
        return {}
    facts = {}
    title = re.search(r"^# (.+?): a persona model from the recipe `([^`]+)`", text, flags=re.MULTILINE)
    if title:
        facts["name"], facts["recipe"] = title.group(1), title.group(2)
    first = re.search(r"^First message: (.+)$", text, flags=re.MULTILINE)
    if first:
        facts["first_message"] = first.group(1).strip()
    return facts


def export_folder_of(path: Path) -> Optional[Path]:
    """An export model folder at `path`, or under it as export/model (a run folder)."""
    for candidate in (path, path / "model", path / "export" / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def character_from_folder(folder: Path, config: Optional[ServeConfig] = None, trust_remote_code: bool = False) -> Character:
    model_dir = export_folder_of(folder)
    if model_dir is None:
        raise ServeError(f"{folder} holds no exported model (config.json, or export/model/config.json); run `recipe run RECIPE` first")
    modelfile = read_modelfile(model_dir)
    card = read_card(model_dir)
    config = config or ServeConfig()
    params = modelfile.get("parameters", {})
    updates = {}
    if "temperature" in params and "temperature" not in config.model_fields_set:
        updates["temperature"] = params["temperature"]
    if "top_p" in params and "top_p" not in config.model_fields_set:
        updates["top_p"] = params["top_p"]
    config = config.model_copy(update=updates)
    recipe_name = card.get("recipe") or (model_dir.parents[1].name if model_dir.name == "model" and model_dir.parent.name == "export" else model_dir.name)
    return Character(
        id=config.model_id or recipe_name,
        name=card.get("name") or recipe_name,
        path=model_dir,
        system=modelfile.get("system"),
        first_message=card.get("first_message"),
        config=config,
        stop=list(config.stop) if config.stop is not None else modelfile.get("stop", []),
        repetition_penalty=params.get("repeat_penalty"),
        trust_remote_code=trust_remote_code,
        source=str(folder),
    )


def character_from_recipe(recipe_path: str, run_dir: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Character:
    from engine.recipe import load_recipe

    recipe = load_recipe(recipe_path, tuple(overrides))
    folder = Path(run_dir) if run_dir else Path("runs") / recipe.name
    model_dir = folder / "export" / "model"
    if not (model_dir / "config.json").is_file():
        raise ServeError(
            f"{recipe_path}: no exported model in {model_dir}; run `recipe run {recipe_path} --until export` first"
            + ("" if run_dir else " (or pass --run-dir where it ran)")
        )
    config = getattr(recipe, "serve", None) or ServeConfig()
    modelfile = read_modelfile(model_dir)
    character = recipe.character
    penalty = getattr(getattr(recipe, "export", None), "repeat_penalty", None)
    return Character(
        id=config.model_id or recipe.name,
        name=character.shown_name,
        path=model_dir,
        system=character.system,
        first_message=character.first_message,
        config=config,
        stop=list(config.stop) if config.stop is not None else modelfile.get("stop", []),
        repetition_penalty=penalty,
        trust_remote_code=bool(recipe.model.trust_remote_code),
        source=recipe_path,
    )


def resolve_targets(targets: tuple[str, ...], run_dirs: tuple[str, ...] = (), overrides: tuple[str, ...] = (), trust_remote_code: bool = False) -> list[Character]:
    """Characters for `recipe serve A.yaml B.yaml runs/x/export/model`; --run-dir values pair with the recipes in order."""
    recipes = [t for t in targets if not Path(t).is_dir()]
    if run_dirs and len(run_dirs) != len(recipes):
        raise ServeError(f"{len(run_dirs)} --run-dir for {len(recipes)} recipe(s): give one per recipe, in the same order")
    pending = list(run_dirs)
    found: list[Character] = []
    for target in targets:
        if Path(target).is_dir():
            found.append(character_from_folder(Path(target), trust_remote_code=trust_remote_code))
        else:
            found.append(character_from_recipe(target, pending.pop(0) if pending else None, overrides))
    ids = [c.id for c in found]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ServeError(f"two targets are both served as {', '.join(duplicates)}: set serve.model_id in one of the recipes")
    return found


# ---------------------------------------------------------------- loading at a precision


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ServeError("--device cuda: torch sees no CUDA device here (this install may be the CPU wheel)")
    return wanted


def pick_precision(wanted: str, device: str) -> str:
    if wanted != "auto":
        return wanted
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def release_freed_heap() -> None:
    """Hand memory freed during loading back to the OS (glibc keeps it in its heap otherwise, and the resident
    size of an nf4 model stays above the fp32 one); a no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def copy_out_of_checkpoint_file(model: Any) -> int:
    """Give the parameters bitsandbytes left unquantized (embeddings, norms) their own memory; returns how many.

    On the CPU they are views into the memory-mapped safetensors file, and while one of them lives the whole
    mapping stays, with every page the quantizer read counted as resident: an nf4 model then held the file's
    full-precision pages on top of its 4-bit copies. Copying the few plain tensors lets the mapping close."""
    import torch

    copied = 0
    for param in model.parameters():  # a tied embedding / lm_head comes once
        if type(param) is torch.nn.Parameter and param.device.type == "cpu":  # bnb's Params4bit / Int8Params are subclasses
            param.data = param.data.clone()
            copied += 1
    return copied


def load_kwargs(precision: str, device: str) -> dict:
    """from_pretrained arguments for a precision on a device (bitsandbytes for nf4 and int8)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in dtypes:
        return {"dtype": dtypes[precision]}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ServeError(f"precision {precision} needs bitsandbytes ({exc}); install the train extra: pip install -e '.[train]'") from None
    from engine.hardware import cpu_has_bf16

    # unquantized parts (embeddings, norms) are kept in the compute dtype: bf16 halves them where the CPU has it natively
    compute = torch.bfloat16 if device == "cuda" or cpu_has_bf16() else torch.float32
    if precision == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"dtype": compute, "quantization_config": quantization, "device_map": {"": "cuda:0" if device == "cuda" else "cpu"}}


class Engine:
    """A loaded character: model, tokenizer, limits, and a one-thread executor that runs its generations in turn."""

    def __init__(self, character: Character, precision: Optional[str] = None, device: Optional[str] = None, max_queue: int = 16):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.character = character
        self.device = pick_device(device or character.config.device)
        self.precision = pick_precision(precision or character.config.precision, self.device)
        trust = character.trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(str(character.path), trust_remote_code=trust)
        kwargs = load_kwargs(self.precision, self.device)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(character.path), trust_remote_code=trust, **kwargs)
        except Exception as exc:  # bitsandbytes backends raise plain RuntimeError/ValueError/NotImplementedError
            if self.precision in ("nf4", "int8"):
                raise ServeError(f"{character.id}: cannot load at precision {self.precision} on {self.device}: {type(exc).__name__}: {exc}") from None
            raise
        if "device_map" not in kwargs:
            self.model.to(self.device)
        self.model.eval()
        if self.device == "cpu":
            if self.precision in ("nf4", "int8"):
                copy_out_of_checkpoint_file(self.model)
            release_freed_heap()  # loading at nf4 / int8 goes through the full-precision weights first
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or MAX_DEFAULT_CONTEXT
        self.max_context = character.config.max_context or min(int(positions), MAX_DEFAULT_CONTEXT)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"generate-{character.id}")
        self.max_queue = max_queue
        self.waiting = 0
        self._count_lock = threading.Lock()
        self._torch = torch

    # ------------------------------------------------ prompts

    def chat_messages(self, messages: list[dict], system: Any = None, first_message: Any = None) -> list[dict]:
        """The request's messages with the persona applied where the request does not set its own.

        system: the recipe's system prompt goes first unless the messages start with one (or the request's
        `system` extension says otherwise); first_message: the character's greeting goes before the first
        user message when the chat has no assistant turn yet (`first_message: false` in the request: never).
        """
        character = self.character
        out = [dict(m) for m in messages]
        has_system = bool(out) and out[0]["role"] == "system"
        persona_system = character.system if system is None else (system or None)
        greeting = character.first_message if first_message is None or first_message is True else (first_message or None)
        if first_message is None and not character.config.first_message:
            greeting = None
        if greeting and not any(m["role"] == "assistant" for m in out):
            at = next((i for i, m in enumerate(out) if m["role"] == "user"), len(out))
            out.insert(at, {"role": "assistant", "content": greeting})
        if not has_system and persona_system:
            out.insert(0, {"role": "system", "content": persona_system})
        return out

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]

    # ------------------------------------------------ generation

    def sampling(self, request: dict) -> dict:
        """The request's sampling values over the character's defaults (None in a request = the default)."""
        defaults = self.character.defaults()
        return {key: (request.get(key) if request.get(key) is not None else value) for key, value in defaults.items()}

    def generate_blocking(self, prompt_ids: list[int], params: dict, push: Callable[[Any], None], cancel: threading.Event) -> None:
        """Run one generation, pushing lists of new token ids, then None (or an exception, then None)."""
        torch = self._torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        class Streamer:
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() puts the prompt first
                    self.prompt_seen = True
                    return
                push(value.reshape(-1).tolist())

            def end(self):
                pass

        try:
            if cancel.is_set():
                return
            gen = self.model.generation_config
            temperature = float(params["temperature"])
            kwargs: dict[str, Any] = {
                "max_new_tokens": int(params["max_tokens"]),
                "do_sample": temperature > 0,
                "eos_token_id": gen.eos_token_id,
                "pad_token_id": gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id,
            }
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=float(params["top_p"]), top_k=int(params["top_k"]) if params.get("top_k") else 0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if params.get("repetition_penalty"):
                kwargs["repetition_penalty"] = float(params["repetition_penalty"])
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
            ids = torch.tensor([prompt_ids], device=self.model.device)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=Streamer(),
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    **kwargs,
                )
        except Exception as exc:  # reported to the request, never fatal to the server
            push(exc)
        finally:
            push(None)

    def submit(self, prompt_ids: list[int], params: dict, push: Callable[[Any], None], cancel: threading.Event):
        """Queue a generation; False when the queue is full."""
        with self._count_lock:
            if self.waiting >= self.max_queue:
                return None
            self.waiting += 1

        def run():
            try:
                self.generate_blocking(prompt_ids, params, push, cancel)
            finally:
                with self._count_lock:
                    self.waiting -= 1

        return self.executor.submit(run)

    def stream_text(self, prompt_ids: list[int], params: dict, cancel: Optional[threading.Event] = None) -> Iterator[str]:
        """Blocking stream of text deltas (the terminal chat); `.finish_reason` is set on the assembler."""
        import queue

        cancel = cancel or threading.Event()
        items: "queue.Queue[Any]" = queue.Queue()
        assembler = TextAssembler(self.tokenizer, params.get("stop") or [], int(params["max_tokens"]))
        self.last = assembler
        if self.submit(prompt_ids, params, items.put, cancel) is None:
            raise ServeError("the generation queue is full")
        try:
            while True:
                item = items.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                delta = assembler.feed(item)
                if delta:
                    yield delta
                if assembler.stopped:
                    cancel.set()
            rest = assembler.flush()
            if rest:
                yield rest
        finally:
            cancel.set()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class TextAssembler:
    """Token ids in, text deltas out: decodes incrementally, holds back what may be the start of a stop string
    (or half a UTF-8 character), and cuts the reply at the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str], max_tokens: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.max_tokens = max_tokens
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def feed(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            delta, self.sent = self.text[self.sent:], len(self.text)
            return delta
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe = min(safe, len(text[:safe]) - k)
                    break
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        ended = bool(self.ids) and self.ids[-1] in self.eos_ids
        return "length" if len(self.ids) >= self.max_tokens and not ended else "stop"
