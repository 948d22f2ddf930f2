"""The request bodies the server accepts: OpenAI's fields plus vLLM's extras in the same
body, each one honoured, inert here for a stated reason, or refused (a 400 naming it). A
field neither OpenAI nor vLLM knows is ignored with a warning, as vLLM does
(``ignored_fields``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loraplex.entrypoints.openai.errors import APIError, unsupported
from loraplex.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

# vLLM's older names for structured outputs, as StructuredOutputsParams' fields
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_BACKENDS = (None, "auto", "guidance", "llguidance")  # what guided_decoding_backend may name


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        """Fields of the body that no model here declares (ignored, with a warning)."""
        return sorted(self.model_extra or {})


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# (field, the value that means "not asked for", why it is refused) for both endpoints
_REFUSED_COMMON: list[tuple[str, Any, str]] = [
    ("use_beam_search", False, "beam search is not implemented"),
    ("length_penalty", 1.0, "length_penalty applies to beam search, which is not implemented"),
    ("structural_tag", None, "structural tags are not implemented yet"),
    ("logits_processors", None, "custom logits processors are not implemented"),
    ("vllm_xargs", None, "there are no custom logits processors to take them"),
    ("kv_transfer_params", None, "disaggregated prefill is not implemented"),
    ("prompt_embeds", None, "prompts are text or token ids"),
    ("mm_processor_kwargs", None, "loraplex serves text-only models"),
]


class _Sampling(OpenAIBaseModel):
    """Fields shared by completions and chat: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # OpenAI's end-user id; under scheduling_policy=fair, the tenant whose share it counts
    # against (else inert)
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra sampling fields
    best_of: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None
    priority: int = 0
    request_id: str | None = Field(default=None, max_length=256)
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None  # only requests with the same salt share cached prefixes
    # structured outputs: vLLM's field, and its older guided_* names
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    # refused (see _REFUSED_COMMON)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    structural_tag: Any = None
    logits_processors: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None
    prompt_embeds: Any = None
    mm_processor_kwargs: Any = None

    def check_supported(self) -> None:
        """A 400 naming the first field asked of that this server does not do."""
        for name, default, why in _REFUSED_COMMON:
            if getattr(self, name) not in (None, default):
                raise unsupported(name, why)
        if self.best_of not in (None, self.n):
            raise unsupported("best_of", "it must equal n (no beam search or reranking)")
        if self.cache_salt is not None and not self.cache_salt:
            raise APIError(
                400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
            )

    def structured(self) -> tuple[StructuredOutputsParams | None, str]:
        """The output constraint the body asks for, and the body field naming it (for
        errors): ``structured_outputs``, ``response_format`` (``json_schema`` or
        ``json_object``) or a ``guided_*`` field; at most one of them. A 400 naming the
        field for a bad one."""
        asked: list[tuple[str, dict[str, Any]]] = []
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", dict(self.structured_outputs)))
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_schema":
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if schema is None:
                    raise APIError(
                        400,
                        "response_format: type 'json_schema' needs json_schema.schema",
                        "response_format.json_schema",
                    )
                asked.append(("response_format.json_schema.schema", {"json": schema}))
            elif kind == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif kind == "structural_tag":
                raise unsupported(
                    "response_format {'type': 'structural_tag'}",
                    "structural tags are not implemented yet",
                )
            elif kind != "text":
                raise APIError(
                    400,
                    "response_format.type must be 'text', 'json_object' or 'json_schema', "
                    f"got {kind!r:.100}",
                    "response_format.type",
                )
        for name, field in _GUIDED.items():
            if getattr(self, name) is not None:
                asked.append((name, {field: getattr(self, name)}))
        if self.guided_decoding_backend not in _BACKENDS:
            raise APIError(
                400,
                f"guided_decoding_backend {self.guided_decoding_backend!r:.100} is not "
                "available: loraplex's grammar backend is llguidance ('guidance')",
                "guided_decoding_backend",
            )
        if len(asked) > 1:
            names = ", ".join(name for name, _ in asked)
            raise APIError(
                400,
                f"only one kind of structured output per request; this one asks for {names}",
                asked[1][0],
            )
        if not asked:
            return None, ""
        where, fields = asked[0]
        if self.guided_whitespace_pattern is not None:
            fields.setdefault("whitespace_pattern", self.guided_whitespace_pattern)
        try:
            return StructuredOutputsParams(**fields), where
        except TypeError as e:  # a key StructuredOutputsParams does not have
            raise APIError(400, f"{where}: {e}", where) from None
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", where) from None

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """The request's ``SamplingParams`` (streamed requests as deltas). A bad value raises
        ``ValueError`` naming the field."""
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError as e:
                raise ValueError(f"logit_bias: keys must be token ids ({e})") from None
        return SamplingParams(
            n=self.n,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias=bias,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=self.structured()[0],
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            **{k: v for k, v in optional.items() if v is not None},
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise unsupported("suffix", "insertion (fill in the middle) is not implemented")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = True  # tool_choice='required': one call or several
    functions: Any = None
    function_call: Any = None
    reasoning_effort: str | None = None  # given to the chat template, as vLLM does
    include_reasoning: bool = True  # inert: no reasoning parser splits the output
    echo: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise unsupported(name, "OpenAI's deprecated functions: use tools and tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")


class TokenizeRequest(OpenAIBaseModel):
    """vLLM's ``/tokenize``: a ``prompt``, or chat ``messages`` rendered by the chat
    template (exactly one of them). ``add_special_tokens`` defaults as vLLM's: True for a
    prompt, False for messages (the template writes its own)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    mm_processor_kwargs: Any = None

    def check_supported(self) -> None:
        if self.mm_processor_kwargs is not None:
            raise unsupported("mm_processor_kwargs", "loraplex serves text-only models")


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=255)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False
    # loraplex: the adapter's id, if the caller keeps ids (refused if another adapter has
    # it); by default the server (or the cluster's registry) chooses one
    lora_int_id: int | None = Field(default=None, ge=1, lt=2**31)


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=255)
    lora_int_id: int | None = None
