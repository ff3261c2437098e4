"""Backend declarations: one callable model endpoint each (provider + model + api_base + prices).

Declared here, in the lowest layer, because both the gateway config and policy files may list
backends, and the decision engine needs their prices and capabilities to estimate cost.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Prices(BaseModel):
    """USD per million tokens. Reasoning tokens are billed as output tokens by every provider we know."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(
        default=None, ge=0,
        description="Prompt tokens the provider read from its cache (`usage.prompt_tokens_details."
                    "cached_tokens`); default: the input price.")
    cache_write_input_per_mtok: float | None = Field(
        default=None, ge=0,
        description="Prompt tokens the provider wrote to its cache (`usage.prompt_tokens_details."
                    "cache_creation_tokens`: Anthropic bills them above the input price); default: the input price.")


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", description="Name clients may use as `model`.")
    model: str = Field(description="litellm model string, e.g. `openai/gpt-4.1-mini`, `anthropic/claude-sonnet-4-5`.")
    api_base: str | None = Field(default=None, description="Base URL, e.g. http://127.0.0.1:8080/v1.")
    api_key_env: str | None = Field(default=None, description="Name of the environment variable holding the API key "
                                                              "(`OPENAI_API_KEY`: the name, never the key).")
    prices: Prices | None = Field(default=None, description="Defaults to litellm's bundled cost map, else zero.")
    reasoning: bool = Field(default=False, description="A reasoning model (thinks before answering).")
    efforts: list[Literal["none", "minimal", "low", "medium", "high"]] = Field(default_factory=list)
    effort_param: Literal["reasoning_effort", "thinking_budget", "enable_thinking", "none"] = Field(
        default="reasoning_effort",
        description="How an effort level reaches the provider (see docs/policies.md).",
    )
    max_context: PositiveInt | None = Field(
        default=None,
        description="Context window in tokens. A prompt estimated well over it (see docs/policies.md) is "
        "not sent to this backend: other arms answer, or the client gets a 400 `context_length_exceeded`. "
        "Default: litellm's model map for a provider's own endpoint (no api_base), else no limit.",
    )
    max_output_tokens: PositiveInt | None = Field(
        default=None,
        description="The most tokens one call can write (reasoning included). What a key with a budget holds "
        "for a call whose client sent no max_tokens (see docs/policies.md, Budgets). Default: litellm's "
        "model map for a provider's own endpoint (no api_base), else unknown: such a key's calls are then "
        "sent a default max_tokens (1024; 8192 for a reasoning backend), which is what they hold.",
    )
    supports_n: bool = Field(default=True, description="Whether the upstream honours `n` > 1 in one call.")
    message_format: Literal["openai", "basic"] = Field(
        default="openai",
        description="`openai`: the upstream takes today's chat format as it is. `basic`: only string "
        "contents and the system/user/assistant/tool roles (llama.cpp's server, older OpenAI-compatible "
        "servers): text parts are joined into one string, a missing content is sent as an empty one, "
        "`developer` is sent as `system`, a message field sent as null is left out, `max_completion_tokens` "
        "is sent as `max_tokens`, a `json_schema` response_format as `json_object` with its `schema`, and a "
        "request with any other part (an image, audio) is refused with a 400 instead of being sent.",
    )
    timeout_s: PositiveFloat = 60.0
    first_byte_timeout_s: PositiveFloat = 20.0
    connect_timeout_s: PositiveFloat = 5.0
    max_retries: int = Field(default=2, ge=0, le=10)
    max_concurrency: PositiveInt = 64
    # Speed, for the decision engine's latency estimate before any outcome is observed (learned
    # latencies replace it as they accrue).
    output_tokens_per_s: PositiveFloat = Field(default=60.0, description="Decode speed of one stream, tokens/s.")
    first_token_ms: PositiveFloat = Field(default=500.0, description="Typical time to first token, ms.")
    fast_path: bool | None = Field(
        default=None,
        description="Call an OpenAI-compatible endpoint directly instead of through litellm. "
        "Default: on for `openai/...` models and any backend with an api_base.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _a_variables_name(cls, value: str | None) -> str | None:
        """The name of a variable. `$OPENAI_API_KEY` was looked up as a variable named so (never set: every
        call unauthorised), and a key pasted here was written to the log in the "is not set" warning."""
        if value is None or _ENV_NAME.fullmatch(value):
            return value
        bare = value.strip().removeprefix("$").removeprefix("{").removesuffix("}")
        if value.strip().startswith("$") and _ENV_NAME.fullmatch(bare):
            raise ValueError(f"the variable's name without `$`: `api_key_env: {bare}`")
        # not quoted: it may be the key itself
        raise ValueError("not a variable's name (letters, digits and _, not starting with a digit): give the name "
                         "of the environment variable that holds the key, e.g. OPENAI_API_KEY, never the key itself")

