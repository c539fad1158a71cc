"""The OpenAI-compatible HTTP server (`polymodal serve`): `create_app` over an `AsyncEngine`.

`create_app` needs the `serve` extra (FastAPI); it is imported on first use, so the package's
other modules (the command's argument parser) load without it.
"""


def __getattr__(name: str):
    if name == "create_app":
        from polymodal.server.app import create_app

        return create_app
    raise AttributeError(f"module 'polymodal.server' has no attribute {name!r}")


__all__ = ["create_app"]
