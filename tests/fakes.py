"""Test doubles shared by stage tests: a scripted engine for parsing/filter logic.

Use the real HF engine on the tiny model where a test is about generation; use ``FakeEngine`` where
it is about what a stage does with fixed completions (parsing, filtering, resumption).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from selfalign.generation.base import Request, Result, SamplingParams


class FakeEngine:
    """Returns ``respond(request)`` for each request; records every request it saw."""

    name = "fake"

    def __init__(self, respond: Callable[[Request], str] | Sequence[str]):
        if callable(respond):
            self._respond = respond
        else:
            texts = list(respond)
            self._respond = lambda req, _t=texts: _t[self._calls % len(_t)]
        self._calls = 0
        self.seen: list[Request] = []

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> Iterator[Result]:
        for req in requests:
            self.seen.append(req)
            text = self._respond(req)
            self._calls += 1
            yield Result(id=req.id, text=text, finish="stop", prompt_tokens=len(req.prompt.split()),
                         completion_tokens=len(text.split()))
