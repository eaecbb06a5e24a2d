"""The base of every quantloop pydantic model: unknown fields are refused, never silently ignored."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
