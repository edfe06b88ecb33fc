"""The ingress app and `ClusterEngineClient` in one process, over fake deployment handles that drive real
`LLMReplica`s (in-process engines) and inject replica failures: retries, error mapping, model and
session routing, without a Ray cluster. Every test runs twice: outputs streamed over each request's
own call, and through the token channel (an in-process mailbox in place of the Ray actor)."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Optional

import httpx
import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from pagoda.cluster.channels import Mailbox
from pagoda.cluster.client import ClusterEngineClient, ModelRoute, _cause
from pagoda.cluster.config import ModelDeployment
from pagoda.cluster.ingress import build_ingress_app
from pagoda.cluster.replica import LLMReplica
from pagoda.cluster.routing_policy import prompt_block_hashes
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.sampling_params import SamplingParams

API_KEY = "k"


class _Stream:
    """What `handle.options(stream=True).generate.remote(call)` returns: an async iterator + cancel()."""

    def __init__(self, batches: Any) -> None:
        self._batches = batches
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._batches.__anext__()

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self._batches.aclose())


class FakeHandle:
    """A deployment handle over one in-process replica. `failures[i]` scripts call i of generate:
    (batches to pass through, exception to raise then) or None for a normal call."""

    def __init__(self, replica: LLMReplica) -> None:
        self.replica = replica
        self.failures: list[Optional[tuple[int, BaseException]]] = []
        self.calls: list[Any] = []
        self.describes = 0
        outer = self

        class _Generate:
            def remote(self, call: Any) -> _Stream:
                outer.calls.append(call)
                failure = outer.failures.pop(0) if outer.failures else None
                return _Stream(outer._run(call, failure))

        class _Describe:
            async def _describe(self) -> Any:
                outer.describes += 1
                return await outer.replica.describe()

            def remote(self) -> Any:
                return self._describe()

        self.generate, self.describe = _Generate(), _Describe()

    def options(self, **kwargs: Any) -> "FakeHandle":
        return self

    async def _run(self, call: Any, failure: Optional[tuple[int, BaseException]]):
        if call.channel is not None and failure is not None:
            # channel mode: the replica "dies" before the request (k = 0) or, for k > 0, after the
            # channel delivered its batches, instead of sending the final outputs (its LeaseEnd)
            if failure[0] == 0:
                raise failure[1]
            async for _ in self.replica.generate(call):
                pass
            while self.replica._outboxes.get(call.channel.channel_id) and \
                    self.replica._outboxes[call.channel.channel_id].items:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            raise failure[1]
        batches = self.replica.generate(call)
        try:
            count = 0
            async for batch in batches:
                if failure is not None and count == failure[0]:
                    raise failure[1]
                yield batch
                count += 1
        finally:
            await batches.aclose()


class _Remote:
    def __init__(self, method: Any) -> None:
        self.method = method

    def remote(self, *args: Any) -> Any:
        return self.method(*args)


class FakeMailbox:
    """The Mailbox class in-process, called like a Ray actor; records every put (one per call)."""

    def __init__(self) -> None:
        self.box = Mailbox()
        self.puts: list[Any] = []
        self.put, self.take = _Remote(self._put), _Remote(self.box.take)

    async def _put(self, items: Any) -> None:
        self.puts.append(items)
        await self.box.put(items)


class LoopThread:
    """One event loop for the module: each AsyncEngine serves the loop it first ran on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def replicas(tiny_model, loop_thread):
    """Two served names over the same weights (two engines)."""
    built = {}
    for name in ("tiny", "other"):
        deployment = {"model": str(tiny_model), "served_model_name": name, "num_gpus_per_worker": 0,
                      "engine_args": {"kv_cache_memory_bytes": 16 << 20, "device": "cpu"}}
        built[name] = LLMReplica(deployment)
    yield built
    for replica in built.values():
        replica.engine.shutdown()


@pytest.fixture(params=["per-request streams", "token channels"])
def ingress(request, replicas, loop_thread):
    """(handles by model, request(method, path, **kwargs) -> httpx.Response) for a fresh ingress app."""
    handles = {name: FakeHandle(replica) for name, replica in replicas.items()}
    routes = [ModelRoute(ModelDeployment(model="x", served_model_name=name), f"model-{name}", handle)
              for name, handle in handles.items()]
    mailboxes: list[FakeMailbox] = []

    def mailbox() -> FakeMailbox:
        mailboxes.append(FakeMailbox())
        return mailboxes[-1]

    channels = request.param == "token channels"
    client = ClusterEngineClient(routes, app_name="test", token_channels=channels, mailbox_factory=mailbox)
    for handle in handles.values():
        handle.mailboxes = mailboxes
    app = build_ingress_app(client, ServerSettings(api_key=API_KEY, max_request_body_bytes=4096))

    async def send(method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=60) as http:
            return await http.request(method, path, headers=headers, **kwargs)

    def request(method: str, path: str, **kwargs: Any) -> httpx.Response:
        return loop_thread.run(send(method, path, **kwargs))

    yield handles, request
    for handle in handles.values():      # the mode really ran: every call named the channel or none
        assert all((call.channel is not None) == channels for call in handle.calls)


def _completion(**overrides: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    return {**body, **overrides}


def _events(response: httpx.Response) -> list[Any]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_a_request_that_fails_before_any_output_is_retried(ingress):
    handles, request = ingress
    handles["tiny"].failures = [(0, ActorDiedError())]
    response = request("POST", "/v1/completions", json=_completion())
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 12
    first, second = handles["tiny"].calls
    assert (first.hints.attempt, second.hints.attempt) == (0, 1)
    assert second.request_id == first.request_id + ".retry1" and second.hints.request_id == first.request_id


def test_a_non_streamed_request_is_retried_even_after_outputs(ingress):
    handles, request = ingress
    reference = request("POST", "/v1/completions", json=_completion()).json()["choices"][0]["text"]
    handles["tiny"].failures = [(3, ActorDiedError())]
    response = request("POST", "/v1/completions", json=_completion())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference
    assert len(handles["tiny"].calls) == 3


def test_a_stream_that_sent_tokens_ends_with_an_error_event(ingress):
    handles, request = ingress
    handles["tiny"].failures = [(3, ActorDiedError())]
    # logprobs: every token makes a chunk, even while the detokenizer holds back partial characters
    response = request("POST", "/v1/completions", json=_completion(stream=True, logprobs=1))
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "engine_dead" and "replica" in error["message"]
    assert len(events) > 3, events          # chunks were streamed before the failure
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"])   # no fake finish
    assert len(handles["tiny"].calls) == 1


def test_a_stream_that_fails_before_output_is_retried(ingress):
    handles, request = ingress
    handles["tiny"].failures = [(0, ActorDiedError())]
    response = request("POST", "/v1/chat/completions",
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                             "stream": True, "ignore_eos": True})
    events = _events(response)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(handles["tiny"].calls) == 2


def test_two_failed_attempts_give_503(ingress):
    handles, request = ingress
    handles["tiny"].failures = [(0, ActorDiedError()), (0, ActorDiedError())]
    response = request("POST", "/v1/completions", json=_completion())
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"


def test_back_pressure_is_503_with_retry_after(ingress):
    handles, request = ingress
    handles["tiny"].failures = [(0, BackPressureError(num_queued_requests=4, max_queued_requests=4))]
    response = request("POST", "/v1/completions", json=_completion())
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "queue_full"
    assert len(handles["tiny"].calls) == 1          # back-pressure is not retried


def test_replica_errors_reach_the_client_without_ray_wrapping():
    error = RayTaskError("generate", "Traceback ...", ValueError("prompt has 9000 tokens")).as_instanceof_cause()
    assert isinstance(error, ValueError)
    cause = _cause(error)
    assert type(cause) is ValueError and str(cause) == "prompt has 9000 tokens"


def test_requests_route_by_model_and_carry_routing_hints(ingress, replicas):
    handles, request = ingress
    prompt = "Paged attention stores keys and values in fixed-size blocks. " * 4
    response = request("POST", "/v1/completions", json=_completion(model="other", prompt=prompt),
                       headers={"x-session-id": "conversation-7"})
    assert response.status_code == 200 and response.json()["model"] == "other"
    assert not handles["tiny"].calls
    [call] = handles["other"].calls
    tokenizer = replicas["other"].engine.tokenizer
    assert call.hints.prefix_hashes == prompt_block_hashes(tokenizer.encode(prompt), 16)
    assert len(call.hints.prefix_hashes) >= 2 and call.hints.session_id == "conversation-7"
    response = request("POST", "/v1/completions", json=_completion(model="nope"))
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_auth_and_size_checks_come_before_any_replica(ingress):
    handles, request = ingress
    response = request("POST", "/v1/completions", json=_completion(), headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    response = request("POST", "/v1/completions", content=json.dumps(_completion(prompt="x" * 5000)))
    assert response.status_code == 413
    assert handles["tiny"].describes == 0 and not handles["tiny"].calls
    response = request("POST", "/v1/completions", content=b"{not json")
    assert response.status_code == 400


def test_tokenize_uses_the_requested_models_tokenizer(ingress, replicas):
    handles, request = ingress
    response = request("POST", "/tokenize", json={"model": "other", "prompt": "Hello world"})
    assert response.status_code == 200
    assert response.json()["tokens"] == list(replicas["other"].engine.tokenizer.encode("Hello world"))
    assert handles["other"].describes == 1 and handles["tiny"].describes == 0
    models = request("GET", "/v1/models").json()
    assert [card["id"] for card in models["data"]] == ["tiny", "other"]


def test_concurrent_streams_share_batched_channel_items(ingress):
    """Eight concurrent streams: each gets exactly what it gets alone, and (in channel mode) one
    channel item carries outputs of several requests, so the channel moves fewer items than tokens."""
    handles, request = ingress
    prompts = [f"{i} Once upon a time" for i in range(8)]
    alone = [request("POST", "/v1/completions", json=_completion(prompt=p, max_tokens=16)).json()["choices"][0]["text"]
             for p in prompts[:2]]

    async def together() -> list[Any]:
        async def one(prompt: str) -> Any:
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: request("POST", "/v1/completions", json=_completion(prompt=prompt, max_tokens=16,
                                                                                   stream=True)))
        return await asyncio.gather(*[one(p) for p in prompts])

    for mailbox in handles["tiny"].mailboxes:
        mailbox.puts.clear()
    responses = asyncio.run(together())
    texts = ["".join(e["choices"][0]["text"] for e in _events(r)[:-1] if e["choices"]) for r in responses]
    assert texts[:2] == alone
    assert all([e for e in _events(r)[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "length"
               for r in responses)
    if handles["tiny"].calls[-1].channel is not None:
        puts = [items for mailbox in handles["tiny"].mailboxes for items in mailbox.puts]
        tokens = sum(len(c.delta_token_ids) for items in puts for _, _, batch in items
                     for wire in batch for c in wire.completions)
        assert tokens >= 8 * 14                      # the last batch of each request rides its LeaseEnd
        assert len(puts) < tokens / 2, (len(puts), tokens)
        assert max(len({rid for rid, _, _ in items}) for items in puts) > 1


def test_the_token_channel_opens_before_the_first_request(replicas, loop_thread):
    made: list[FakeMailbox] = []

    def mailbox() -> FakeMailbox:
        made.append(FakeMailbox())
        return made[-1]

    handle = FakeHandle(replicas["tiny"])
    handle.mailboxes = made
    client = ClusterEngineClient([ModelRoute(ModelDeployment(model="x", served_model_name="tiny"), "model-tiny",
                                             handle)], app_name="test", mailbox_factory=mailbox)

    async def main() -> list:
        await client.open_channel()
        assert len(made) == 1                       # made at start-up, before any request
        params = SamplingParams(max_tokens=4)
        return [output async for output in client.generate("Once upon a time", params, "first")]

    outputs = loop_thread.run(main())
    assert outputs[-1].finished and len(made) == 1 and handle.calls[0].channel is not None


def test_the_replicas_generation_defaults_reach_requests(tiny_model, loop_thread, tmp_path):
    """The ingress merges the defaults the replica describes (its model's generation_config.json)."""
    import shutil

    directory = tmp_path / "stated"
    shutil.copytree(tiny_model, directory)
    (directory / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    replica = LLMReplica({"model": str(directory), "served_model_name": "stated", "num_gpus_per_worker": 0,
                          "engine_args": {"kv_cache_memory_bytes": 16 << 20, "device": "cpu"}})
    try:
        handle = FakeHandle(replica)
        route = ModelRoute(ModelDeployment(model="x", served_model_name="stated"), "model-stated", handle)
        app = build_ingress_app(ClusterEngineClient([route], app_name="test", token_channels=False),
                                ServerSettings(api_key=API_KEY))

        async def chat(**fields: Any) -> httpx.Response:
            body = {"model": "stated", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress",
                                         timeout=60) as http:
                return await http.post("/v1/chat/completions", json=body,
                                       headers={"Authorization": f"Bearer {API_KEY}"})

        assert loop_thread.run(chat()).status_code == 200
        assert loop_thread.run(chat(temperature=0.0)).status_code == 200
        unset, given = (call.params for call in handle.calls)
        assert (unset.temperature, unset.top_k) == (0.6, 20)
        assert (given.temperature, given.top_k) == (0.0, 20)
    finally:
        replica.engine.shutdown()
