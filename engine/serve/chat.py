"""`recipe chat`: a terminal chat with one persona, in process (no server): history, streaming output,
/reset, /system [TEXT], /quit (or Ctrl-D)."""

from __future__ import annotations

from typing import Any, TextIO

HELP = "commands: /reset (forget the chat), /system [TEXT] (show or set the system prompt), /quit"


def run_chat(engine: Any, sampling: dict, stdin: TextIO, stdout: TextIO) -> None:
    character = engine.character
    system = character.system
    history: list[dict] = []

    def greet() -> None:
        history.clear()
        if character.first_message and character.config.first_message:
            history.append({"role": "assistant", "content": character.first_message})
            stdout.write(f"{character.name}: {character.first_message}\n")
        stdout.flush()

    stdout.write(f"Chatting with {character.name} ({engine.precision} on {engine.device}). {HELP}\n")
    greet()
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            break
        text = line.rstrip("\n").strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            stdout.write("(chat reset)\n")
            greet()
            continue
        if text == "/system" or text.startswith("/system "):
            new = text[len("/system"):].strip()
            if new:
                system = new
                stdout.write("(system prompt set; the chat continues with it)\n")
            else:
                stdout.write(f"system prompt: {system or '(none)'}\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        params = engine.sampling(sampling)
        stdout.write(f"{character.name}: ")
        stdout.flush()
        reply = []
        try:
            prompt = engine.chat_prompt_ids(messages)
            if len(prompt) + int(params["max_tokens"]) > engine.max_context:
                stdout.write(f"(the chat is over the model's context of {engine.max_context} tokens: /reset)\n")
                history.pop()
                continue
            for delta in engine.stream_text(prompt, params):
                reply.append(delta)
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" (interrupted)")
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    stdout.write("bye\n")
    stdout.flush()
