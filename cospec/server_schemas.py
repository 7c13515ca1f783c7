"""The OpenAI-shaped requests and errors of ``cospec serve`` (pydantic models).

Request fields: the OpenAI ones that apply (``model``, ``messages`` / ``prompt``,
``max_tokens`` (chat: or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``,
``seed``, ``stream``, ``stream_options.include_usage``, ``n`` = 1, ``user``) plus extensions,
which OpenAI clients send through ``extra_body``: ``method`` (one the server offers; default
``spd`` where the server offers it, else ``target``), ``k`` (draft length), ``top_k`` and
``ignore_eos``. An unknown field, a wrong type or an unsupported feature (``n`` > 1,
``logprobs``, penalties, tools, ...) is a 400. Defaults as OpenAI's: temperature 1, top-p 1.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}`` (``ApiError``).
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_K = 32


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with HTTP ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# the names pydantic gives the members of a union in an error's location (not fields)
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_error(errors: list[dict]) -> ApiError:
    """One readable 400 from pydantic's list of errors (the first one named)."""
    def where(e: dict) -> str | None:
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
        return ".".join(loc) or None

    e, param = errors[0], where(errors[0])
    others = {where(x) for x in errors[1:]} - {param}
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}", None, "invalid_json")
    if e.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif e.get("type") == "missing":
        msg = ("the request body must be a JSON object" if param is None
               else f"Missing required parameter: '{param}'")
    elif param is None:
        msg = f"the request body must be a JSON object ({e.get('msg', '')})"
    else:
        msg = f"Invalid value for '{param}': {e.get('msg', '')}"
    if others:
        msg += f" (and {len(others)} more invalid field{'s' if len(others) > 1 else ''})"
    return ApiError(400, msg, param, "invalid_value")


# ----------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class CommonRequest(_Strict):
    """Fields shared by both endpoints (OpenAI's, then cospec's extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # accepted only at their neutral values
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    # extensions
    method: str | None = None
    k: int | None = Field(None, ge=1, le=MAX_K)
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do."""
        if self.n != 1:
            return "n"
        for name in ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs"):
            if getattr(self, name):
                return name
        return None


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        if self.top_logprobs or self.tools:
            return "top_logprobs" if self.top_logprobs else "tools"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported()


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo or self.suffix:
            return "echo" if self.echo else "suffix"
        if self.logprobs is not None and self.logprobs is not False:
            return "logprobs"  # 0 too: it asks for the chosen tokens' log probabilities
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()
