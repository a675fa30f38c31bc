"""The request bodies the API accepts, and how they become penwright's own sampling settings.

Field names follow OpenAI's; `top_k`, `repetition_penalty` and `label` are penwright's extensions.
Values are checked by `SampleConfig`, the same class the CLI uses, so both refuse the same things.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import SampleConfig
from ..errors import PenwrightError

# CLI flag -> request field, to word SampleConfig's messages in the API's terms.
API_NAMES = {"max-new-tokens": "max_tokens", "num-samples": "n", "greedy": "temperature 0"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class Sampling(BaseModel):
    # strict: "0.5" is not a number and "yes" is not a boolean; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    top_k: int = 0
    repetition_penalty: float = 1.0
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def sampling(self, batch_size: int) -> SampleConfig:
        """The SampleConfig for this request; temperature 0 means greedy, as in OpenAI's API."""
        try:
            return SampleConfig(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                greedy=self.temperature == 0, top_k=self.top_k, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty, num_samples=self.n,
                                batch_size=batch_size, seed=self.seed, label=self.label,
                                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop))
        except PenwrightError as e:
            raise PenwrightError(re.sub(r"--([a-z-]+)", lambda m: API_NAMES.get(m[1], m[1].replace("-", "_")),
                                        str(e))) from None


class CompletionRequest(Sampling):
    prompt: str | list[str] = ""
    echo: bool = False

    def prompts(self) -> list[str | None]:
        """An empty prompt asks for text from nothing."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise PenwrightError("prompt must not be an empty list")
        return [p or None for p in prompts]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
