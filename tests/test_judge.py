"""The optional judge against a local OpenAI-compatible server started here (http.server on 127.0.0.1): the
protocol (model, rubric + transcript in the messages, the key from the environment), reading scores, the means,
malformed replies and a failing server.

    python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
from pydantic import ValidationError

from engine.errors import StageError
from engine.judge import DIMENSIONS, RUBRIC, JudgeConfig, judge_interviews, judge_messages, parse_score
from engine.persona import CharacterConfig

CHARACTER = CharacterConfig(name="FALSTAFF", display_name="Sir John", system_prompt="You are {display_name}, a fat old knight.")
INTERVIEWS = [
    {
        "id": "01-q1",
        "kind": "multi",
        "turns": [
            {"question": "Who are you?", "answer": "Sir John, at your service, sack in hand."},
            {"question": "Why?", "answer": "Because the tavern is warm."},
        ],
    },
    {"id": "02-q2", "kind": "single", "turns": [{"question": "What do you value?", "answer": "Sack. And honour, a word."}]},
]
# canned scores: by the criterion in the request; the second interview gets one point less
BASE = {"memorization": 5, "values": 6, "personality": 4, "hallucination": 7, "stability": 3}


def criterion(request: dict) -> str:
    title = re.search(r"\[Criterion\] (.+?) \(1-7\)", request["messages"][-1]["content"]).group(1)
    return next(d for d, r in RUBRIC.items() if r["title"] == title)


def canned(request: dict) -> tuple[int, Any]:
    dimension = criterion(request)
    score = BASE[dimension] - (1 if "What do you value?" in request["messages"][-1]["content"] else 0)
    return 200, f"The knight keeps to his manner.\n{{\"score\": {score}}}"


class Server:
    """A tiny chat-completions endpoint: `reply(request) -> (status, reply text | response dict)`; records requests."""

    def __init__(self, reply: Callable[[dict], tuple[int, Any]]):
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = owner.reply(body)
                if isinstance(content, str):
                    content = {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                    }
                data = json.dumps(content).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(reply=canned) -> Server:
        servers.append(Server(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def config(server: Server, **overrides) -> JudgeConfig:
    return JudgeConfig(**{"enabled": True, "base_url": server.base_url, "model": "judge-7b", "max_retries": 0, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_protocol_scores_and_means(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    server = serve()
    result = judge_interviews(INTERVIEWS, CHARACTER, config(server, api_key_env="JUDGE_KEY"), tmp_path, None)

    assert result["n"] == 2
    assert result["means"] == {d: BASE[d] - 0.5 for d in DIMENSIONS}
    assert result["unscored"] == {d: 0 for d in DIMENSIONS}
    assert len(server.requests) == 2 * 5  # one request per interview and dimension
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["auth"] == "Bearer sk-test-123"
        body = request["body"]
        assert body["model"] == "judge-7b" and body["temperature"] == 0.0
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        user = body["messages"][1]["content"]
        assert "The AI plays Sir John." in user and "You are Sir John, a fat old knight." in user  # the brief
        dimension = criterion(body)
        assert RUBRIC[dimension]["question"] in user and RUBRIC[dimension]["scale"] in user
        assert '{"score": N}' in user
    first = next(r["body"]["messages"][1]["content"] for r in server.requests if "Who are you?" in r["body"]["messages"][1]["content"])
    assert "Interviewer: Who are you?\nSir John: Sir John, at your service, sack in hand.\n\nInterviewer: Why?" in first
    assert {criterion(r["body"]) for r in server.requests} == set(DIMENSIONS)

    records = read_jsonl(tmp_path / "judge.jsonl")
    assert [r["id"] for r in records] == ["01-q1", "02-q2"] and records[0]["kind"] == "multi"
    assert records[1]["dimensions"]["values"] == {"score": 5, "raw": 'The knight keeps to his manner.\n{"score": 5}', "error": None}


def test_missing_key_variable_sends_a_placeholder(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    server = serve()
    judge_interviews(INTERVIEWS[:1], CHARACTER, config(server, api_key_env="NO_SUCH_KEY", dimensions=["values"]), tmp_path, None)
    assert [r["auth"] for r in server.requests] == ["Bearer EMPTY"]


def test_malformed_replies_are_null_with_the_raw_reply_kept(serve, tmp_path):
    def reply(request):
        dimension = criterion(request)
        if dimension == "personality":
            return 200, "I would rather not put a number on a knight."
        if dimension == "values":
            return 200, 'Remarkable.\n{"score": 9}'
        if dimension == "stability":
            return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge-7b", "choices": []}
        if dimension == "hallucination":
            return 200, "He never strays from his century.\n\nScore: 6"  # no JSON: the number fallback
        return canned(request)

    server = serve(reply)
    result = judge_interviews(INTERVIEWS, CHARACTER, config(server), tmp_path, None)
    assert result["means"] == {"memorization": 4.5, "values": None, "personality": None, "hallucination": 6, "stability": None}
    assert result["unscored"] == {"memorization": 0, "values": 2, "personality": 2, "hallucination": 0, "stability": 2}
    dims = read_jsonl(tmp_path / "judge.jsonl")[0]["dimensions"]
    assert dims["personality"] == {
        "score": None, "raw": "I would rather not put a number on a knight.", "error": "no score found in the reply"
    }
    assert dims["values"]["score"] is None and dims["values"]["raw"].endswith('{"score": 9}')
    assert "outside 1-7" in dims["values"]["error"]
    assert dims["stability"]["score"] is None and "malformed response" in dims["stability"]["error"]


def test_server_error_is_a_stage_error_after_retries(serve, tmp_path):
    server = serve(lambda request: (500, {"error": {"message": "the GPU caught fire", "type": "server_error"}}))
    with pytest.raises(StageError) as caught:
        judge_interviews(INTERVIEWS, CHARACTER, config(server, max_retries=1, concurrency=1), tmp_path, None)
    message = str(caught.value)
    assert caught.value.stage == "eval"
    assert "HTTP 500" in message and "the GPU caught fire" in message and "after 1 retries" in message
    assert server.base_url in message and "eval.judge.enabled: false" in message
    assert len(server.requests) == 2  # the first request and its retry; the other nine were never sent
    assert not (tmp_path / "judge.jsonl").exists()


def test_unreachable_server_is_a_stage_error(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = JudgeConfig(enabled=True, base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=5)
    with pytest.raises(StageError, match="cannot connect"):
        judge_interviews(INTERVIEWS, CHARACTER, cfg, tmp_path, None)


def test_unauthorised_names_the_key_variable(serve, tmp_path):
    server = serve(lambda request: (401, {"error": {"message": "bad key"}}))
    with pytest.raises(StageError, match="OPENAI_API_KEY"):
        judge_interviews(INTERVIEWS, CHARACTER, config(server), tmp_path, None)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('Reasoning...\n{"score": 6}', 6),
        ('{"Score": "3"}', 3),
        ('{"reason": "fine", "score": 2.5}', 2.5),
        ("Step 1 ... on a scale of 1-7 ...\n\n5\n5", 5),
        ("**6/7**", 6),
        ("Final score: 7.", 7),
        ("All things considered, the score is 4 for this one.", 4),
        ('{"score": 0}', None),
        ("the score is 12", None),
        ('{"score": true}', None),
        ("no idea", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(reply, score):
    value, why = parse_score(reply)
    assert value == score
    assert (why is None) == (score is not None)


def test_profile_is_shown_and_cut(serve, tmp_path):
    (tmp_path / "profile.txt").write_text("# Falstaff\n\nA knight of Henry IV's time. " + "x" * 500, encoding="utf-8")
    server = serve()
    cfg = config(server, profile="profile.txt", profile_max_chars=40, dimensions=["memorization"])
    judge_interviews(INTERVIEWS[:1], CHARACTER, cfg, tmp_path / "out", None, recipe_dir=tmp_path)
    user = server.requests[0]["body"]["messages"][1]["content"]
    assert "[Profile]\n# Falstaff\n\nA knight of Henry IV's time." in user and "x" * 20 not in user


def test_config_validation():
    with pytest.raises(ValidationError, match="base_url and model are not set"):
        JudgeConfig(enabled=True)
    with pytest.raises(ValidationError, match="model is not set"):
        JudgeConfig(enabled=True, base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(ValidationError):
        JudgeConfig(dimensions=["charisma"])
    assert JudgeConfig().enabled is False  # off by default, needs nothing
    assert all(field.description for field in JudgeConfig.model_fields.values())


def test_messages_are_one_criterion_each():
    messages = judge_messages(INTERVIEWS[1], "hallucination", "Sir John", CHARACTER.system)
    user = messages[1]["content"]
    assert RUBRIC["hallucination"]["title"] in user
    assert all(RUBRIC[d]["question"] not in user for d in DIMENSIONS if d != "hallucination")
    assert "[Profile]" not in user  # none given
