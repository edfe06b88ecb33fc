"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request (n choices).

The template is rendered here, with the client's tokenizer, so the engine only ever sees token ids:
long conversations are rendered and tokenized on the app's `TokenizerThread`, off the event loop,
and a rendering too long for max_model_len by its character count alone is refused untokenized.

Each choice's text is read back in two stages, whole or delta by delta: the reasoning parser (with
`--reasoning-parser`) splits `reasoning_content` from the answer, then the request's `ToolPlan`
(chat_tools.py) splits tool calls from content. A choice that ends with tool calls finishes with
"tool_calls".

Streaming sends, per choice, a first chunk with the assistant role, then content / reasoning /
tool-call deltas, then one chunk with the finish reason; `stream_options.include_usage` adds a last
chunk with usage and no choices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ...engine_client import EngineClient, resolve_model_name
from ...outputs import CompletionOutput, Logprob, RequestOutput
from ...processing.tokenizer import TokenizerThread, apply_chat_template
from ..lifecycle import ServerLifecycle, cut_short, request_cut_error
from ..settings import ServerSettings
from .chat_messages import ChatCompletionRequest, ChatMessage
from .chat_responses import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatLogProbContent,
                             ChatLogProbEntry, ChatLogProbs, ChatResponseMessage, ChatStreamChoice)
from .chat_tools import ChoiceToolStream, ToolPlan, server_tool_parser
from .tool_parsers import ToolParser
from .errors import bad_request, to_api_error
from .protocol import UsageInfo, random_id
from .reasoning import get_reasoning_parser
from .reasoning.think import END as THINK_END
from .reasoning.think import START as THINK_START
from .reasoning.think import ReasoningStream, ThinkReasoningParser
from .request_to_params import check_compiles, generation_defaults_of, to_sampling_params
from .streaming import SSE_DONE, close_all, merge_streams, run_until_disconnected, sse, start_streams


async def chat_prompt_token_ids(tokenizer: Any, request_messages: list[ChatMessage], tokenizer_thread: TokenizerThread,
                                max_model_len: int, request: Optional[ChatCompletionRequest] = None,
                                chat_template: Optional[str] = None) -> list[int]:
    """The conversation rendered with the chat template (ValueError for what cannot be); a rendering
    too long for max_model_len tokens is refused before it is tokenized. With the chat request, its
    tools, template choice and template variables are rendered too."""
    if tokenizer is None:
        raise bad_request("this server has no tokenizer, so it cannot apply a chat template", param="messages")
    messages = [message.to_template_dict(position) for position, message in enumerate(request_messages)]
    num_chars = sum(len(message["content"]) for message in messages)
    if request is None:
        return await tokenizer_thread.run(apply_chat_template, tokenizer, messages, max_model_len, size=num_chars)
    return await tokenizer_thread.run(
        functools.partial(apply_chat_template, tools=request.template_tools(),
                          chat_template=request.chat_template or chat_template,
                          template_kwargs=request.template_kwargs(),
                          add_generation_prompt=request.add_generation_prompt,
                          continue_final_message=request.continue_final_message),
        tokenizer, messages, max_model_len, size=num_chars)


class ChatServer:
    def __init__(self, client: EngineClient, lifecycle: ServerLifecycle, tokenizer_thread: TokenizerThread,
                 settings: Optional[ServerSettings] = None) -> None:
        settings = settings or ServerSettings()
        self.client = client
        self.lifecycle = lifecycle
        self.tokenizer_thread = tokenizer_thread
        self.settings = settings
        self.chat_template = settings.chat_template
        self._tool_parser: Optional[type[ToolParser]] = None
        if client.tokenizer is not None:          # else (a cluster ingress still fetching it): on first use
            self.tool_parser()                    # a parser that cannot be told fails the start
        self.reasoning_parser: Optional[ThinkReasoningParser] = (
            get_reasoning_parser(settings.reasoning_parser)() if settings.reasoning_parser else None)

    def tool_parser(self) -> Optional[type[ToolParser]]:
        """The parser tool_choice "auto" uses (None: auto tool choice is off)."""
        if self._tool_parser is None and self.settings.enable_auto_tool_choice:
            template = self.settings.chat_template or getattr(self.client.tokenizer, "chat_template", None)
            self._tool_parser = server_tool_parser(self.settings.tool_call_parser, True,
                                                   template if isinstance(template, str) else None)
        return self._tool_parser

    def _reasoning_end_ids(self, prompt_token_ids: list[int]) -> Optional[list[int]]:
        """The token ids of the end-of-reasoning tag, or None when the prompt already closed the block
        (e.g. Qwen3 with enable_thinking=false renders an empty <think></think> itself)."""
        tokenizer = self.client.tokenizer
        tail = tokenizer.decode(prompt_token_ids[-32:])
        if THINK_END in tail[tail.rfind(THINK_START) + 1:] if THINK_START in tail else THINK_END in tail:
            return None
        return tokenizer.encode(THINK_END, add_special_tokens=False) or None

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = resolve_model_name(self.client, request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        tools = ToolPlan.of(request, self.tool_parser())
        prompt_token_ids = await chat_prompt_token_ids(self.client.tokenizer, request.messages, self.tokenizer_thread,
                                                       self.client.max_model_len, request, self.chat_template)
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = to_sampling_params(request, max_tokens, logprobs, defaults=generation_defaults_of(self.client))
        tool_constraint = tools.constraint()
        if tool_constraint is not None:
            check_compiles(tool_constraint, "tools")
            if params.structured_outputs is not None:
                raise bad_request(f"tool_choice {tools.mode!r} already constrains the output; it cannot be combined "
                                  "with response_format or structured_outputs", param="response_format")
            params = dataclasses.replace(params, structured_outputs=tool_constraint)
        if self.reasoning_parser is not None and params.structured_outputs is not None:
            # the constraint is for the answer: it starts once the reasoning block has closed
            after = self._reasoning_end_ids(prompt_token_ids)
            if after is not None:
                params = dataclasses.replace(params, structured_outputs=dataclasses.replace(
                    params.structured_outputs, after_token_ids=after))
        chat_id = random_id("chatcmpl")
        iterators = [self.lifecycle.generate(self.client, {"prompt_token_ids": prompt_token_ids}, params, chat_id,
                                             request.priority)]
        # NOTE: a client that leaves while its request waits in the queue aborts it there.
        firsts = await run_until_disconnected(raw_request, start_streams(iterators))
        if firsts is None:
            return Response(status_code=499)
        view = _ChatView(request, self.client.tokenizer, tools, self.reasoning_parser)
        if request.stream:
            return StreamingResponse(self._stream(chat_id, model, request, view, iterators, firsts),
                                     media_type="text/event-stream")
        final = await run_until_disconnected(raw_request, self._collect(iterators, firsts))
        if final is None:
            return Response(status_code=499)
        choices = [view.choice(c) for c in final.outputs]
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
                pairs = [view.delta_choice(completion) for completion in output.outputs]
                for choices in ([delta for delta, _ in pairs if delta is not None],
                                [finish for _, finish in pairs if finish is not None]):
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
    """Reads one request's choices back: reasoning, then tool calls, then content (whole or streamed)."""

    def __init__(self, request: ChatCompletionRequest, tokenizer: Any, tools: ToolPlan,
                 reasoning: Optional[ThinkReasoningParser]) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.tools = tools
        self.reasoning = reasoning
        self.finish_sent: set[int] = set()
        self._streams: dict[int, tuple[Optional[ReasoningStream], ChoiceToolStream]] = {}

    def choice(self, completion: CompletionOutput) -> ChatChoice:
        reasoning, answer = (self.reasoning.extract(completion.text) if self.reasoning is not None
                             else (None, completion.text))
        content, tool_calls = self.tools.read(answer or "")
        if self.tools.mode == "none" and answer is None:
            content = None
        return ChatChoice(
            index=completion.index,
            message=ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls),
            logprobs=self.logprobs(completion.token_ids, completion.logprobs),
            finish_reason=_finish_reason(completion.finish_reason, bool(tool_calls)),
            stop_reason=completion.stop_reason)

    def delta_choice(self, completion: CompletionOutput
                     ) -> tuple[Optional[ChatStreamChoice], Optional[ChatStreamChoice]]:
        """(the choice's new deltas, its finish): the finish reason travels in a chunk of its own, after
        the last delta, as OpenAI sends it (the SDK closes a streamed tool call's arguments then)."""
        newly_finished = completion.finish_reason is not None and completion.index not in self.finish_sent
        reasoning_stream, tool_stream = self._streams.setdefault(
            completion.index, (self.reasoning.stream() if self.reasoning is not None else None, self.tools.stream()))
        reasoning, answer = (reasoning_stream.feed(completion.delta_text) if reasoning_stream is not None
                             else (None, completion.delta_text))
        content, tool_calls = tool_stream.feed(answer or "")
        if newly_finished:
            self.finish_sent.add(completion.index)
            if reasoning_stream is not None:
                last_reasoning, last_answer = reasoning_stream.finish()
                reasoning = (reasoning or "") + (last_reasoning or "") or None
                more_content, more_calls = tool_stream.feed(last_answer or "")
                content, tool_calls = content + more_content, tool_calls + more_calls
            last_content, last_calls = tool_stream.finish()
            content, tool_calls = content + last_content, tool_calls + last_calls
        wants_logprobs = self.request.logprobs and bool(completion.delta_token_ids)
        choice = finish = None
        if content or reasoning or tool_calls or wants_logprobs:
            delta = ChatDelta(content=content or None, reasoning_content=reasoning or None,
                              tool_calls=tool_calls or None)
            if wants_logprobs and delta.content is None and not reasoning and not tool_calls:
                delta.content = ""
            choice = ChatStreamChoice(index=completion.index, delta=delta,
                                      logprobs=self.logprobs(completion.delta_token_ids, completion.delta_logprobs))
        if newly_finished:
            finish = ChatStreamChoice(
                index=completion.index, delta=ChatDelta(),
                finish_reason=_finish_reason(completion.finish_reason, tool_stream.num_calls > 0),
                stop_reason=completion.stop_reason)
        return choice, finish

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


def _finish_reason(reason: Optional[str], has_tool_calls: bool) -> Optional[str]:
    """OpenAI's "tool_calls" for a choice that stopped on its own with calls; "length" etc. stay."""
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


def _usage(final: RequestOutput) -> UsageInfo:
    prompt_tokens = len(final.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
