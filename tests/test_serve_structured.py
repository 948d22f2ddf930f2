"""Structured outputs and tool calls over HTTP: ``loraplex serve`` as a real subprocess on
127.0.0.1 (``--enable-auto-tool-choice --tool-call-parser hermes``, a Hermes-style chat
template), driven by the official ``openai`` client and LangChain. The tiny model's weights
are random: whatever they are, the masks guarantee the form, so every output that finishes
is checked against its schema with ``jsonschema``, its regex with ``re``, its choices."""

from __future__ import annotations

import json
import re
import signal

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from test_server import KEY, http, start_server
from tiny_adapters import build_adapter
from tiny_models import build_model, set_chat_template

HERMES = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n"
    '{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>'
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "the weather", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "what is the weather?"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return set_chat_template(
        build_model(tmp_path_factory.mktemp("so-base"), "llama", max_position_embeddings=2048),
        HERMES,
    )


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    adapter = build_adapter(base, tmp_path_factory.mktemp("so-lora") / "ad", seed=3)
    args = [
        str(base),
        "--served-model-name",
        "tiny",
        "--api-key",
        KEY,
        "--max-model-len",
        "2048",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--lora-modules",
        f"ad={adapter}",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    proc, url = start_server(args, tmp_path_factory.mktemp("so-logs") / "server.log")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    yield c
    c.close()


def chat_text(client, stream: bool, **kw) -> tuple[str, str]:
    """(content, finish_reason) of one chat choice, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=ASK, **kw)
        return r.choices[0].message.content or "", r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


def json_schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object_in_chat(client, stream):
    stops = 0
    for seed in range(4):
        text, finish = chat_text(
            client,
            stream,
            response_format=json_schema_format(PERSON),
            max_tokens=200,
            seed=seed,
            temperature=1.0,
        )
        if finish == "stop":
            stops += 1
            jsonschema.validate(json.loads(text), PERSON)
        text, finish = chat_text(
            client, stream, response_format={"type": "json_object"}, max_tokens=200, seed=seed
        )
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
    assert stops >= 2


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_response_format_structured_outputs_and_guided_fields(client, stream):
    def complete(**kw) -> tuple[str, str]:
        if not stream:
            r = client.completions.create(model="ad", prompt="hello", max_tokens=150, **kw)
            return r.choices[0].text, r.choices[0].finish_reason
        text, finish = "", None
        for chunk in client.completions.create(
            model="ad", prompt="hello", max_tokens=150, stream=True, **kw
        ):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    for seed in range(3):
        fmt = json_schema_format(PERSON)
        text, finish = complete(seed=seed, extra_body={"response_format": fmt})
        if finish == "stop":
            jsonschema.validate(json.loads(text), PERSON)
    text, finish = complete(extra_body={"structured_outputs": {"regex": "[a-c]{2,4}-[0-9]{2}"}})
    assert finish == "stop" and re.fullmatch("[a-c]{2,4}-[0-9]{2}", text), text
    text, finish = complete(extra_body={"guided_regex": "(x|y)z"})
    assert finish == "stop" and text in ("xz", "yz")
    text, finish = complete(extra_body={"guided_choice": ["left", "right"]})
    assert finish == "stop" and text in ("left", "right")


@pytest.mark.parametrize("stream", [False, True])
def test_guided_choice_and_structured_outputs_in_chat(client, stream):
    text, finish = chat_text(client, stream, extra_body={"guided_choice": ["sunny", "rainy"]})
    assert finish == "stop" and text in ("sunny", "rainy")
    so = {"choice": ["up", "down"]}
    text, finish = chat_text(client, stream, extra_body={"structured_outputs": so})
    assert finish == "stop" and text in ("up", "down")
    gj = {"type": "object", "properties": {"k": {"enum": ["v"]}}, "required": ["k"]}
    text, finish = chat_text(
        client, stream, max_tokens=100, extra_body={"guided_json": gj, "seed": 1}
    )
    if finish == "stop":
        jsonschema.validate(json.loads(text), gj)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": json_schema_format({"type": "nonsense"})}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
        ({"structured_outputs": {"bogus": 1}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "x", "guided_choice": ["a"]}, "guided_choice"),
        (
            {"guided_choice": ["a"], "guided_decoding_backend": "outlines"},
            "guided_decoding_backend",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_a_bad_constraint_is_a_400_naming_its_field(server, client, body, param):
    status, text = http(
        server + "/v1/chat/completions", "POST", {"model": "tiny", "messages": ASK, **body}
    )
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["param"].startswith(param), error
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3)
    assert r.usage.completion_tokens == 3  # the server serves on


def calls_of(client, stream: bool, **kw):
    """(tool calls as (id, name, arguments), content, finish_reason) of one choice."""
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, **kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return calls, m.content, r.choices[0].finish_reason
    parts: dict[int, list] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, stream=True, **kw
    ):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                entry = parts.setdefault(tc.index, [None, "", ""])
                entry[0] = tc.id or entry[0]
                entry[1] += (tc.function.name or "") if tc.function else ""
                entry[2] += (tc.function.arguments or "") if tc.function else ""
    return [tuple(parts[k]) for k in sorted(parts)], content or None, finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_give_calls_that_validate(client, stream):
    made = 0
    for seed in range(4):
        calls, _, finish = calls_of(
            client, stream, tool_choice="required", max_tokens=250, seed=seed, temperature=1.0
        )
        if finish == "length":
            continue
        assert finish == "tool_calls" and calls
        for call_id, name, arguments in calls:
            assert call_id.startswith("chatcmpl-tool-")
            jsonschema.validate(json.loads(arguments), PARAMS[name])
        made += 1
    assert made >= 2
    named = {"type": "function", "function": {"name": "get_weather"}}
    made = 0
    for seed in range(4):
        calls, content, finish = calls_of(
            client, stream, tool_choice=named, max_tokens=200, seed=seed, temperature=1.0
        )
        if finish == "length":
            continue
        assert finish == "stop" and len(calls) == 1 and not content
        assert calls[0][1] == "get_weather"
        jsonschema.validate(json.loads(calls[0][2]), WEATHER)
        made += 1
    assert made >= 2


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls_from_the_text(client, stream):
    """The random model is made to write a Hermes call (a regex over its output): the
    parser finds it, in the full response and in the streamed deltas."""
    form = (
        r'I will check\.\n<tool_call>\n\{"name": "add", "arguments": \{"a": [1-9], "b": 2\}\}'
        r"\n</tool_call>"
    )
    calls, content, finish = calls_of(
        client, stream, max_tokens=120, extra_body={"structured_outputs": {"regex": form}}
    )
    assert finish == "tool_calls", (calls, content)
    assert content == "I will check.\n"
    ((_, name, arguments),) = calls
    assert name == "add" and json.loads(arguments)["b"] == 2
    # no call written: the text is the content, finish_reason as generated
    calls, content, finish = calls_of(
        client, stream, max_tokens=30, extra_body={"guided_choice": ["no tools needed"]}
    )
    assert (calls, content, finish) == ([], "no tools needed", "stop")


def test_tool_choice_none_answers_in_text(client):
    calls, content, finish = calls_of(client, False, tool_choice="none", max_tokens=5)
    assert calls == [] and finish == "length"


def test_tool_results_render_through_the_chat_template_as_transformers(server, base):
    """An assistant's call (arguments as JSON text, as the API sends them) and the tool's
    result go to the template as transformers renders them (arguments as an object)."""
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "c", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snow"},
    ]
    status, body = http(server + "/tokenize", "POST", {"messages": messages, "tools": TOOLS})
    assert status == 200, body
    hf = AutoTokenizer.from_pretrained(base)
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[1]["tool_calls"][0]["function"]["arguments"] = {
        "city": "Oslo",
        "unit": "c",
        "days": 1,
    }
    text = hf.apply_chat_template(
        hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert "<tool_response>\n-3 and snow" in text and '"city": "Oslo"' in text
    assert json.loads(body)["tokens"] == hf(text, add_special_tokens=False)["input_ids"]
    bad = json.loads(json.dumps(messages))
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    status, body = http(server + "/v1/chat/completions", "POST", {"model": "tiny", "messages": bad})
    assert status == 400 and "messages[1].tool_calls[0].function.arguments" in body


def test_langchain_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int

    class weather(BaseModel):  # noqa: N801 - the tool's name, as the model sees it
        """The weather in a city for some days."""

        city: str = Field(max_length=6)
        days: int

    got, called = [], []
    for seed in range(4):
        llm = ChatOpenAI(
            model="tiny",
            base_url=server + "/v1",
            api_key=KEY,
            temperature=1.0,
            seed=seed,
            max_completion_tokens=200,
            max_retries=0,
        )
        try:
            got.append(llm.with_structured_output(Person).invoke("who?"))
        except openai.LengthFinishReasonError:
            pass  # a random model may run out of tokens; the form is checked where it ends
        msg = llm.bind_tools([weather], tool_choice="weather").invoke("weather in Oslo?")
        called += msg.tool_calls
    assert got and all(isinstance(p, Person) for p in got)
    assert called and all(c["name"] == "weather" for c in called)
    for c in called:
        assert isinstance(c["args"]["city"], str) and isinstance(c["args"]["days"], int)


def test_a_dead_end_over_http_ends_only_its_request(server, client, base):
    """A choice the request's allowed_token_ids cannot spell: its mask leaves no token. The
    request ends with the engine's error naming the dead end; the server serves on."""
    tok = AutoTokenizer.from_pretrained(base)
    never = [t for t in range(3, 60) if not tok.decode([t]).startswith("y")][:4]
    body = {
        "model": "tiny",
        "messages": ASK,
        "guided_choice": ["yes"],
        "allowed_token_ids": never,
        "max_tokens": 10,
    }
    status, text = http(server + "/v1/chat/completions", "POST", body)
    assert status == 400 and "structured_outputs (choice) reached a dead end" in text, text
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=20, extra_body={"guided_choice": ["fine"]}
    )
    assert r.choices[0].message.content == "fine"
