"""Exceptions a user can cause. Every message names the offending input and the limit."""


class PolymodalError(Exception):
    """Base class of every error polymodal raises on purpose."""


class InvalidInputError(PolymodalError, ValueError):
    """A request is malformed: bad sampling parameters, a prompt that is too long, ..."""


class MediaError(InvalidInputError):
    """A media item (image, video, audio) cannot be read or breaks a limit."""


class ModelLoadError(PolymodalError):
    """A checkpoint cannot be loaded: missing, truncated, unexpected or mis-shaped tensors."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not in the registry."""


class ModelNotFoundError(ModelLoadError):
    """A model id is neither a local directory nor reachable/cached on the hub."""


class EngineDeadError(PolymodalError, RuntimeError):
    """A part of the engine that runs elsewhere (a tensor-parallel worker) is gone."""
