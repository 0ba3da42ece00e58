"""What a request asks of the engine (`SamplingParams`) and what it gets back (`RequestOutput`)."""

from __future__ import annotations

import dataclasses

from jaxlm.errors import JaxlmError

MAX_TOP_LOGPROBS = 5


class RequestError(JaxlmError):
    """A request's parameter is invalid; ``param`` names it (the server answers 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping, with OpenAI's and vLLM's names.

    ``temperature`` 0 is greedy. ``stop`` strings end the text before them;
    ``stop_token_ids`` and the model's eos end it after the token (not
    shown); ``ignore_eos`` generates exactly ``max_tokens`` tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None        # None: none; 0..5: the chosen token's, plus that many alternatives
    skip_special_tokens: bool = True

    def __post_init__(self):
        def need(ok, param, message):
            if not ok:
                raise RequestError(param, message)

        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
        is_num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
        need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
             f"must be an integer >= 1, got {self.max_tokens!r}")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature",
             f"must be a number >= 0, got {self.temperature!r}")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        need(is_int(self.top_k) and self.top_k >= 0 or self.top_k == -1, "top_k",
             f"must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             f"must be a number > 0, got {self.repetition_penalty!r}")
        need(self.seed is None or is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop",
             f"must be non-empty strings, got {self.stop!r}")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             f"must be token ids, got {self.stop_token_ids!r}")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             "logprobs", f"must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]       # the most likely tokens at this step, (id, logprob), best first


@dataclasses.dataclass
class RequestOutput:
    """What one engine step added to a request (``text`` is the new text only)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
