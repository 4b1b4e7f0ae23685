"""The agent frameworks people build on, unmodified, against a real `lmx-gateway` over a real
supervisor: the OpenAI Agents SDK (its default Responses model, plain and streamed), pydantic-ai's
OpenAIResponsesModel (a tool loop, and structured output), and LangChain's ChatOpenAI on the
Responses API and on chat completions (bind_tools with parallel_tool_calls=False, and
with_structured_output by function calling). Each runs a whole agent loop: the model calls a tool,
the framework runs it and sends its result back, the model answers. The model side is scripted
(tests/scripted_worker.py) since a random-weight model cannot choose tools; the client side is
the real library. What each sends is recorded off its HTTP client and checked against
gateway/fields.py: every top-level field is honoured or advisory."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pydantic
import pytest

from gateway import fields
from tests.snapshots import write_tiny_llama
from tests.test_agent_wire import _scripted
from tests.test_gateway import GatewayProcess, supervised_gateway
from tests.test_gateway_agent import CALL_SCRIPT

pytestmark = pytest.mark.timeout(120)

ASK = "What is the weather in Paris?"
FINAL = "It is sunny in Paris, 21 C."
AFTER_TOOL = f"The tool answered.</think>\n\n{FINAL}"
# Structured output by a tool call: the frameworks name the tool after the output type.
REPORT = ('Filling in the report.</think>\n\n<tool_call>\n{"name": "Weather", "arguments": '
          '{"city": "Paris", "sunny": true}}\n</tool_call>')
TABLES = {"/v1/responses": (fields.RESPONSES_HONOURED, fields.RESPONSES_ADVISORY),
          "/v1/chat/completions": (fields.CHAT_HONOURED, fields.OPENAI_ADVISORY)}


class Weather(pydantic.BaseModel):
    """A weather report."""

    city: str
    sunny: bool


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("clients-sdks")
    agent_model = write_tiny_llama(root / "agent-model", agent=True)
    yield from supervised_gateway(root, [
        _scripted("agent", agent_model, CALL_SCRIPT, after_tool=AFTER_TOOL),
        _scripted("reporter", agent_model, REPORT),
    ])


class Sent:
    """The requests a client made, read off its own httpx client (the library is not touched)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []

    def _record(self, request: httpx.Request) -> None:
        path = request.url.path
        self.requests.append((path[path.index("/v1/"):], json.loads(request.content or b"{}")))

    async def _arecord(self, request: httpx.Request) -> None:
        self._record(request)

    def sync_client(self) -> httpx.Client:
        return httpx.Client(timeout=30, event_hooks={"request": [self._record]})

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=30, event_hooks={"request": [self._arecord]})

    def check(self, path: str, count: int) -> set[str]:
        """Every top-level field sent to `path` is honoured or advisory; returns the fields sent."""
        bodies = [body for p, body in self.requests if p == path]
        assert len(bodies) == count, [p for p, _ in self.requests]
        honoured, advisory = TABLES[path]
        sent = {key for body in bodies for key in body}
        assert sent - set(honoured) - set(advisory) == set()
        return sent


def _weather(calls: list[str]) -> Any:
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return "sunny, 21 C"
    return get_weather


def _async_openai(gateway: GatewayProcess, sent: Sent) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                              http_client=sent.async_client())


# --- the OpenAI Agents SDK ------------------------------------------------------------------------


def _agents_agent(gateway: GatewayProcess, sent: Sent, calls: list[str]) -> Any:
    import agents

    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model="agent", openai_client=_async_openai(gateway, sent))
    return agents.Agent(name="weather", instructions="Answer with the weather tool.", model=model,
                        tools=[agents.function_tool(_weather(calls))])


def test_openai_agents_runs_a_tool_loop(gw) -> None:
    import agents

    sent, calls = Sent(), []
    result = asyncio.run(agents.Runner.run(_agents_agent(gw[1], sent, calls), ASK))
    assert calls == ["Paris"] and result.final_output.strip() == FINAL
    sent.check("/v1/responses", 2)


def test_openai_agents_runs_a_tool_loop_streamed(gw) -> None:
    import agents

    sent, calls = Sent(), []

    async def run() -> tuple[Any, list[str]]:
        result = agents.Runner.run_streamed(_agents_agent(gw[1], sent, calls), ASK)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(run())
    assert calls == ["Paris"] and result.final_output.strip() == FINAL
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert all(body.get("stream") is True for _, body in sent.requests)
    sent.check("/v1/responses", 2)


def test_openai_agents_chains_its_turns_on_the_stored_responses(gw) -> None:
    import agents

    sent, calls = Sent(), []
    result = asyncio.run(agents.Runner.run(_agents_agent(gw[1], sent, calls), ASK, auto_previous_response_id=True))
    assert calls == ["Paris"] and result.final_output.strip() == FINAL
    _, second = (body for _, body in sent.requests)
    # The second turn sends only the tool's result and names the first, which the store holds.
    assert second["previous_response_id"].startswith("resp_")
    assert [item["type"] for item in second["input"]] == ["function_call_output"]
    sent.check("/v1/responses", 2)


# --- pydantic-ai ----------------------------------------------------------------------------------


def _pydantic_model(gateway: GatewayProcess, sent: Sent, model: str) -> Any:
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIResponsesModel(model, provider=OpenAIProvider(openai_client=_async_openai(gateway, sent)))


def test_pydantic_ai_runs_a_tool_loop(gw) -> None:
    from pydantic_ai import Agent

    sent, calls = Sent(), []
    agent = Agent(_pydantic_model(gw[1], sent, "agent"), instructions="Answer with the weather tool.",
                  tools=[_weather(calls)])
    result = agent.run_sync(ASK)
    assert calls == ["Paris"] and result.output.strip() == FINAL
    sent.check("/v1/responses", 2)


def test_pydantic_ai_structured_output(gw) -> None:
    from pydantic_ai import Agent, ToolOutput

    sent = Sent()
    agent = Agent(_pydantic_model(gw[1], sent, "reporter"), output_type=ToolOutput(Weather, name="Weather"))
    result = agent.run_sync(ASK)
    assert result.output == Weather(city="Paris", sunny=True)
    sent.check("/v1/responses", 1)


# --- LangChain ------------------------------------------------------------------------------------


def _chat_openai(gateway: GatewayProcess, sent: Sent, model: str, responses: bool) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                      use_responses_api=responses, http_client=sent.sync_client(),
                      http_async_client=sent.async_client())


def _langchain_loop(llm: Any, calls: list[str]) -> str:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    get_weather = tool(_weather(calls))
    bound = llm.bind_tools([get_weather])
    history: list[Any] = [HumanMessage(ASK)]
    reply = bound.invoke(history)
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
    history += [reply, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    return bound.invoke(history).text


def test_langchain_on_the_responses_api_runs_a_tool_loop(gw) -> None:
    sent, calls = Sent(), []
    answer = _langchain_loop(_chat_openai(gw[1], sent, "agent", responses=True), calls)
    assert calls == ["Paris"] and answer.strip() == FINAL
    sent.check("/v1/responses", 2)


def test_langchain_on_the_responses_api_streams_a_tool_loop(gw) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    sent, calls = Sent(), []
    get_weather = tool(_weather(calls))
    bound = _chat_openai(gw[1], sent, "agent", responses=True).bind_tools([get_weather])
    history: list[Any] = [HumanMessage(ASK)]
    first = None
    for chunk in bound.stream(history):
        first = chunk if first is None else first + chunk
    (call,) = first.tool_calls
    history += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = "".join(chunk.text for chunk in bound.stream(history))
    assert calls == ["Paris"] and answer.strip() == FINAL
    assert all(body.get("stream") is True for _, body in sent.requests)
    sent.check("/v1/responses", 2)


def test_langchain_on_chat_completions_with_parallel_tool_calls_false(gw) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    sent, calls = Sent(), []
    get_weather = tool(_weather(calls))
    bound = _chat_openai(gw[1], sent, "agent", responses=False).bind_tools([get_weather], parallel_tool_calls=False)
    history: list[Any] = [HumanMessage(ASK)]
    reply = bound.invoke(history)
    (call,) = reply.tool_calls
    history += [reply, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    assert bound.invoke(history).text.strip() == FINAL and calls == ["Paris"]
    assert sent.requests[0][1]["parallel_tool_calls"] is False
    sent.check("/v1/chat/completions", 2)


def test_langchain_structured_output_by_function_calling(gw) -> None:
    sent = Sent()
    llm = _chat_openai(gw[1], sent, "reporter", responses=False)
    assert llm.with_structured_output(Weather, method="function_calling").invoke(ASK) == Weather(city="Paris",
                                                                                                 sunny=True)
    ((_, body),) = sent.requests
    assert body["parallel_tool_calls"] is False and body["tool_choice"]["function"]["name"] == "Weather"
    sent.check("/v1/chat/completions", 1)
