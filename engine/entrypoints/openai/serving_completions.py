"""POST /v1/completions: one engine request per prompt, n choices each, streamed or not.

Choice index = prompt index * n + completion index (OpenAI's numbering for several prompts).
`echo` puts the prompt in front of the text (and, with `logprobs`, its logprobs in front: the first
prompt token has none); `echo` with `max_tokens=0` returns the prompt and its logprobs alone, which
is how scoring harnesses (lm-eval) ask for a text's likelihood. `logprobs=k` gives each position's k
most likely tokens plus the token actually there (up to k+1 entries, as OpenAI and vLLM). Usage
counts each prompt once, and every generated token of every choice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ...engine_client import EngineClient, resolve_model_name
from ...outputs import CompletionOutput, Logprob, RequestOutput
from ..lifecycle import ServerLifecycle, cut_short, request_cut_error
from .errors import bad_request, to_api_error
from .protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, UsageInfo, random_id
from .request_to_params import generation_defaults_of, to_sampling_params
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
        echo_only = request.max_tokens == 0
        if echo_only and not request.echo:
            raise bad_request("max_tokens must be >= 1, got 0 (0 is only for echo=true: the prompt and its "
                              "logprobs, nothing generated)", param="max_tokens")
        if echo_only and request.min_tokens:
            raise bad_request(f"min_tokens must be 0 with max_tokens=0, got {request.min_tokens}", param="min_tokens")
        # NOTE: the engine generates at least one token per request (SamplingParams needs max_tokens
        # >= 1), so echo with max_tokens=0 runs with max_tokens=1 and _ChoiceView drops that token:
        # its text, logprobs and usage never reach the client, and the finish reason is "length"
        # (the budget of 0 was spent). The prompt's logprobs come from prompt_logprobs as for any echo.
        max_tokens = 1 if echo_only else request.max_tokens
        echo_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = to_sampling_params(request, max_tokens, request.logprobs, prompt_logprobs=echo_logprobs,
                                    defaults=generation_defaults_of(self.client))
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
        usage = _usage(finals, view.echo_only)
        return Response(
            CompletionResponse(id=completion_id, model=model, choices=choices, usage=usage).model_dump_json(),
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
                                             usage=_usage(list(finals.values()), view.echo_only)))
            if any(cut_short(output) for output in finals.values()):
                # the chunks said finish_reason 'abort'; this says why, before [DONE]
                yield sse(to_api_error(request_cut_error()).body())
        except Exception as error:  # noqa: BLE001 - the status is sent already: report in the stream
            yield sse(to_api_error(error).body())
        finally:
            await close_all(iterators)
        yield SSE_DONE


class _ChoiceView:
    """Turns engine completions into OpenAI choices, remembering what each streamed choice has sent.

    With echo_only (echo and max_tokens=0) the engine's one generated token is not shown: no text,
    no logprobs, finish reason "length".
    """

    def __init__(self, request: CompletionRequest, tokenizer: Any) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.echo_only = request.max_tokens == 0
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
        generated, token_ids, entries = self._generated(completion.text, completion.token_ids, completion.logprobs)
        text = (self._echo(output) if self.request.echo else "") + generated
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs(output, token_ids, entries, 0, with_prompt=self.request.echo)
        finish_reason, stop_reason = self._finish(completion)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                stop_reason=stop_reason)

    def _generated(self, text: str, token_ids: list[int], entries: Optional[list[dict[int, Logprob]]]
                   ) -> tuple[str, list[int], list[dict[int, Logprob]]]:
        """The generated text, tokens and logprobs the client sees (none for echo_only)."""
        if self.echo_only:
            return "", [], []
        return text, token_ids, entries or []

    def _finish(self, completion: CompletionOutput) -> tuple[Optional[str], Optional[Union[int, str]]]:
        if self.echo_only and completion.finish_reason is not None:
            return "length", None
        return completion.finish_reason, completion.stop_reason

    def delta_choice(self, prompt_index: int, output: RequestOutput,
                     completion: CompletionOutput) -> Optional[CompletionChoice]:
        index = prompt_index * self.request.n + completion.index
        first = index not in self.started
        self.started.add(index)
        text, token_ids, entries = self._generated(completion.delta_text, completion.delta_token_ids,
                                                   completion.delta_logprobs)
        with_prompt = first and self.request.echo
        if with_prompt:
            text = self._echo(output) + text
        newly_finished = completion.finish_reason is not None and index not in self.finish_sent
        wants_logprobs = self.request.logprobs is not None and (bool(token_ids) or with_prompt)
        if not text and not newly_finished and not wants_logprobs:
            return None
        if newly_finished:
            self.finish_sent.add(index)
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs(output, token_ids, entries, self.text_offsets.get(index, 0),
                                      with_prompt=with_prompt)
            self.text_offsets[index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                        if logprobs.tokens else self.text_offsets.get(index, 0))
        finish_reason, stop_reason = self._finish(completion)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=finish_reason if newly_finished else None,
                                stop_reason=stop_reason if newly_finished else None)

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
                ranked = sorted(entry.items(), key=lambda item: item[1].rank or 0)[:top_n]
                # NOTE: the token actually there belongs to top_logprobs too, as in OpenAI's and vLLM's
                # answers: k + 1 entries when it is not among the k most likely.
                if own is not None and all(t != token for t, _ in ranked):
                    ranked.append((token, own))
                top: dict[str, float] = {}
                for t, lp in ranked:
                    # NOTE: keyed by text, as OpenAI's format is; tokens that decode alike keep the best
                    text = lp.decoded_token if lp.decoded_token is not None else self._decode(t)
                    top[text] = max(top.get(text, lp.logprob), lp.logprob)
                result.top_logprobs.append(top)
        return result

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""


def _usage(finals: list[RequestOutput], echo_only: bool = False) -> UsageInfo:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in finals)
    completion_tokens = 0 if echo_only else sum(len(c.token_ids) for output in finals for c in output.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
