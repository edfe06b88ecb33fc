"""GET /v1/models/{model}: the openai SDK's `client.models.retrieve` gets the model's card, or a 404
in OpenAI's error envelope (code model_not_found) naming the id; served names may hold slashes."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx
import openai
import pytest

from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.outputs import EngineStats

API_KEY = "secret"


class _Client:
    """An engine client that serves names and nothing else (these routes never generate)."""

    tokenizer = None
    max_model_len = 4096

    def __init__(self, names: list[str]) -> None:
        self.model_names = names

    async def generate(self, prompt, params, request_id, priority=0) -> AsyncIterator[Any]:
        raise AssertionError("not called")
        yield  # pragma: no cover

    async def abort(self, request_id: str) -> None: ...
    async def get_stats(self) -> EngineStats: return EngineStats()
    async def is_healthy(self) -> bool: return True
    async def render_metrics(self) -> bytes: return b""


def _sdk(names: list[str]) -> openai.AsyncOpenAI:
    app = build_app(_Client(names), ServerSettings(api_key=API_KEY))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    return openai.AsyncOpenAI(base_url="http://app/v1", api_key=API_KEY, http_client=http, max_retries=0)


@pytest.mark.parametrize("name", ["tiny", "org/Model-7B", "my model:v2"])
def test_retrieve_returns_the_card(name):
    async def main() -> Any:
        return await _sdk(["first", name]).models.retrieve(name)

    card = asyncio.run(main())
    assert (card.id, card.object, card.owned_by) == (name, "model", "pagoda")
    assert card.model_extra["max_model_len"] == 4096


def test_cards_say_what_the_server_runs():
    """quantization / weights / kv_cache_dtype come from the engine's `model_format` (EngineConfig.serving_format)."""
    client = _Client(["tiny"])
    client.model_format = {"quantization": "fp8", "weights": "fp8: per-channel weights, dynamic per-token "
                           "activations", "kv_cache_dtype": "float8_e4m3fn"}
    app = build_app(client, ServerSettings(api_key=API_KEY))

    async def main() -> Any:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        sdk = openai.AsyncOpenAI(base_url="http://app/v1", api_key=API_KEY, http_client=http, max_retries=0)
        return (await sdk.models.list()).data[0], await sdk.models.retrieve("tiny")

    for card in asyncio.run(main()):
        assert card.model_extra["quantization"] == "fp8"
        assert card.model_extra["kv_cache_dtype"] == "float8_e4m3fn"
        assert card.model_extra["weights"].startswith("fp8: per-channel")


def test_serving_format_of_an_engine_config(tmp_path):
    from model_factory import save_tiny_model

    from pagoda.engine import EngineArgs

    directory = save_tiny_model(tmp_path / "tiny")
    plain = EngineArgs(model=str(directory), device="cpu").create_config().serving_format()
    assert plain == {"quantization": None, "weights": "float32", "kv_cache_dtype": "float32"}
    fp8 = EngineArgs(model=str(directory), device="cpu", quantization="fp8",
                     kv_cache_dtype="fp8").create_config().serving_format()
    assert fp8["quantization"] == "fp8" and fp8["kv_cache_dtype"] == "float8_e4m3fn"
    assert fp8["weights"].startswith("fp8")


def test_retrieve_of_an_unknown_model_is_404_naming_it():
    async def main() -> None:
        await _sdk(["tiny"]).models.retrieve("gpt-9")

    with pytest.raises(openai.NotFoundError) as raised:
        asyncio.run(main())
    assert raised.value.status_code == 404
    error = raised.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "gpt-9" in error["message"] and "tiny" in error["message"]


def test_retrieve_needs_the_api_key():
    async def main() -> httpx.Response:
        app = build_app(_Client(["tiny"]), ServerSettings(api_key=API_KEY))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.get("/v1/models/tiny")

    assert asyncio.run(main()).status_code == 401
