"""Tool calling and structured outputs through the node's local endpoint, with the real clients
from PyPI: the `openai` SDK and LangChain's `langchain-openai`; every answer that claims to be
complete is validated with `jsonschema`.

    python openai_tools.py BASE_URL API_KEY TOOLS_MODEL PLAIN_MODEL

TOOLS_MODEL has a chat template that shows tools; PLAIN_MODEL has no template. The test models
have random weights: the text means nothing, but what a grammar constrains must be valid.
Prints one line per check and "ALL OK" at the end; any failed check raises.
"""

import json
import sys
from typing import Annotated, Literal

import jsonschema
import openai
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base, key, tools_model, plain_model = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(name):
    print("ok:", name, flush=True)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def valid_calls(calls, only=None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_"), c
        assert c.function.name in SCHEMAS, c
        if only:
            assert c.function.name == only, c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


# Forced calls: whatever the weights, the arguments follow the function's schema.
for choice, only in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
    for temperature, seed in ((0, 0), (1.0, 1), (1.0, 2), (1.5, 3)):
        r = client.chat.completions.create(
            model=tools_model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300,
            temperature=temperature, seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None, c.message
        valid_calls(c.message.tool_calls, only)
check("tool_choice required and a named function: every call parses and matches its schema")

whole = client.chat.completions.create(
    model=tools_model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0
)
stream = client.chat.completions.create(
    model=tools_model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0,
    stream=True,
)
deltas, finish = [], None
for chunk in stream:
    if chunk.choices:
        deltas.extend(chunk.choices[0].delta.tool_calls or [])
        finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls", finish
assert [(d.function.name, d.function.arguments) for d in deltas] == [
    (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
], (deltas, whole)
check("a streamed call arrives as delta.tool_calls, the same as the whole answer's")

for seed in range(4):
    r = client.chat.completions.create(
        model=tools_model, messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed
    )
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls"), c
    if c.finish_reason == "tool_calls":
        valid_calls(c.message.tool_calls)
    else:
        assert not c.message.tool_calls, c
check("tool_choice auto: text, or a call that matches its schema")

call = whole.choices[0].message.tool_calls[0]
history = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
]
r = client.chat.completions.create(model=tools_model, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r
assert r.usage.prompt_tokens > 0
r2 = client.chat.completions.create(model=tools_model, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
assert r2.choices[0].message == r.choices[0].message
check("a tool result in the history is rendered by the model's template")


def refused(param, **kwargs):
    try:
        client.chat.completions.create(max_tokens=8, **kwargs)
    except openai.BadRequestError as err:
        assert err.body["param"] == param, (param, err.body)
        return err.body["message"]
    raise AssertionError(f"{param}: accepted")


bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}
msg = refused("tools[0].function.parameters", model=tools_model, messages=ASK, tools=[bad_schema])
assert '"not"' in msg, msg
refused("tools[0].function.parameters", model=tools_model, messages=ASK,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])
refused("tools[0].function.name", model=tools_model, messages=ASK,
        tools=[{"type": "function", "function": {"name": "no spaces"}}])
refused("tool_choice", model=tools_model, messages=ASK, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "missing"}})
refused("messages[1].tool_call_id", model=tools_model, tools=TOOLS,
        messages=ASK + [{"role": "tool", "tool_call_id": "call_unknown", "content": "x"}])
msg = refused("response_format.json_schema.schema", model=plain_model, messages=ASK,
              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}})
assert '"if"' in msg, msg
refused("response_format", model=tools_model, messages=ASK, tools=TOOLS, response_format={"type": "json_object"})
try:
    client.chat.completions.create(model=plain_model, messages=ASK, tools=TOOLS, max_tokens=8)
    raise AssertionError("tools accepted by a model without tool support")
except openai.BadRequestError as err:
    assert "tool support" in err.body["message"], err.body
check("bad tool definitions, unknown call ids and unsupported schemas are 400s naming the field")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "member"],
    "additionalProperties": False,
}
for model in (plain_model, tools_model):
    for temperature, seed in ((0, 0), (1.0, 1), (1.0, 2), (1.5, 3), (2.0, 4)):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "A person, please"}], max_tokens=300,
            temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        )
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=300, temperature=0, response_format={"type": "json_object"}
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict), r
check("response_format json_schema answers validate against their schema; json_object is an object")

r = client.chat.completions.create(
    model=plain_model, messages=ASK, max_tokens=5, temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
)
assert r.choices[0].finish_reason == "length", r
r = client.chat.completions.create(
    model=tools_model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=6, temperature=0
)
assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls, r
check("a grammar cut short by max_tokens says length, and no half call is presented as a call")

r = client.chat.completions.create(
    model=plain_model, messages=ASK, max_tokens=16, temperature=0.9, seed=5, top_p=0.5,
    presence_penalty=1.5, frequency_penalty=1.0,
)
again = client.chat.completions.create(
    model=plain_model, messages=ASK, max_tokens=16, temperature=0.9, seed=5, top_p=0.5,
    presence_penalty=1.5, frequency_penalty=1.0,
)
assert r.choices[0].message.content == again.choices[0].message.content
plain = client.chat.completions.create(model=plain_model, messages=ASK, max_tokens=16, temperature=0.9, seed=5)
penalised = client.chat.completions.create(
    model=plain_model, messages=ASK, max_tokens=16, temperature=0, frequency_penalty=2.0
)
greedy = client.chat.completions.create(model=plain_model, messages=ASK, max_tokens=16, temperature=0)
assert penalised.choices[0].message.content != greedy.choices[0].message.content, (penalised, greedy)
assert plain.choices[0].finish_reason in ("stop", "length")
check("seed, top_p and the penalties are honoured (same seed, same text; a penalty changes it)")

# LangChain, as an application would use it.
chat = ChatOpenAI(model=tools_model, base_url=base + "/v1", api_key=key, temperature=0, max_tokens=300, max_retries=0)


# Strings are bounded: the random weights never choose to close one.
@tool
def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["c", "f"]) -> str:
    """The weather in a city."""
    return "sunny"


msg = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Oslo?")
assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather", msg
jsonschema.validate(msg.tool_calls[0]["args"], get_weather.args_schema.model_json_schema())
follow = chat.bind_tools([get_weather]).invoke(
    ["What is the weather in Oslo?", msg, {"role": "tool", "tool_call_id": msg.tool_calls[0]["id"], "content": "sunny"}]
)
assert follow is not None
check("LangChain bind_tools: a forced call with valid arguments, and its result sent back")


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


for method in ("json_schema", "function_calling"):
    p = chat.with_structured_output(Person, method=method).invoke("Make up a person")
    assert isinstance(p, Person), p
check("LangChain with_structured_output (json_schema and function_calling) gives valid objects")

print("ALL OK", flush=True)
