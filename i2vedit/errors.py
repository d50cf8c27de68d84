"""Errors the pack raises for bad input.

Every message says what was wrong and what to do about it. ``I2VEditError`` subclasses
``ValueError`` so callers that already catch ``ValueError`` keep working.
"""


class I2VEditError(ValueError):
    """Bad input or an unusable configuration, with a message that says how to fix it."""


class VideoReadError(I2VEditError):
    """A video that cannot be opened, is empty, or would not fit the memory cap."""


class NotSVDModelError(I2VEditError):
    """A model given to an SVD host that is not Stable Video Diffusion."""
