"""Reading an OpenAI-compatible endpoint's HTTP replies without trusting them: the body bounded as it streams
in, the completion's text, finish reason and usage checked (megasynth.synth.llm.client sends the requests).
"""

from __future__ import annotations

import functools

from megasynth.synth.llm.types import AttemptFailed, Usage, estimate_tokens

MAX_USAGE_TOKENS = 100_000_000  # more tokens than one request has ever held: such a count is not a count

@functools.cache
def bounded_stream_type(base: type) -> type:
    """An httpx AsyncByteStream (`base`) that raises AttemptFailed("reply_too_large") past `cap` bytes."""

    class BoundedStream(base):
        def __init__(self, inner, cap: int):
            self._inner, self._cap = inner, cap

        async def __aiter__(self):
            seen = 0
            async for chunk in self._inner:
                seen += len(chunk)
                if seen > self._cap:
                    raise AttemptFailed("reply_too_large", f"the reply body passed --max-reply-bytes {self._cap:,}; "
                                   "abandoned there", retryable=False)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    return BoundedStream


def _token_count(value) -> int | None:
    """A usage count as reported, or None unless it is an int in [0, MAX_USAGE_TOKENS] (bool is not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


def cause_text(e: BaseException) -> str:
    root = e.__cause__ or e.__context__
    return f"{type(root).__name__}: {root}" if root is not None else str(e)


def read_response(kind: str, data, payload) -> tuple[str, Usage, str | None]:
    """(text, usage, finish_reason) from a completion response's JSON; AttemptFailed when it is not one."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        finish = choice.get("finish_reason")
        usage = data.get("usage")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise AttemptFailed("bad_response", f"not a {kind} completion response: {str(data)[:200]}",
                            retryable=True) from None
    if finish == "content_filter":
        raise AttemptFailed("content_filter", "the endpoint's content filter withheld the reply", retryable=False)
    # A text completion that stopped at once is a legitimate empty text (a synthesizer that emitted EOD first);
    # an empty chat reply, or one cut off by the length limit, is a failure worth retrying.
    empty_ok = kind == "complete" and finish == "stop"
    if not isinstance(text, str) or (not text and not empty_ok):
        raise AttemptFailed("empty_reply", f"the reply is empty (finish_reason {finish})", retryable=True)
    prompt, completion = ((_token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))
                          if isinstance(usage, dict) else (None, None))
    if prompt is not None and completion is not None:
        counted = Usage(prompt, completion)
    else:  # omitted (some servers) or not a count: estimate (chars / 4), so budgets still apply
        counted = Usage(estimate_tokens(payload, 0), len(text) // 4, estimated=True)
    return text, counted, finish
