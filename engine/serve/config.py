"""The `serve` section of a recipe: how `recipe serve` and `recipe chat` run the exported model.

Light on purpose (pydantic only): the recipe model imports it, and `recipe --help` / `validate` must not
pull in torch or fastapi.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRECISIONS = ("auto", "nf4", "int8", "bf16", "fp16", "fp32")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: Literal["auto", "nf4", "int8", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights in memory: nf4 / int8 (bitsandbytes), bf16, fp16 or fp32; auto = bf16 on CUDA, fp32 on CPU. "
        "`recipe serve --precision` wins.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto = CUDA when present, else CPU.")
    model_id: Optional[str] = Field(None, description="The name clients pass as `model` (default: the recipe's name).")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default sampling temperature (0 = greedy); a request's `temperature` wins.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Default nucleus sampling mass; a request's `top_p` wins.")
    top_k: Optional[int] = Field(None, ge=1, description="Default top-k (unset = off); a request's `top_k` wins.")
    repetition_penalty: Optional[float] = Field(
        None, ge=1.0, description="Default repetition penalty (unset = export.repeat_penalty, as in the Modelfile); a request's wins."
    )
    max_tokens: int = Field(200, ge=1, description="Default reply length in tokens when a request names none.")
    max_tokens_limit: int = Field(1024, ge=1, description="The most tokens one request may ask for (a larger `max_tokens` is a 400 error).")
    max_context: Optional[int] = Field(
        None, ge=16, description="The most prompt + reply tokens (default: the model's max_position_embeddings, at most 8192)."
    )
    stop: Optional[list[str]] = Field(
        None, description="Default stop strings (unset = the Modelfile's: the learned EOS and the template's turn markers); a request's `stop` wins."
    )
    first_message: bool = Field(
        True, description="Put character.first_message before the user's first message when a chat has no assistant turn yet."
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ServeConfig":
        if self.max_tokens > self.max_tokens_limit:  # every request that names no max_tokens would be refused
            raise ValueError(
                f"max_tokens ({self.max_tokens}) is above max_tokens_limit ({self.max_tokens_limit}): lower max_tokens "
                "or raise max_tokens_limit"
            )
        if self.max_context is not None and self.max_tokens >= self.max_context:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) leaves no room for the prompt in max_context ({self.max_context}): "
                "lower max_tokens or raise max_context"
            )
        return self
