"""The gRPC API against the shared server: streaming, auth, cancel, deadline, limits."""
from __future__ import annotations

import grpc
import httpx
import pytest

from .server_helpers import API_KEY, MODEL_NAME, metric, wait_for

from pagoda.engine.entrypoints.grpc import generate_stubs, pagoda_pb2, pagoda_pb2_grpc

AUTH = (("authorization", f"Bearer {API_KEY}"),)
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stub(main_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{main_server.grpc_port}")
    yield pagoda_pb2_grpc.PagodaStub(channel)
    channel.close()


def greedy_request(max_tokens: int, **sampling) -> pagoda_pb2.GenerateRequest:
    return pagoda_pb2.GenerateRequest(text=PROMPT, sampling=pagoda_pb2.SamplingOptions(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling))


def test_health_and_models(stub):
    assert stub.Health(pagoda_pb2.HealthRequest(), timeout=10).healthy       # open, no key needed
    models = stub.ListModels(pagoda_pb2.ListModelsRequest(), metadata=AUTH, timeout=10).models
    assert [(m.id, m.max_model_len) for m in models] == [(MODEL_NAME, 8192)]


def test_generate_streams_tokens_and_text(stub, main_server):
    responses = list(stub.Generate(greedy_request(10, logprobs=0), metadata=AUTH, timeout=60))
    token_ids = [t for r in responses for t in r.token_ids]
    assert len(token_ids) == 10
    assert sum(len(r.logprobs) for r in responses) == 10
    assert [r.finish_reason for r in responses][-1] == "length"
    assert all(r.finish_reason == "" for r in responses[:-1])
    assert responses[-1].usage.completion_tokens == 10
    http = httpx.post(f"{main_server.url}/v1/completions", headers=main_server.headers, timeout=60, json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert "".join(r.text for r in responses) == http.json()["choices"][0]["text"]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)])
def test_unauthenticated(stub, metadata):
    for call in (lambda: list(stub.Generate(greedy_request(2), metadata=metadata, timeout=10)),
                 lambda: stub.ListModels(pagoda_pb2.ListModelsRequest(), metadata=metadata, timeout=10)):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_invalid_argument_and_not_found(stub):
    bad = pagoda_pb2.GenerateRequest(text=PROMPT, sampling=pagoda_pb2.SamplingOptions(top_p=5.0))
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(bad, metadata=AUTH, timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(pagoda_pb2.GenerateRequest(sampling=pagoda_pb2.SamplingOptions()), metadata=AUTH,
                           timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(pagoda_pb2.GenerateRequest(model="nope", text=PROMPT), metadata=AUTH, timeout=10))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_size_limit(stub):
    huge = pagoda_pb2.GenerateRequest(text="a" * (2 << 20))
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(huge, metadata=AUTH, timeout=10))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _aborts(server) -> float:
    return metric(server.metrics(), "pagoda:request_success_total", finished_reason="abort")


def _idle_after_abort(server, aborts_before: float) -> bool:
    values = server.metrics()
    return (metric(values, "pagoda:num_requests_running") == 0
            and metric(values, "pagoda:kv_cache_usage_perc") == 0
            and metric(values, "pagoda:request_success_total", finished_reason="abort") >= aborts_before + 1)


def test_client_cancel_aborts(stub, main_server):
    before = _aborts(main_server)
    call = stub.Generate(greedy_request(4000, logprobs=0), metadata=AUTH, timeout=120)
    for index, _ in enumerate(call):
        if index == 2:
            break
    call.cancel()
    assert wait_for(lambda: _idle_after_abort(main_server, before), timeout_s=5.0), main_server.metrics()


def test_deadline_aborts(stub, main_server):
    before = _aborts(main_server)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(greedy_request(4000), metadata=AUTH, timeout=0.5))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: _idle_after_abort(main_server, before), timeout_s=5.0), main_server.metrics()


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools")
    assert generate_stubs.main(["--check"]) == 0
