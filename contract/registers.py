"""The engine's AXI4-Lite register map: the one definition.

Pure Python (no numpy, no amaranth), so the board's Python imports it as it is. From this table:

* the gateware register file (``hw/regfile.py``) is generated: offsets, widths, access (every
  register resets to 0);
* the host driver reads and writes registers by these names and fields;
* ``docs/registers.md`` is written by :func:`markdown` (``tests/test_hw_regfile.py`` checks it is
  current; regenerate with ``python -m gpt_fpga.contract.registers > docs/registers.md``).

All registers are 32 bits wide at 4-byte-aligned offsets. Access kinds:

``ro``   read-only, driven by the engine;
``rw``   read-write, held by the register file, read by the engine;
``w1s``  write-1-to-act: writing 1 to a bit pulses it for one cycle; reads return 0;
``w1c``  write-1-to-clear: a bit set by the engine stays set until the host writes 1 to it.

One command runs at a time. The host sets COMMAND, POSITION and DESC_ADDR, writes CONTROL.start,
and waits for STATUS.done (or the interrupt, when IRQ_ENABLE.done is set). An error ends the command
early: STATUS.done and STATUS.error rise together, ERROR says why, STEP says where.
"""

from __future__ import annotations

from dataclasses import dataclass

REGMAP_VERSION = 2  # 2: HW_CONFIG.ports, READ_PORTS; BEATS_READ / BEATS_WRITTEN count bus_bits-wide words
ENGINE_MAGIC = 0x47505446  # "GPTF" as a little-endian word read from ID
REGISTER_BYTES = 4


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int
    doc: str

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def get(self, word: int) -> int:
        return (word >> self.lsb) & ((1 << self.width) - 1)

    def put(self, value: int) -> int:
        if not 0 <= value < 1 << self.width:
            raise ValueError(f"field {self.name} is {self.width} bits wide; {value} does not fit")
        return value << self.lsb


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: str  # ro | rw | w1s | w1c
    doc: str
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"register {self.name} has no field {name!r} (fields: {[f.name for f in self.fields]})")

    def pack(self, **values: int) -> int:
        """The word with each named field set (unnamed fields 0)."""
        word = 0
        for name, value in values.items():
            word |= self.field(name).put(value)
        return word

    def unpack(self, word: int) -> dict[str, int]:
        return {f.name: f.get(word) for f in self.fields}


def _whole(name: str, doc: str) -> tuple[Field, ...]:
    return (Field(name, 0, 32, doc),)


# Command codes (COMMAND.op)
OP_LAYER = 0
OP_HEAD = 1
OPS = {"LAYER": OP_LAYER, "HEAD": OP_HEAD}

# AXI read managers an engine may have (HW_CONFIG.ports)
PORT_CHOICES = (1, 2)

# Weight formats (HW_CONFIG.weights), in the order of layout.WEIGHT_FORMATS
WEIGHT_CODES = {"int8": 0, "int4": 1}

# Error causes (bits of ERROR), in bit order
ERROR_BITS = {
    "axi_read": "a read response was SLVERR or DECERR",
    "axi_write": "a write response was SLVERR or DECERR",
    "stream": "a stream's length or tlast disagreed with the descriptor (a core flagged it)",
    "descriptor": "a descriptor field is out of range: a dimension of 0 or above the engine's maximum, "
                  "a shift above its contract range, a window or position out of range, or a bad magic",
    "command": "COMMAND.op is not LAYER or HEAD, or COMMAND.layer is not below the model's n_layer",
}

# Sequencer steps (STEP.step): where a command is, or where it ended
STEPS = ("idle", "fetch_descriptor", "load_residual", "ln1", "qkv", "write_kv", "scores_softmax",
         "context", "attn_out", "ln2", "fc_gelu", "proj", "store_residual", "lnf", "lm_head", "done")

REGISTERS: tuple[Register, ...] = (
    Register("ID", 0x00, "ro", "Identifies the engine: reads ENGINE_MAGIC.", _whole("magic", "0x47505446")),
    Register("VERSION", 0x04, "ro", "Versions the host checks against the image before any command.", (
        Field("contract", 0, 8, "integer contract version (numerics.CONTRACT_VERSION)"),
        Field("image_format", 8, 8, "weight image format version (image.FORMAT_VERSION)"),
        Field("regmap", 16, 8, "this register map's version (REGMAP_VERSION)"),
    )),
    Register("HW_CONFIG", 0x08, "ro", "The stream layout the engine was built for (an image must match).", (
        Field("bus_bits", 0, 8, "AXI data width in bits (64 or 128)"),
        Field("weights", 8, 2, "weight format: 0 int8, 1 int4 (WEIGHT_CODES)"),
        Field("group", 16, 8, "int4 group size (32, 64, 128); 0 for int8"),
        Field("ports", 24, 4, "AXI managers reading DDR: 1 (one bus_bits port, read and write), or 2 "
                              "(two bus_bits / 2 ports: m_axi reads and writes, m_axi1 reads; PYNQ-Z2 "
                              "S_AXI_HP0 and S_AXI_HP2)"),
    )),
    Register("MAX_D_IN", 0x0C, "ro", "Largest d_model and d_ff the engine's buffers hold.",
             _whole("value", "elements")),
    Register("MAX_CONTEXT", 0x10, "ro", "Largest n_ctx (keys attended per query).", _whole("value", "positions")),
    Register("MAX_HEAD_DIM", 0x14, "ro", "Largest head_dim.", _whole("value", "elements")),
    Register("CONTROL", 0x20, "w1s", "Starts or aborts a command.", (
        Field("start", 0, 1, "start COMMAND (ignored while STATUS.busy)"),
        Field("abort", 1, 1, "end any command now and return to idle (a soft reset of the datapath; "
                             "registers keep their values)"),
    )),
    Register("COMMAND", 0x24, "rw", "The command CONTROL.start runs.", (
        Field("op", 0, 2, "0 LAYER (one decoder layer), 1 HEAD (final LayerNorm and lm_head)"),
        Field("layer", 8, 8, "layer index for LAYER"),
    )),
    Register("POSITION", 0x28, "rw", "Position t of the token (0-based); LAYER writes its k and v at t and "
             "attends to the visible keys up to t.", _whole("value", "position")),
    Register("DESC_ADDR", 0x2C, "rw", "DDR byte address of the descriptor table (descriptors.py), "
             "64-byte aligned.", _whole("value", "address")),
    Register("STATUS", 0x30, "ro", "Command state.", (
        Field("busy", 0, 1, "a command is running"),
        Field("done", 1, 1, "the last command ended (cleared by CONTROL.start)"),
        Field("error", 2, 1, "the last command ended with an error: see ERROR and STEP"),
    )),
    Register("ERROR", 0x34, "ro", "Why the last command ended early (sticky until the next start).",
             tuple(Field(name, i, 1, doc) for i, (name, doc) in enumerate(ERROR_BITS.items()))),
    Register("IRQ_ENABLE", 0x38, "rw", "Interrupt enables.", (Field("done", 0, 1, "raise interrupt on done"),)),
    Register("IRQ_STATUS", 0x3C, "w1c", "Pending interrupts; the interrupt line is IRQ_STATUS & IRQ_ENABLE.",
             (Field("done", 0, 1, "a command ended"),)),
    Register("CYCLES", 0x40, "ro", "Clock cycles of the current or last command.", _whole("value", "cycles")),
    Register("BEATS_READ", 0x44, "ro", "AXI read data of the current or last command, in bus_bits-wide beats "
             "(with 2 ports: the beats of both ports, halved).", _whole("value", "beats")),
    Register("BEATS_WRITTEN", 0x48, "ro", "AXI write data of the current or last command, in bus_bits-wide "
             "beats (with 2 ports: port 0's beats, halved).", _whole("value", "beats")),
    Register("STEP", 0x4C, "ro", "Where the current command is, or where the last one ended.", (
        Field("step", 0, 5, "index into STEPS"),
        Field("head", 8, 8, "attention head, during scores_softmax and context"),
    )),
    Register("READ_PORTS", 0x50, "rw", "Which read ports a two-port engine uses (set it between commands): "
             "gpt-fpga board-check measures each port's bandwidth alone. A one-port engine ignores it.", (
        Field("only", 0, 2, "0 or 3: both ports, alternate bursts (the reset value); 1: port 0 (m_axi, HP0) "
                            "only; 2: port 1 (m_axi1, HP2) only"),
    )),
)

BY_NAME = {r.name: r for r in REGISTERS}
ADDRESS_BITS = 7  # offsets 0x00..0x7F


def register(name: str) -> Register:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no register {name!r} (registers: {', '.join(BY_NAME)})") from None


def _check():
    seen = set()
    for r in REGISTERS:
        assert r.offset % REGISTER_BYTES == 0 and r.offset < 1 << ADDRESS_BITS, r
        assert r.offset not in seen, r
        seen.add(r.offset)
        assert r.access in ("ro", "rw", "w1s", "w1c"), r
        used = 0
        for f in r.fields:
            assert 0 <= f.lsb and f.lsb + f.width <= 32 and not used & f.mask, (r.name, f)
            used |= f.mask
    assert len(STEPS) <= 32


_check()


def markdown() -> str:
    """docs/registers.md, generated from this table."""
    out = ["# Engine registers (AXI4-Lite)", "",
           "Generated from `contract/registers.py` by `python -m gpt_fpga.contract.registers`; "
           "do not edit by hand.", "",
           f"Register map version {REGMAP_VERSION}. All registers are 32 bits at 4-byte offsets.",
           "Access: `ro` read-only, `rw` read-write, `w1s` write 1 to act (reads 0), `w1c` write 1 to clear.", "",
           "| offset | register | access | field | bits | meaning |", "|---|---|---|---|---|---|"]
    for r in REGISTERS:
        out.append(f"| 0x{r.offset:02X} | **{r.name}** | {r.access} | | | {r.doc} |")
        for f in r.fields:
            bits = f"{f.lsb}" if f.width == 1 else f"{f.lsb + f.width - 1}:{f.lsb}"
            out.append(f"| | | | `{f.name}` | {bits} | {f.doc} |")
    out += ["", "## Steps (STEP.step)", "", ", ".join(f"{i} `{s}`" for i, s in enumerate(STEPS)), "",
            "## Error bits (ERROR)", ""]
    out += [f"* `{name}` (bit {i}): {doc}" for i, (name, doc) in enumerate(ERROR_BITS.items())]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
