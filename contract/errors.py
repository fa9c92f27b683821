"""The one exception type users see: the CLI prints its message and exits 2, no traceback."""


class GptFpgaError(Exception):
    """A problem with the user's input (checkpoint, image, prompt, ids, options)."""


class CheckpointError(GptFpgaError):
    """A Hugging Face checkpoint directory that cannot be used."""


class ImageError(GptFpgaError):
    """A weight image that cannot be used: bad magic, version, checksum, layout, truncation."""


class InputError(GptFpgaError):
    """Bad prompt, token ids, text or option values."""
