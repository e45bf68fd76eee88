"""Serving an exported persona: `recipe serve` (OpenAI-compatible API + chat page) and `recipe chat` (terminal).

    config.py   the `serve:` recipe section (light: pydantic only)
    models.py   targets -> characters, loading per precision (nf4/int8 via bitsandbytes, bf16, fp32), generation
    app.py      the FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, the page at /
    cli.py      the click commands; chat.py the terminal loop; static/ the chat page (plain files)
"""
