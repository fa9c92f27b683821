"""Weight image file: a versioned, checksummed container of the streams the accelerator reads.

Layout (all integers little-endian; see docs/image-format.md)::

    0   magic            8 bytes  b"GPTFPGA\\0"
    8   format_version   uint32
    12  header_length    uint32   bytes of the JSON header that follows
    16  header_crc32     uint32   zlib.crc32 of the JSON header
    20  reserved         uint32   0
    24  JSON header      header_length bytes, UTF-8
    ..  zero padding to SECTION_ALIGN, then each section, each starting on a SECTION_ALIGN boundary

The JSON header carries the model config, the contract version, the hardware layout the streams
were tiled for, every scalar scale/multiplier/shift, and a table of sections with offset, size
and crc32. A reader verifies everything before anyone uses a byte.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_fpga.contract.errors import ImageError, writing
from gpt_fpga.contract.layout import SECTION_ALIGN, HwLayout

MAGIC = b"GPTFPGA\0"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIII4x")  # magic, version, header length, header crc32
MAX_HEADER = 64 << 20
# How the quantizer rounded the weights (header field "rounding"; the streams' format is the same):
# each weight to its nearest level, or error-compensating (GPTQ, quantize/gptq.py)
ROUNDING_METHODS = ("nearest", "gptq")


def _align(n: int) -> int:
    return -(-n // SECTION_ALIGN) * SECTION_ALIGN


def write_image(path: str | Path, header: dict, sections: dict[str, bytes]) -> None:
    """Write header + sections (in the given order, which is the streaming order)."""
    path = Path(path)
    table, offset = [], 0
    for name, blob in sections.items():
        table.append({"name": name, "offset": offset, "size": len(blob), "crc32": zlib.crc32(blob)})
        offset = _align(offset + len(blob))
    data_size = table[-1]["offset"] + table[-1]["size"] if table else 0
    raw = json.dumps(dict(header, format_version=FORMAT_VERSION, sections=table, data_size=data_size),
                     sort_keys=True).encode()
    base = data_start(len(raw))
    tmp = path.with_name(path.name + ".partial")
    try:
        with writing(path):
            with open(tmp, "wb") as f:
                f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(raw), zlib.crc32(raw)))
                f.write(raw)
                for entry, blob in zip(table, sections.values()):
                    f.seek(base + entry["offset"])
                    f.write(blob)
                f.truncate(base + data_size)
            tmp.replace(path)  # never leave a half-written image under the real name
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind (and any old image in place)


def data_start(header_length: int) -> int:
    """Sections start on the first SECTION_ALIGN boundary after the header."""
    return _align(PREAMBLE.size + header_length)


@dataclass
class Image:
    path: Path
    header: dict
    data: memoryview  # the whole file, mapped
    header_length: int

    def section(self, name: str) -> memoryview:
        entry = self._sections.get(name)
        if entry is None:
            raise ImageError(f"{self.path}: image has no section '{name}'")
        start = data_start(self.header_length) + entry["offset"]
        return self.data[start:start + entry["size"]]

    def has_section(self, name: str) -> bool:
        return name in self._sections

    @property
    def _sections(self) -> dict:
        return {e["name"]: e for e in self.header["sections"]}

    @property
    def hw(self) -> HwLayout:
        return HwLayout(**self.header["hardware"])


def read_image(path: str | Path, expect_hw: HwLayout | None = None, verify: bool = True) -> Image:
    """Open and verify an image. Every failure is an ImageError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: is a directory; a weight image is a single file made by 'gpt-fpga quantize'")
    try:
        blob = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    data = memoryview(blob)
    if len(data) < PREAMBLE.size:
        raise ImageError(f"{path}: truncated: {len(data)} bytes is shorter than the {PREAMBLE.size}-byte preamble")
    magic, version, hlen, hcrc = PREAMBLE.unpack(bytes(data[:PREAMBLE.size]))
    if magic != MAGIC:
        raise ImageError(f"{path}: bad magic {magic!r}: not a gpt-fpga weight image "
                         f"(expected {MAGIC!r}; make one with 'gpt-fpga quantize MODEL -o IMAGE')")
    if version != FORMAT_VERSION:
        raise ImageError(f"{path}: image format version {version} is not supported by this gpt-fpga "
                         f"(it reads version {FORMAT_VERSION}); re-run 'gpt-fpga quantize' with this version")
    if hlen > MAX_HEADER or PREAMBLE.size + hlen > len(data):
        raise ImageError(f"{path}: truncated: the header needs {hlen} bytes, the file has {len(data)}")
    raw = bytes(data[PREAMBLE.size:PREAMBLE.size + hlen])
    if zlib.crc32(raw) != hcrc:
        raise ImageError(f"{path}: header checksum mismatch: the file is corrupt")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: corrupt header ({e})") from None
    _check_header(path, header, len(data), data_start(hlen))
    if expect_hw is not None and HwLayout(**header["hardware"]) != expect_hw:
        raise ImageError(f"{path}: made for hardware {header['hardware']} but this target is "
                         f"{expect_hw.to_dict()}; re-quantize with matching --bus-bits/--weights/--group")
    img = Image(path, header, data, hlen)
    if verify:
        for entry in header["sections"]:
            if zlib.crc32(img.section(entry["name"])) != entry["crc32"]:
                raise ImageError(f"{path}: checksum mismatch in section '{entry['name']}': the file is corrupt")
    return img


def _check_header(path: Path, h: dict, size: int, start: int) -> None:
    from gpt_fpga.contract.numerics import CONTRACT_VERSION

    def need(key, kind):
        if not isinstance(h.get(key), kind):
            raise ImageError(f"{path}: header field '{key}' is missing or malformed")
        return h[key]

    if h.get("format_version") != FORMAT_VERSION:
        raise ImageError(f"{path}: header format_version disagrees with the preamble")
    if h.get("contract_version") != CONTRACT_VERSION:
        raise ImageError(f"{path}: numeric contract version {h.get('contract_version')} differs from this "
                         f"gpt-fpga's {CONTRACT_VERSION}; re-run 'gpt-fpga quantize'")
    need("config", dict)
    hw = need("hardware", dict)
    try:
        layout = HwLayout(**hw)
        from gpt_fpga.contract.layout import BUS_BITS_CHOICES, GROUP_CHOICES, WEIGHT_FORMATS

        if layout.bus_bits not in BUS_BITS_CHOICES or layout.weights not in WEIGHT_FORMATS \
                or layout.group not in GROUP_CHOICES:
            raise ValueError
    except (TypeError, ValueError):
        raise ImageError(f"{path}: unsupported hardware layout {hw}") from None
    file_size = start + need("data_size", int)
    if file_size != size:
        kind = "truncated" if size < file_size else "has trailing bytes"
        raise ImageError(f"{path}: {kind}: header says {file_size} bytes, the file has {size}")
    for e in need("sections", list):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and all(
                isinstance(e.get(k), int) and e[k] >= 0 for k in ("offset", "size", "crc32"))):
            raise ImageError(f"{path}: malformed section table entry {str(e)[:80]}")
        if e["offset"] % SECTION_ALIGN:
            raise ImageError(f"{path}: section '{e['name']}' is not {SECTION_ALIGN}-byte aligned")
        if start + e["offset"] + e["size"] > size:
            raise ImageError(f"{path}: truncated: section '{e['name']}' runs past the end of the file")
    # quantizer clip counts {tensor: {kind: count}}; absent in images made before they were recorded
    if "clips" in h and not (isinstance(h["clips"], dict) and all(
            isinstance(kinds, dict) and all(isinstance(kind, str) and type(n) is int and n >= 0
                                            for kind, n in kinds.items())
            for kinds in h["clips"].values())):
        raise ImageError(f"{path}: header field 'clips' is malformed (expected {{tensor: {{kind: count}}}})")
    # {"method", "lm_head"[, "damping", "calib_tokens", "damping_raised"]}; absent in images made before
    # it was recorded (those were all rounded to nearest)
    if "rounding" in h and not _rounding_ok(h["rounding"]):
        raise ImageError(f"{path}: header field 'rounding' is malformed (expected method and lm_head in "
                         f"{', '.join(ROUNDING_METHODS)}; for gptq also damping, calib_tokens, damping_raised)")


def _rounding_ok(r) -> bool:
    if not (isinstance(r, dict) and r.get("method") in ROUNDING_METHODS and r.get("lm_head") in ROUNDING_METHODS):
        return False
    if r["method"] == "nearest":
        return r["lm_head"] == "nearest"
    return (isinstance(r.get("damping"), (int, float)) and r["damping"] >= 0
            and type(r.get("calib_tokens")) is int and r["calib_tokens"] > 0
            and isinstance(r.get("damping_raised"), dict))
