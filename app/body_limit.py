"""A cap on request bodies, as ASGI middleware in front of Gradio's routes.

Every call this app serves is a few hundred bytes (a ranking names at most 8 ids), so anything
much larger is refused with 413 before Gradio parses it: a declared Content-Length over the cap
at once, a chunked body as soon as it grows past it. Only the routes named in `prefixes` take
more (the remote workers' uploads; the Research tab's prompt files, app.ui_prompts).
Attach with `launch(app_kwargs=with_body_limit(app_kwargs))`.
"""
from __future__ import annotations

from starlette.middleware import Middleware

MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """`prefixes`: {path prefix: cap} for routes that take more (the remote workers' uploads,
    which carry their own per-chunk and per-version caps)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, prefixes: dict | None = None):
        self.app, self.max_bytes, self.prefixes = app, max_bytes, dict(prefixes or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        cap = next((c for p, c in self.prefixes.items() if path.startswith(p)), self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await _refuse(send, cap)
            return
        # Read the body here (at most max_bytes are buffered), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                await _refuse(send, cap)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as usual

        await self.app(scope, replay, send)


async def _refuse(send, max_bytes: int) -> None:
    text = f"request body too large ({max_bytes // 1024} KB at most)".encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(text)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": text})


def with_body_limit(app_kwargs: dict | None, max_bytes: int = MAX_BODY_BYTES,
                    prefixes: dict | None = None) -> dict:
    """FastAPI keyword arguments for Gradio's app with the body cap added to its middleware."""
    app_kwargs = dict(app_kwargs or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", ()),
                                Middleware(BodyLimit, max_bytes=max_bytes, prefixes=prefixes)]
    return app_kwargs
