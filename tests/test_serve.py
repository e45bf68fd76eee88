"""`recipe serve`: the OpenAI-compatible API, exercised with the official `openai` client against a running server.

The served model is the real export of `recipe run recipes/shakespeare_falstaff.yaml --smoke --until export`
(a tiny random model: replies are gibberish, the persona, limits and formats are what is checked), made once
per session and shared with tests/test_serve_browser.py and tests/test_chat.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/shakespeare_falstaff.yaml"
API_KEY = "test-key-123"
_CACHE: dict = {}


# ---------------------------------------------------------------- shared helpers (imported by the other serve tests)


def smoke_run_dir(tmp_path_factory) -> Path:
    """A run folder with the Falstaff smoke export (export/model), made once per test session."""
    # kept in the session's base temp folder: the browser and chat tests import this module under another name
    run_dir = tmp_path_factory.getbasetemp() / "serve_run" / "falstaff"
    if (run_dir / "export" / "model" / "config.json").is_file():
        _CACHE["run_dir"] = run_dir
    if "run_dir" not in _CACHE:
        from tests.conftest import need_shared_data

        data = need_shared_data()
        env = dict(os.environ, RECIPE_DATA_PATH=os.environ.get("RECIPE_DATA_PATH", str(data)))
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", RECIPE, "--smoke", "--until", "export", "--run-dir", str(run_dir)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _CACHE["run_dir"] = run_dir
    return _CACHE["run_dir"]


def second_character(run_dir: Path, folder: Path) -> Path:
    """Another persona on the same weights: a copy of the export whose card and Modelfile name Poins."""
    if not folder.exists():
        shutil.copytree(run_dir / "export" / "model", folder)
        card = (folder / "README.md").read_text(encoding="utf-8")
        card = card.replace("# Falstaff: a persona model from the recipe `shakespeare_falstaff`", "# Poins: a persona model from the recipe `poins`")
        card = card.replace("First message: Now, Hal, what time of day is it, lad?", "First message: Where shall we take a purse tomorrow, Jack?")
        (folder / "README.md").write_text(card, encoding="utf-8")
        modelfile = (folder / "Modelfile").read_text(encoding="utf-8")
        start = modelfile.index("\nSYSTEM ") + 1
        end = modelfile.index("\n", start)
        modelfile = modelfile[:start] + 'SYSTEM "You are Ned Poins, Prince Hal\'s companion."' + modelfile[end:]
        (folder / "Modelfile").write_text(modelfile, encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", *args, "--port", str(self.port)],
            cwd=ROOT, env=dict(os.environ, **(env or {})), stdout=out, stderr=subprocess.STDOUT,
        )

    def wait(self, headers: dict | None = None, timeout: float = 180) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.log.read_text() if self.log else ''}")
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + "/health", headers=headers or {}), timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not answer within the timeout")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def post(url: str, data: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---------------------------------------------------------------- the server under test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = smoke_run_dir(tmp_path_factory)
    poins = second_character(run_dir, tmp_path_factory.mktemp("poins") / "model")
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    srv = Server([RECIPE, "--run-dir", str(run_dir), str(poins), "--precision", "fp32"], env={"RECIPE_API_KEY": API_KEY}, log=log)
    try:
        yield srv.wait(headers={})
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_every_character_with_its_persona(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"shakespeare_falstaff", "poins"}
    falstaff = models["shakespeare_falstaff"].model_extra["persona"]
    assert falstaff["name"] == "Falstaff"
    assert falstaff["first_message"] == "Now, Hal, what time of day is it, lad?"
    assert "Sir John Falstaff" in falstaff["system_prompt"]
    assert falstaff["precision"] == "fp32" and falstaff["device"] == "cpu"
    assert falstaff["defaults"]["stop"] == ["<|im_end|>"]  # from the export's Modelfile
    poins = models["poins"].model_extra["persona"]
    assert poins["name"] == "Poins" and poins["system_prompt"] == "You are Ned Poins, Prince Hal's companion."
    assert poins["first_message"] == "Where shall we take a purse tomorrow, Jack?"


def test_chat_completion_not_streaming(client):
    reply = client.chat.completions.create(model="shakespeare_falstaff", messages=[{"role": "user", "content": "What news?"}], max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "shakespeare_falstaff"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streaming_matches_not_streaming(client):
    kwargs = dict(model="shakespeare_falstaff", messages=[{"role": "user", "content": "What news?"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_persona_applies_unless_the_request_overrides_it(client):
    def prompt_tokens(**extra):
        body = dict(model="shakespeare_falstaff", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        messages = extra.pop("messages", None)
        if messages:
            body["messages"] = messages
        return client.chat.completions.create(extra_body=extra, **body).usage.prompt_tokens

    default = prompt_tokens()
    no_greeting = prompt_tokens(first_message=False)
    own_system = prompt_tokens(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], first_message=False)
    assert default > no_greeting > own_system  # system prompt + first message; system prompt only; the request's own


def test_completions_streaming_and_not(client):
    reply = client.completions.create(model="poins", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="poins", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_request_stop_string_cuts_the_reply(client):
    kwargs = dict(model="shakespeare_falstaff", prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    cut_at = full.strip().split()[1] if len(full.split()) > 2 else full.strip()[2:4]
    stopped = client.completions.create(stop=[cut_at], **kwargs).choices[0]
    assert stopped.finish_reason == "stop" and cut_at not in stopped.text and full.startswith(stopped.text)


def test_errors_are_openai_shaped_4xx(client, server):
    import openai

    base = dict(model="shakespeare_falstaff", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    cases = [
        (dict(max_tokens=5000), openai.BadRequestError, "max_tokens"),
        (dict(model="nobody"), openai.NotFoundError, "model"),
        (dict(temperature="hot"), openai.BadRequestError, "temperature"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, "messages[0]"),
        (dict(messages=[{"role": "user", "content": "hello " * 9000}]), openai.BadRequestError, "messages"),
    ]
    for change, error, param in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**{**base, **change})
        body = caught.value.body
        assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{**base, "messages": [{"role": "user", "content": "hello " * 9000}]})
    assert caught.value.body["code"] == "context_length_exceeded" and "maximum context length is 8192" in caught.value.body["message"]

    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, body = post(server.url + "/v1/chat/completions", b"{not json", auth)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server.url + "/v1/chat/completions", b"[1, 2]", auth)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # a body over the limit is refused from its Content-Length, before it is read
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in {**auth, "Content-Type": "application/json", "Content-Length": "1100000"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    assert urllib.request.urlopen(server.url + "/health", timeout=5).status == 200  # still serving


def test_api_key_is_checked_on_every_api_route(server):
    from openai import AuthenticationError, OpenAI

    wrong = OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/models/poins"):
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(server.url + path, timeout=5)
        assert http.value.code == 401
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, body = post(server.url + path, b'{"prompt": "x", "messages": []}', {})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    page = urllib.request.urlopen(server.url + "/", timeout=5).read().decode()  # the page itself is public
    assert "chat.js" in page


def test_concurrent_streams_all_finish(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        stream = client.chat.completions.create(model="poins", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4, stream=True)
        return [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(len(r) == 1 for r in results)


# ---------------------------------------------------------------- without a server


def test_non_local_bind_warns_and_missing_export_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", RECIPE, "--run-dir", str(tmp_path / "nothing"), "--host", "0.0.0.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "warning: binding 0.0.0.0" in done.stderr and "no API key" in done.stderr
    assert "no exported model" in done.stderr and "recipe run recipes/shakespeare_falstaff.yaml --until export" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_config_is_light_and_validated():
    from pydantic import ValidationError

    from engine.serve.config import ServeConfig

    assert ServeConfig().precision == "auto"
    assert ServeConfig(precision="nf4", stop=["\n"]).stop == ["\n"]
    with pytest.raises(ValidationError):
        ServeConfig(precision="int4")
    with pytest.raises(ValidationError):
        ServeConfig(temperture=1)
    done = subprocess.run([sys.executable, "-c", "import sys, engine.serve.config, engine.serve.cli; print([m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules])"], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "[]"


class _Chars:
    """A tokenizer stand-in: one character per token id."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_text_assembler_holds_back_and_cuts_at_stop_strings():
    from engine.serve.models import TextAssembler

    assembler = TextAssembler(_Chars(), ["\nHAL:"], max_tokens=100)
    out = [assembler.feed([ord(c)]) for c in "Ay, lad.\nHAL: more"]
    assert "".join(out) == "Ay, lad." and assembler.stopped and assembler.finish_reason == "stop"
    assembler = TextAssembler(_Chars(), ["\nHAL:"], max_tokens=5)
    text = "".join(assembler.feed([ord(c)]) for c in "a\nHb")
    assert text + assembler.flush() == "a\nHb" and not assembler.stopped
    assembler.feed([ord("c")])
    assert assembler.finish_reason == "length"


def test_exported_folder_facts_are_read_back(tmp_path_factory):
    from engine.serve.models import character_from_folder, character_from_recipe

    run_dir = smoke_run_dir(tmp_path_factory)
    folder = character_from_folder(run_dir)  # a run folder: its export/model
    recipe = character_from_recipe(RECIPE, str(run_dir))
    assert folder.path == recipe.path == run_dir / "export" / "model"
    assert (folder.id, folder.name, folder.first_message) == (recipe.id, recipe.name, recipe.first_message)
    assert folder.system == recipe.system and folder.stop == recipe.stop == ["<|im_end|>"]
    assert folder.defaults()["repetition_penalty"] == recipe.defaults()["repetition_penalty"] == 1.3


def in_mapped_file(param, path: Path) -> bool:
    """Whether a tensor's memory lies in a region of this process mapped from the file at path."""
    target = str(path.resolve())
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.append((start, end))
    return any(start <= param.data_ptr() < end for start, end in regions)


def test_in_mapped_file_sees_a_tensor_loaded_from_safetensors(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from engine.serve.models import character_from_folder, copy_out_of_checkpoint_file

    folder = character_from_folder(smoke_run_dir(tmp_path_factory)).path
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32")  # plain load: views of the mapped file
    embedding = model.get_input_embeddings().weight
    assert in_mapped_file(embedding, folder / "model.safetensors")
    assert copy_out_of_checkpoint_file(model) >= 1
    assert not in_mapped_file(embedding, folder / "model.safetensors")


@pytest.mark.parametrize("precision", ["nf4", "int8", "bf16"])
def test_precisions_load_and_generate_on_cpu(tmp_path_factory, precision):
    from engine.serve.models import Engine, character_from_folder

    character = character_from_folder(smoke_run_dir(tmp_path_factory))
    engine = Engine(character, precision=precision, device="cpu")
    try:
        ids = engine.chat_prompt_ids(engine.chat_messages([{"role": "user", "content": "Hi"}]))
        text = "".join(engine.stream_text(ids, engine.sampling({"max_tokens": 3, "temperature": 0})))
        assert isinstance(text, str) and engine.last.completion_tokens <= 3
        if precision == "nf4":
            import torch

            assert any(type(m).__name__ == "Linear4bit" for m in engine.model.modules())
            assert torch.float32 not in {p.dtype for n, p in engine.model.named_parameters() if "layers.0.mlp" in n}
        if precision == "int8":
            assert any(type(m).__name__ == "Linear8bitLt" for m in engine.model.modules())
        if precision in ("nf4", "int8"):  # no unquantized tensor still lives in the mapped fp32 file
            checkpoint = character.path / "model.safetensors"
            assert not [name for name, param in engine.model.named_parameters() if in_mapped_file(param, checkpoint)]
    finally:
        engine.close()


@pytest.mark.parametrize("has_bf16", [True, False])
def test_quantized_cpu_load_keeps_unquantized_parts_in_bf16_only_where_the_cpu_has_it(monkeypatch, has_bf16):
    import torch

    import engine.hardware
    from engine.serve.models import load_kwargs

    monkeypatch.setattr(engine.hardware, "cpu_has_bf16", lambda: has_bf16)
    expected = torch.bfloat16 if has_bf16 else torch.float32
    nf4 = load_kwargs("nf4", "cpu")
    assert nf4["dtype"] == expected and nf4["quantization_config"].bnb_4bit_compute_dtype == expected
    assert load_kwargs("int8", "cpu")["dtype"] == expected
    assert load_kwargs("fp32", "cpu") == {"dtype": torch.float32}
