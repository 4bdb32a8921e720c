"""`response_format` for the embedded engine: JSON-constrained decoding with xgrammar.

xgrammar is what vLLM uses for the same job. A format is compiled once against the tokenizer
(`Grammars.compile`, cached by xgrammar's compiler); each choice of a request then gets its own
`GrammarMatcher`, which lives with that row in the running batch. Before each sampling step the
matcher says which tokens may come next (a bitmask; the rest get -inf); after it, the sampled
token is fed to the matcher. Once the JSON is complete only an end-of-sequence token is allowed,
so the row ends with finish_reason "stop"; `max_tokens` can still cut it ("length").

JSON is generated compact (`any_whitespace=False`): with free whitespace a small model can write
newlines and spaces until `max_tokens` and never close the object.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from service.core.errors import InvalidRequestError

# xgrammar's messages start with a time and a C++ source location: not for clients.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# The compiler's cache (compiled grammars by schema) is bounded: clients choose the schemas.
_CACHE_BYTES = 64 * 1024 * 1024


class Grammars:
    """Compiles response formats for one tokenizer. Thread-safe (compiles run off the loop)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, stop_ids
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        # Built on first use (~0.1 s for SmolLM2's vocabulary): engines never asked for a
        # format pay nothing.
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self._vocab_size,  # the LM head's width: the logits masked
                    stop_token_ids=sorted(self._stop_ids),
                )
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=_CACHE_BYTES)
            return self._compiler

    def compile(self, fmt: dict[str, Any] | None) -> Any:
        """The compiled grammar for a response_format; None for none or "text". A schema the
        compiler refuses is the client's error (400), not ours."""
        if not fmt or fmt["type"] == "text":
            return None
        if fmt["type"] == "json_object":
            schema = '{"type": "object"}'  # as vLLM: an object, not any JSON value
        else:
            # Key order kept: properties are generated in the order the schema lists them.
            schema = json.dumps(fmt["json_schema"]["schema"])
        compiler = self._get_compiler()
        try:
            return compiler.compile_json_schema(schema, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequestError(
                f"response_format: the JSON schema cannot be used: "
                f"{_LOCATION.sub('', str(exc).strip())}",
                param="response_format",
            ) from exc


def matchers(compiled: Any, n: int) -> list[Any] | None:
    """One matcher per choice (each choice's text is its own JSON document)."""
    if compiled is None:
        return None
    import xgrammar as xgr

    return [xgr.GrammarMatcher(compiled) for _ in range(n)]


def mask(logits: torch.Tensor, rows: list[Any]) -> torch.Tensor:
    """Set to -inf, in place, each row's logits of the tokens its matcher forbids next."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for r, matcher in enumerate(rows):
        matcher.fill_next_token_bitmask(bitmask, r)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
    return logits
