"""Error messages that reach the client naming what it sent.

vLLM's error responses pass every message through its sanitiser, which replaces file paths
by `<path>` (`vllm/entrypoints/serve/exception_handling/utils.py`): a client told
"video_url 'file://<path>' is a FIFO" cannot see which of its paths failed, although it sent
the path itself. Our media connector and chat-part rules raise their errors through
`for_the_client`, which keeps each message as raised in `CLIENT_MESSAGES`, a list that
`apps.serve.RequestLimitMiddleware` sets for each request; the middleware puts such a
message back into the request's error response in place of its sanitised form. Only these
messages come back, and they name only what the client sent (never a resolved path or the
server's directories); logs are unchanged.
"""

from __future__ import annotations

from contextvars import ContextVar

CLIENT_MESSAGES: ContextVar[list[str] | None] = ContextVar("intp_vllm_client_messages", default=None)
"""This request's error messages as raised (None outside `intp-vllm serve`'s requests)."""


def for_the_client(error: Exception) -> Exception:
    """`error`, its message kept (CLIENT_MESSAGES) to reach the client with the URLs it sent."""
    kept = CLIENT_MESSAGES.get()
    if kept is not None:
        kept.append(str(error))
    return error
