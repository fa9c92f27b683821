"""AXI-Stream style stream signatures shared by every core.

Members are named as in AXI4-Stream (tdata, tvalid, tready, tlast, tuser), so the generated Verilog
ports read ``s_axis__tdata`` etc. and cocotbext-axi binds to them with
``AxiStreamBus.from_prefix(dut, "s_axis", bus_separator="__")``.
A transfer happens on a clock edge where tvalid and tready are both high.
"""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


class AxiStreamSignature(wiring.Signature):
    """Source-side view: ``Out(AxiStreamSignature(w))`` drives a stream, ``In(...)`` receives one."""

    def __init__(self, data_width: int, *, user_width: int = 0):
        if data_width < 1:
            raise ValueError(f"data_width must be >= 1, got {data_width}")
        self.data_width, self.user_width = data_width, user_width
        members = {"tdata": Out(data_width), "tvalid": Out(1), "tready": In(1), "tlast": Out(1)}
        if user_width:
            members["tuser"] = Out(user_width)
        super().__init__(members)

    def __eq__(self, other):
        return (isinstance(other, AxiStreamSignature) and self.data_width == other.data_width
                and self.user_width == other.user_width)

    def __repr__(self):
        return f"AxiStreamSignature({self.data_width}, user_width={self.user_width})"
