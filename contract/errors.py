"""The one exception type users see: the CLI prints its message and exits 2, no traceback."""

from contextlib import contextmanager


class GptFpgaError(Exception):
    """A problem with the user's input (checkpoint, image, prompt, ids, options)."""


class CheckpointError(GptFpgaError):
    """A Hugging Face checkpoint directory that cannot be used."""


class ImageError(GptFpgaError):
    """A weight image that cannot be used: bad magic, version, checksum, layout, truncation."""


class InputError(GptFpgaError):
    """Bad prompt, token ids, text or option values."""


class OutputError(GptFpgaError):
    """An output file that cannot be written (full disk, no permission, a device)."""


@contextmanager
def writing(path, what: str = ""):
    """Inside the block, an OSError becomes an OutputError that names the file: a write that fails on a
    full disk raises ENOSPC with no file name of its own. `what` is the option that named it ("--out")."""
    try:
        yield
    except OSError as e:
        where = f"{what} {path}" if what else str(path)
        raise OutputError(f"{where}: cannot write: {e.strerror or e}") from None
