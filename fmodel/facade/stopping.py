"""Stopping criteria the facade's `generate` adds from Transformers' arguments: `stop_strings`
(Transformers' `StopStringCriteria` when installed, else a decoded-text check) and `max_time`."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import InvalidArgumentError

__all__ = ["MaxTime", "stop_string_criterion"]


def stop_string_criterion(stop_strings, tokenizer):
    if tokenizer is None:
        raise InvalidArgumentError(
            "There are one or more stop strings, either in the arguments to `generate` or in the "
            "model's generation config, but we could not locate a tokenizer. When generating with "
            "stop strings, you must pass the model's tokenizer to the `tokenizer` argument of `generate`."
        )
    try:
        from transformers import StopStringCriteria
    except ImportError:
        return _DecodedStopStrings(stop_strings, tokenizer)
    return StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)


class MaxTime:
    """Transformers' `MaxTimeCriteria`: every row is done once `max_time` seconds have passed."""

    def __init__(self, max_time: float) -> None:
        self.max_time, self.start = max_time, time.time()

    def __call__(self, input_ids: torch.Tensor, scores: Any) -> bool:
        return time.time() - self.start > self.max_time


class _DecodedStopStrings:
    """Without Transformers: a row stops when the decoded text of its last tokens ends with a
    stop string (each token decodes to at least one character, so the last len(longest) tokens
    hold any match)."""

    def __init__(self, stop_strings, tokenizer) -> None:
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        self.window = max(len(s) for s in self.stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores: Any) -> torch.Tensor:
        tails = [self.tokenizer.decode(row[-self.window :].tolist()) for row in input_ids]
        done = [any(text.endswith(s) for s in self.stop_strings) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
