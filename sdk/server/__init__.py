"""The OpenAI-compatible HTTP server (`polymodal serve`): `create_app` over an `AsyncEngine`."""

from polymodal.server.app import create_app

__all__ = ["create_app"]
