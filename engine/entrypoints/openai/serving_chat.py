"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request (n choices).

The template is rendered here, with the client's tokenizer, so the engine only ever sees token ids:
long conversations are rendered and tokenized on the app's `TokenizerThread`, off the event loop,
and a rendering too long for max_model_len by its character count alone is refused untokenized.

Streaming sends, per choice, a first chunk with the assistant role, then content deltas, then one
chunk with the finish reason; `stream_options.include_usage` adds a last chunk with usage and no
choices.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ...engine_client import EngineClient, resolve_model_name
from ...outputs import CompletionOutput, Logprob, RequestOutput
from ...processing.tokenizer import TokenizerThread, apply_chat_template
from ..lifecycle import ServerLifecycle, cut_short, request_cut_error
from .errors import bad_request, to_api_error
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogProbContent,
    ChatLogProbEntry,
    ChatLogProbs,
    ChatResponseMessage,
    ChatStreamChoice,
    UsageInfo,
    random_id,
)
from .request_to_params import to_sampling_params
from .streaming import SSE_DONE, close_all, merge_streams, run_until_disconnected, sse, start_streams


async def chat_prompt_token_ids(tokenizer: Any, request_messages: list, tokenizer_thread: TokenizerThread,
                                max_model_len: int) -> list[int]:
    """The conversation rendered with the model's chat template (ValueError for what cannot be); a
    rendering too long for max_model_len tokens is refused before it is tokenized."""
    if tokenizer is None:
        raise bad_request("this server has no tokenizer, so it cannot apply a chat template", param="messages")
    messages = []
    for position, message in enumerate(request_messages):
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text(position)})
    num_chars = sum(len(message["content"]) for message in messages)
    return await tokenizer_thread.run(apply_chat_template, tokenizer, messages, max_model_len, size=num_chars)


class ChatServer:
    def __init__(self, client: EngineClient, lifecycle: ServerLifecycle, tokenizer_thread: TokenizerThread) -> None:
        self.client = client
        self.lifecycle = lifecycle
        self.tokenizer_thread = tokenizer_thread

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = resolve_model_name(self.client, request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        prompt_token_ids = await chat_prompt_token_ids(self.client.tokenizer, request.messages, self.tokenizer_thread,
                                                       self.client.max_model_len)
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = to_sampling_params(request, max_tokens, logprobs)
        chat_id = random_id("chatcmpl")
        iterators = [self.lifecycle.generate(self.client, {"prompt_token_ids": prompt_token_ids}, params, chat_id,
                                             request.priority)]
        # NOTE: a client that leaves while its request waits in the queue aborts it there.
        firsts = await run_until_disconnected(raw_request, start_streams(iterators))
        if firsts is None:
            return Response(status_code=499)
        view = _ChatView(request, self.client.tokenizer)
        if request.stream:
            return StreamingResponse(self._stream(chat_id, model, request, view, iterators, firsts),
                                     media_type="text/event-stream")
        final = await run_until_disconnected(raw_request, self._collect(iterators, firsts))
        if final is None:
            return Response(status_code=499)
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=view.logprobs(c.token_ids, c.logprobs), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in final.outputs]
        return Response(ChatCompletionResponse(id=chat_id, model=model, choices=choices,
                                               usage=_usage(final)).model_dump_json(),
                        media_type="application/json")

    async def _collect(self, iterators: list, firsts: list[RequestOutput]) -> RequestOutput:
        final = firsts[0]
        async for _, output in merge_streams(iterators, firsts):
            final = output
        if cut_short(final):              # e.g. the drain ran out of time: never a 200 with fewer tokens
            raise request_cut_error()
        if final.error:
            raise ValueError(f"the request could not be completed: {final.error}")
        return final

    async def _stream(self, chat_id: str, model: str, request: ChatCompletionRequest, view: "_ChatView",
                      iterators: list, firsts: list[RequestOutput]) -> AsyncIterator[str]:
        final: Optional[RequestOutput] = None
        try:
            yield sse(ChatCompletionChunk(id=chat_id, model=model, choices=[
                ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(request.n)]))
            async for _, output in merge_streams(iterators, firsts):
                choices = [choice for completion in output.outputs
                           if (choice := view.delta_choice(completion)) is not None]
                if choices:
                    yield sse(ChatCompletionChunk(id=chat_id, model=model, choices=choices))
                final = output
            if final is not None and request.stream_options is not None and request.stream_options.include_usage:
                yield sse(ChatCompletionChunk(id=chat_id, model=model, choices=[], usage=_usage(final)))
            if final is not None and cut_short(final):
                # the chunks said finish_reason 'abort'; this says why, before [DONE]
                yield sse(to_api_error(request_cut_error()).body())
        except Exception as error:  # noqa: BLE001 - the status is sent already: report in the stream
            yield sse(to_api_error(error).body())
        finally:
            await close_all(iterators)
        yield SSE_DONE


class _ChatView:
    def __init__(self, request: ChatCompletionRequest, tokenizer: Any) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.finish_sent: set[int] = set()

    def delta_choice(self, completion: CompletionOutput) -> Optional[ChatStreamChoice]:
        newly_finished = completion.finish_reason is not None and completion.index not in self.finish_sent
        wants_logprobs = self.request.logprobs and bool(completion.delta_token_ids)
        if not completion.delta_text and not newly_finished and not wants_logprobs:
            return None
        if newly_finished:
            self.finish_sent.add(completion.index)
        return ChatStreamChoice(
            index=completion.index,
            delta=ChatDelta(content=completion.delta_text) if completion.delta_text or wants_logprobs else ChatDelta(),
            logprobs=self.logprobs(completion.delta_token_ids, completion.delta_logprobs),
            finish_reason=completion.finish_reason if newly_finished else None,
            stop_reason=completion.stop_reason if newly_finished else None)

    def logprobs(self, token_ids: list[int], entries: Optional[list[dict[int, Logprob]]]) -> Optional[ChatLogProbs]:
        if not self.request.logprobs:
            return None
        top_n = self.request.top_logprobs or 0
        content = []
        for token, entry in zip(token_ids, entries or []):
            own = entry.get(token)
            ranked = sorted(entry.items(), key=lambda item: item[1].rank or 0)[:top_n]
            content.append(ChatLogProbContent(
                **self._entry(token, own).model_dump(),
                top_logprobs=[self._entry(t, lp) for t, lp in ranked]))
        return ChatLogProbs(content=content)

    def _entry(self, token: int, logprob: Optional[Logprob]) -> ChatLogProbEntry:
        text = logprob.decoded_token if logprob is not None and logprob.decoded_token is not None \
            else (self.tokenizer.decode([token]) if self.tokenizer is not None else "")
        return ChatLogProbEntry(token=text, logprob=logprob.logprob if logprob is not None else float("-inf"),
                                bytes=list(text.encode("utf-8")))


def _usage(final: RequestOutput) -> UsageInfo:
    prompt_tokens = len(final.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
