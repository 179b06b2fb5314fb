"""POST /v1/responses with the openai client's `responses.create`, on the bundled model: text, reasoning items,
function calls in a two-turn loop (by previous_response_id and by sending the items back), text.format, tool_choice,
streaming events, stored responses, bad input."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from mixquant import tiny
from mixquant.server.protocol import ResponseObject, ResponsesRequest
from mixquant.server.responses import ResponseStore, StoredResponse, input_messages
from mixquant.tiny import tasks
from tests.server.test_structured_outputs import ASK, NO_THINKING, PERSON

ARITHMETIC = tasks.generate("arithmetic", 2)  # the bundled model works it out in its reasoning, then answers


def function_tools(example: tasks.Example) -> list[dict]:
    """Chat tools in the responses API's flat shape."""
    return [{"type": "function", **tool["function"]} for tool in example.tools]


@pytest.fixture
def client(bundled_server) -> openai.OpenAI:
    return bundled_server.openai()


def test_text_answer_with_reasoning_and_usage(client):
    response = client.responses.create(model=tiny.NAME, input=ARITHMETIC.prompt_messages, max_output_tokens=200,
                                       temperature=0)
    assert response.status == "completed" and response.object == "response"
    [reasoning, message] = response.output
    assert reasoning.type == "reasoning" and " = " in reasoning.content[0].text
    assert message.type == "message" and ARITHMETIC.answer in response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens


def test_instructions_and_a_string_input(client):
    response = client.responses.create(model=tiny.NAME, instructions="You are a helpful assistant.",
                                       input="Who is the employee in Paris?", max_output_tokens=60, temperature=0)
    assert response.instructions == "You are a helpful assistant." and response.output_text


@pytest.mark.parametrize("by_previous_id", [True, False])
def test_two_turn_function_call_loop(client, by_previous_id):
    example = tasks.generate("tool_use", 4, stage="answer")
    call_turn, tool_reply = example.messages[-3], example.messages[-2]
    tools = function_tools(example)
    first = client.responses.create(model=tiny.NAME, input=example.messages[:-3], tools=tools, temperature=0,
                                    max_output_tokens=100)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (call_turn["tool_calls"][0]["function"]["name"], call_turn["tool_calls"][0]["function"]["arguments"])]
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": tool_reply["content"]}
    if by_previous_id:
        second = client.responses.create(model=tiny.NAME, previous_response_id=first.id, input=[result], tools=tools,
                                         temperature=0, max_output_tokens=100)
    else:  # the whole conversation sent back, the first response's output items included
        items = [*example.messages[:-3], *[item.model_dump(exclude_none=True) for item in first.output], result]
        second = client.responses.create(model=tiny.NAME, input=items, tools=tools, temperature=0,
                                         max_output_tokens=100)
    assert second.previous_response_id == (first.id if by_previous_id else None)
    assert example.answer in second.output_text


def test_streaming_events_add_up_to_the_response(client):
    example = tasks.generate("tool_use", 6, stage="call")
    stream = client.responses.create(model=tiny.NAME, input=example.prompt_messages, tools=function_tools(example),
                                     temperature=0, max_output_tokens=100, stream=True)
    events = list(stream)
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    [call] = [item for item in final.output if item.type == "function_call"]
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments and json.loads(call.arguments) == json.loads(example.answer)["arguments"]
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    assert added == [item.id for item in final.output] == [e.item.id for e in events
                                                         if e.type == "response.output_item.done"]
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == final.output[0].content[0].text


def test_streamed_text_deltas(client):
    with client.responses.stream(model=tiny.NAME, input=ARITHMETIC.prompt_messages, temperature=0,
                                 max_output_tokens=200) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text and ARITHMETIC.answer in text


def test_text_format_json_schema(client):
    response = client.responses.create(model=tiny.NAME, input=ASK, temperature=0.7, max_output_tokens=150,
                                       text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                        "strict": True}}, extra_body=NO_THINKING)
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_tool_choice(client, tool_choice):
    example = tasks.generate("tool_use", 9, stage="call")
    name = json.loads(example.answer)["name"]
    choice = {"type": "function", "name": name} if tool_choice == "named" else "required"
    response = client.responses.create(model=tiny.NAME, input=example.prompt_messages, tools=function_tools(example),
                                       tool_choice=choice, temperature=0.7, max_output_tokens=100)
    calls = [item for item in response.output if item.type == "function_call"]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in example.tools}
    assert calls and all(jsonschema.validate(json.loads(c.arguments), schemas[c.name]) is None for c in calls)
    if tool_choice == "named":
        assert [c.name for c in calls] == [name]


def test_stored_responses_are_retrieved_and_store_false_is_honoured(bundled_server, client):
    kept = client.responses.create(model=tiny.NAME, input="Hello", max_output_tokens=5)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    unkept = client.responses.create(model=tiny.NAME, input="Hello", max_output_tokens=5, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id|no stored response"):
        client.responses.create(model=tiny.NAME, previous_response_id=unkept.id, input="And?", max_output_tokens=5)


def test_the_store_keeps_the_newest():
    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put(StoredResponse(ResponseObject(id=f"resp_{i}", created_at=0, status="completed", model="m"), []))
    assert list(store.responses) == ["resp_1", "resp_2"]


def test_input_items_become_chat_messages():
    request = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "3 degrees"},
        {"type": "function_call_output", "call_id": "c2", "output": "5 degrees"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Cold."}]}]})
    messages = input_messages(request.input)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["reasoning_content"] == "Ask." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c2", "content": "5 degrees"}


@pytest.mark.parametrize("body,status,says", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "only text"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]},
                {"role": "user", "content": "Hi"}]}, 400, "reasoning item"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, 400, "tools.0"),
    ({"input": "Hi", "previous_response_id": "resp_unknown"}, 400, "resp_unknown"),
    ({"input": "Hi", "max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, 400,
     "'not'"),
])
def test_bad_input_is_400(bundled_server, body, status, says):
    with bundled_server.http() as http:
        response = http.post("/v1/responses", json={"model": tiny.NAME, **body})
    assert response.status_code == status and says in response.json()["error"]["message"], response.text
