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


class LoRAError(I2VEditError):
    """A motion LoRA that does not fit the model or the settings it is used with."""


class LoRAFileError(LoRAError):
    """A motion LoRA file that cannot be read or written, or is not a motion LoRA of this pack's kind."""


class ModelFileError(I2VEditError):
    """A model checkpoint file that cannot be read, is incomplete, or does not match the model it describes."""
