"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not.

Choice index = prompt index * n + completion index (OpenAI's numbering for several prompts).
`echo` puts the prompt in front of the text (and, with `logprobs`, its logprobs in front: the first
prompt token has none). Usage counts each prompt once, and every generated token of every choice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ...engine_client import EngineClient, resolve_model_name
from ...outputs import CompletionOutput, Logprob, RequestOutput
from ..lifecycle import ServerLifecycle, cut_short, request_cut_error
from .errors import bad_request, to_api_error
from .protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, UsageInfo, random_id
from .request_to_params import to_sampling_params
from .streaming import SSE_DONE, close_all, merge_streams, run_until_disconnected, sse, start_streams


class CompletionServer:
    def __init__(self, client: EngineClient, lifecycle: ServerLifecycle) -> None:
        self.client = client
        self.lifecycle = lifecycle

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = resolve_model_name(self.client, request.model)
        if request.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request(f"best_of must equal n (pagoda returns every sample), got best_of={request.best_of} "
                              f"and n={request.n}", param="best_of")
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = to_sampling_params(request, request.max_tokens, request.logprobs, prompt_logprobs=echo_logprobs)
        completion_id = random_id("cmpl")
        prompts = request.prompts()
        iterators = [
            self.lifecycle.generate(
                self.client, prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
                dataclasses.replace(params), f"{completion_id}-{index}", request.priority)
            for index, prompt in enumerate(prompts)
        ]
        # NOTE: a client that leaves while its request waits in the queue aborts it there.
        firsts = await run_until_disconnected(raw_request, start_streams(iterators))
        if firsts is None:
            return Response(status_code=499)
        view = _ChoiceView(request, self.client.tokenizer)
        if request.stream:
            return StreamingResponse(self._stream(completion_id, model, request, view, iterators, firsts),
                                     media_type="text/event-stream")
        finals = await run_until_disconnected(raw_request, self._collect(iterators, firsts))
        if finals is None:            # the client went away; nobody reads this
            return Response(status_code=499)
        choices = []
        for prompt_index, output in enumerate(finals):
            for completion in output.outputs:
                choices.append(view.choice(prompt_index, output, completion, full=True))
        return Response(
            CompletionResponse(id=completion_id, model=model, choices=choices, usage=_usage(finals)).model_dump_json(),
            media_type="application/json")

    async def _collect(self, iterators: list, firsts: list[RequestOutput]) -> list[RequestOutput]:
        finals: list[RequestOutput] = list(firsts)
        async for index, output in merge_streams(iterators, firsts):
            finals[index] = output
        for output in finals:
            if cut_short(output):         # e.g. the drain ran out of time: never a 200 with fewer tokens
                raise request_cut_error()
            if output.error:
                raise ValueError(f"the request could not be completed: {output.error}")
        return finals

    async def _stream(self, completion_id: str, model: str, request: CompletionRequest, view: "_ChoiceView",
                      iterators: list, firsts: list[RequestOutput]) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            async for prompt_index, output in merge_streams(iterators, firsts):
                choices = [choice for completion in output.outputs
                           if (choice := view.delta_choice(prompt_index, output, completion)) is not None]
                if choices:
                    yield sse(CompletionResponse(id=completion_id, model=model, choices=choices))
                if output.finished:
                    finals[prompt_index] = output
            if request.stream_options is not None and request.stream_options.include_usage:
                yield sse(CompletionResponse(id=completion_id, model=model, choices=[],
                                             usage=_usage(list(finals.values()))))
            if any(cut_short(output) for output in finals.values()):
                # the chunks said finish_reason 'abort'; this says why, before [DONE]
                yield sse(to_api_error(request_cut_error()).body())
        except Exception as error:  # noqa: BLE001 - the status is sent already: report in the stream
            yield sse(to_api_error(error).body())
        finally:
            await close_all(iterators)
        yield SSE_DONE


class _ChoiceView:
    """Turns engine completions into OpenAI choices, remembering what each streamed choice has sent."""

    def __init__(self, request: CompletionRequest, tokenizer: Any) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.started: set[int] = set()
        self.finish_sent: set[int] = set()
        self.text_offsets: dict[int, int] = {}

    def _echo(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids) if self.tokenizer is not None else ""

    def choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput,
               full: bool) -> CompletionChoice:
        index = prompt_index * self.request.n + completion.index
        text = (self._echo(output) if self.request.echo else "") + completion.text
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs(output, completion.token_ids, completion.logprobs or [], 0,
                                      with_prompt=self.request.echo)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason)

    def delta_choice(self, prompt_index: int, output: RequestOutput,
                     completion: CompletionOutput) -> Optional[CompletionChoice]:
        index = prompt_index * self.request.n + completion.index
        first = index not in self.started
        self.started.add(index)
        text = completion.delta_text
        if first and self.request.echo:
            text = self._echo(output) + text
        newly_finished = completion.finish_reason is not None and index not in self.finish_sent
        wants_logprobs = self.request.logprobs is not None and bool(completion.delta_token_ids)
        if not text and not newly_finished and not wants_logprobs:
            return None
        if newly_finished:
            self.finish_sent.add(index)
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs(output, completion.delta_token_ids, completion.delta_logprobs or [],
                                      self.text_offsets.get(index, 0), with_prompt=first and self.request.echo)
            self.text_offsets[index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                        if logprobs.tokens else self.text_offsets.get(index, 0))
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason if newly_finished else None,
                                stop_reason=completion.stop_reason if newly_finished else None)

    def _logprobs(self, output: RequestOutput, token_ids: list[int], entries: list[dict[int, Logprob]],
                  offset: int, with_prompt: bool) -> CompletionLogProbs:
        result = CompletionLogProbs()
        pairs: list[tuple[int, Optional[dict[int, Logprob]]]] = []
        if with_prompt:
            prompt_entries = output.prompt_logprobs or []
            pairs += [(token, prompt_entries[i] if i < len(prompt_entries) else None)
                      for i, token in enumerate(output.prompt_token_ids)]
        pairs += list(zip(token_ids, entries))
        top_n = self.request.logprobs or 0
        for token, entry in pairs:
            own = entry.get(token) if entry else None
            token_text = own.decoded_token if own is not None and own.decoded_token is not None \
                else self._decode(token)
            result.tokens.append(token_text)
            result.token_logprobs.append(own.logprob if own is not None else None)
            result.text_offset.append(offset)
            offset += len(token_text)
            if entry is None:
                result.top_logprobs.append(None)
            else:
                top: dict[str, float] = {}
                for t, lp in sorted(entry.items(), key=lambda item: item[1].rank or 0)[:top_n]:
                    # NOTE: keyed by text, as OpenAI's format is; tokens that decode alike keep the best
                    top.setdefault(lp.decoded_token if lp.decoded_token is not None else self._decode(t), lp.logprob)
                result.top_logprobs.append(top)
        return result

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""


def _usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in finals)
    completion_tokens = sum(len(c.token_ids) for output in finals for c in output.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
