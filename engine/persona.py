"""The `character` section: who the model becomes, shared by dataset, export, eval and serving."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class CharacterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="The speaker name as it appears in the data after cleaning (e.g. FALSTAFF, Cartman).")
    display_name: Optional[str] = Field(None, description="How the character is called in prompts and the chat page (default: name).")
    system_prompt: str = Field(
        "You are {display_name}. Stay in character and answer as {display_name} would.",
        description="The persona system prompt; {display_name} is replaced. Always passed, so the base template's default system message never appears.",
    )
    first_message: Optional[str] = Field(None, description="What the character says first in a chat (serving, chat page).")
    card: Optional[str] = Field(
        None,
        description="A character card (SillyTavern chara_card_v2 JSON or PNG, text-generation-webui YAML), relative to the recipe: "
        "fills system_prompt, first_message and display_name where the recipe leaves them unset.",
    )

    @property
    def shown_name(self) -> str:
        return self.display_name or self.name

    @property
    def system(self) -> str:
        return self.system_prompt.replace("{display_name}", self.shown_name)
