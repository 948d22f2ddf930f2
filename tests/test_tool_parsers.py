"""The tool-call parsers on the texts their models write (the formats of the Hermes / Qwen,
Llama 3.1, Mistral and Llama 3.2 pythonic chat templates), what is left as content, and the
streaming split: however the text arrives in pieces, the content sent along the way plus the
content and calls at the end equal the parse of the whole, and no marker of a call is ever
sent as content."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.entrypoints.openai.tool_parsers import (
    PARSERS,
    ToolCallStream,
    required_schema,
)

CASES = [
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        "Let me look.\n",
        [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})],
    ),
    ("hermes", "no call here, only <tool words>", "no call here, only <tool words>", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    (
        "llama3_json",
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris"})],
    ),
    ("llama3_json", '{"name": "add", "arguments": {"a": 3}}', None, [("add", {"a": 3})]),
    ("llama3_json", "The answer is {1}", "The answer is {1}", []),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        "Sure. ",
        [("add", {"a": 1, "b": 2})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]add[ARGS]{"a": 5}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}',
        None,
        [("add", {"a": 5}), ("get_weather", {"city": "Rome"})],
    ),
    (
        "pythonic",
        '[get_weather(city="San Francisco", days=3), add(a=1, b=[1, 2])]',
        None,
        [("get_weather", {"city": "San Francisco", "days": 3}), ("add", {"a": 1, "b": [1, 2]})],
    ),
    ("pythonic", "[1, 2, 3] is a list", "[1, 2, 3] is a list", []),
    ("pythonic", '[os.system("rm -rf /")]', '[os.system("rm -rf /")]', []),
    ("pythonic", "[f(x=__import__('os'))]", "[f(x=__import__('os'))]", []),
]


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_each_parser_reads_its_format_and_leaves_the_rest_as_content(parser, text, content, calls):
    got_content, got = PARSERS[parser]().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_mistral_call_ids_are_nine_letters_and_digits():
    stream = ToolCallStream("auto", PARSERS["mistral"]())
    stream.feed('[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    _, (call,) = stream.finish()
    assert len(call.id) == 9 and call.id.isalnum()


@given(
    case=st.sampled_from(CASES),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_streamed_pieces_add_up_to_the_whole(case, cuts):
    parser, text, _, _ = case
    whole_content, whole_calls = PARSERS[parser]().parse(text)
    stream = ToolCallStream("auto", PARSERS[parser]())
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    sent = "".join(stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    rest, calls = stream.finish()
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert sent + rest == (whole_content or "") if whole_calls else sent + rest == text
    if whole_calls:
        for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
            assert marker not in sent


def test_required_calls_are_a_list_of_named_parameters():
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g"}},
    ]
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["f"], ["g"]]
    stream = ToolCallStream("required", None)
    assert stream.feed('[{"name": "g", "parameters": {"x": 1}}]') == ""
    rest, (call,) = stream.finish()
    assert rest == "" and call.name == "g" and json.loads(call.arguments) == {"x": 1}
    assert call.id.startswith("chatcmpl-tool-")
