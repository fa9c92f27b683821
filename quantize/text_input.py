"""Text the user gives (``--prompt``, ``--text``, ``--calib``), checked where it is read.

The rule (README, "Text inputs"): text is UTF-8. A UTF-8 byte-order mark is dropped. Anything else
is refused with a one-line error that names the file or argument and the offset of the first bad
byte, and says to re-encode it (``iconv -f ENCODING -t UTF-8``): no silent replacement characters,
which would quietly tokenize into different text. A file that looks binary is refused before any
work starts: a NUL byte, a known binary magic (safetensors, a weight image, NumPy, PNG, JPEG, GIF,
zip, gzip, PDF, ELF) or more than :data:`MAX_CONTROL_SHARE` control bytes (other than tab, newline,
carriage return and form feed).
"""

from __future__ import annotations

import struct
from pathlib import Path

from gpt_fpga.contract.errors import InputError
from gpt_fpga.contract.image import MAGIC as IMAGE_MAGIC

MAGICS = ((IMAGE_MAGIC, "a gpt-fpga weight image"), (b"\x93NUMPY", "a NumPy array file"),
          (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF87a", "a GIF image"),
          (b"GIF89a", "a GIF image"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip file"),
          (b"%PDF-", "a PDF document"), (b"\x7fELF", "an executable"))
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"
# every byte below 0x20 except tab, newline, form feed and carriage return, and DEL
CONTROL_BYTES = bytes(b for b in range(0x20) if b not in b"\t\n\f\r") + b"\x7f"
MAX_CONTROL_SHARE = 0.01  # text has ~none; binary data far more (random bytes: 13 %)
REENCODE = "re-encode it as UTF-8, e.g. iconv -f LATIN1 -t UTF-8 (with its real encoding)"


def _looks_safetensors(data: bytes) -> bool:
    """8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:9] == b"{" and n <= len(data) - 8


def binary_kind(data: bytes) -> str | None:
    """Why `data` looks like a binary file, not text, or None."""
    if _looks_safetensors(data):
        return "a safetensors file"
    for magic, kind in MAGICS:
        if data.startswith(magic):
            return kind
    nul = data.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at byte offset {nul}"
    controls = len(data) - len(data.translate(None, CONTROL_BYTES))
    if controls > MAX_CONTROL_SHARE * len(data):
        return f"{controls} of its {len(data)} bytes are control characters"
    return None


def decode_text(data: bytes, where: str) -> str:
    """`data` as text by the rule above; `where` names it in errors (e.g. "--text notes.txt")."""
    if data.startswith(UTF16_BOMS):
        raise InputError(f"{where}: is UTF-16 text (byte-order mark); gpt-fpga reads UTF-8: re-encode it, "
                         f"e.g. iconv -f UTF-16 -t UTF-8")
    kind = binary_kind(data)
    if kind is not None:
        raise InputError(f"{where}: looks binary ({kind}), not text; give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where}: not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}, line {line}); "
                         f"{REENCODE}") from None
    return text.removeprefix("\ufeff") if data.startswith(UTF8_BOM) else text


def read_text_file(path, what: str) -> str:
    """The text of the file given as option `what` (e.g. "--text"), checked; every problem is an InputError."""
    path = Path(path)
    where = f"{what} {path}"
    if path.is_dir():
        raise InputError(f"{where}: is a directory, not a text file")
    if not path.is_file():
        raise InputError(f"{where}: no such text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read: {e.strerror}") from None
    return decode_text(data, where)


def check_text_arg(text: str, what: str) -> str:
    """A command-line argument as text: Python hands undecodable argv bytes over as lone surrogates
    (PEP 383), which the tokenizer cannot take; name the first one's byte offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        offset = len(text[:e.start].encode("utf-8", "surrogateescape"))
        raise InputError(f"{what}: not UTF-8 (byte 0x{raw[offset]:02x} at byte offset {offset}); give it in "
                         f"UTF-8 (is the terminal's encoding UTF-8?)") from None
    return text
