"""The client error type of the server: an `InvalidInputError` that names its request field."""

from __future__ import annotations

from polymodal.llm_core.errors import InvalidInputError


class RequestError(InvalidInputError):
    """A client error that knows which request field it is about (`param`) and its HTTP
    status (400, or 404 for an unknown model)."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_value", status=400
    ):
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status
