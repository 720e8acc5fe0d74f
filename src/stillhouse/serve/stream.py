"""Streaming: which text and tokens of each choice are new, and the SSE framing around them."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from .engine import Job
from .text import stop_holdback


def sse_response(events, jobs: list[Job], stats: dict) -> StreamingResponse:
    """Server-sent events from `events` (dicts), ended by `data: [DONE]`. The response holds
    its request's in-flight slot until the stream ends (`holds_slot`)."""
    released = False

    def release():
        """Free the request's slot and stop its rows (once): from the body's end, or from the
        response's background task if the body never started (the client left at once)."""
        nonlocal released
        if released:
            return
        released = True
        stats["in_flight"] -= 1
        if not all(j.done for j in jobs):
            stats["disconnected"] += 1
            for j in jobs:
                j.cancel()
        else:
            stats["completed"] += 1

    async def body():
        try:
            async for ev in events:
                yield f"data: {json.dumps(ev, ensure_ascii=True)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # a failed decode step: tell the client in-stream, then end
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {type(e).__name__}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        finally:  # also when the client went away: starlette cancels this generator
            release()

    response = StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(release))
    response.holds_slot = True
    return response

async def deltas(jobs: list[Job], updates: asyncio.Queue, final):
    """(seq, new text, first new token, end token) each time a choice advances; holds back
    text a stop string could still claim, and sends the rest when the choice finishes."""
    sent_text: dict[int, int] = {}
    sent_tok: dict[int, int] = {}
    while True:
        pending = [s for j in jobs for s in j.seqs if id(s) not in sent_tok or sent_tok[id(s)] >= 0]
        if not pending:
            return
        s = await updates.get()
        if s.job.error is not None:
            raise s.job.error
        if sent_tok.get(id(s), 0) < 0:
            continue  # already finished
        a = sent_tok.get(id(s), 0)
        if s.done:
            text, b = final(s), len(s.logprobs) if s.sampling.top_logprobs >= 0 else len(s.ids)
        else:
            held = stop_holdback(s.sampling.stop)
            text = s.text.text[: max(0, len(s.text.text) - held)]
            b = len(s.logprobs) if s.sampling.top_logprobs >= 0 else len(s.ids)
        done_chars = sent_text.get(id(s), 0)
        delta = text[done_chars:] if len(text) > done_chars else ""
        sent_text[id(s)] = max(done_chars, len(text))
        sent_tok[id(s)] = -1 if s.done else b
        yield s, delta, a, b
