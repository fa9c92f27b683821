// The C++ half of host/rtl_device.py: the Verilated engine (hw/top.py's gpt_fpga_engine), its clock
// and reset, a DDR model on its AXI4 manager port, and an AXI4-Lite manager on its register port,
// behind a small C ABI that Python loads with ctypes. Nothing here runs Python per cycle.
//
// Compiled by host/rtl_device.py into one shared library with the Verilated model (class Vengine) of
// a thin simulation top around gpt_fpga_engine (same port names) that registers every input on the
// clock: the harness drives next cycle's inputs before each edge. Because of that register no
// engine logic is combinational in a top-level input, so Verilator evaluates the design once per
// cycle (its input-combinational region, otherwise re-run at every eval, is empty); the engine sees
// exactly the inputs the harness decided for each cycle, so the protocol is unchanged. Defines:
// -DBUS_BYTES=<AXI data bytes of one port> (8 or 16) and -DPORTS=<1 or 2>. With two ports, port 0 is
// m_axi_* (reads and writes; the board's HP0) and port 1 is m_axi1_* (reads only; HP2).
//
// One cycle (Sim::cycle): the engine's outputs of the current cycle are valid (evaluated at the
// last edge) and the harness knows the inputs it sees (`cur`):
//   1. take the cycle's handshakes (valid & ready on every channel);
//   2. the DDR model and the AXI4-Lite manager act on them (queue AR/AW, move R/W beats, pop B);
//   3. compute the next cycle's inputs from their state (ready signals never depend on valid);
//   4. the clock edge: the engine takes this cycle, the wrapper registers the next cycle's inputs.
//
// DDR model:
//   * storage: the caller's byte array (mem, mem_bytes) at device addresses [base, base + mem_bytes);
//   * reads, per port: up to max_reads bursts outstanding (arready low beyond), data in AR order; the
//     first beat of a burst comes read_latency cycles after its AR handshake at the earliest (latency
//     1: the cycle right after); each port has its own latency and outstanding limit, and moves at
//     most one beat per cycle;
//   * one DDR read bandwidth for every port: bytes_per_cycle (16.16 fixed point) accrue in one bucket
//     each cycle (fractions carry; at most one beat per port is banked), and every R beat of every port
//     costs BUS_BYTES from it (8 bytes/cycle with one 64-bit port: one beat per cycle; 4: one every
//     other cycle; 12.5 with two 64-bit ports: 25 beats in 16 cycles). When the bucket cannot pay
//     every port that has a beat ready, the ports take turns (round robin). Writes (port 0 only)
//     have their own bucket of the same rate: they are under 1 % of a token's bytes;
//   * INCR, FIXED and WRAP bursts, any size up to the bus width; byte lanes by address (AXI rule);
//     wstrb honoured; W is accepted only for a burst whose AW was accepted (the engine sends W after
//     AW); B comes write_latency cycles after the last W beat, in order;
//   * a burst touching any byte outside the array answers DECERR on every beat (reads return zeros,
//     writes write nothing); protocol mistakes (a burst across 4 KiB, a wlast on the wrong beat, a size
//     above the bus width) are counted in protocol_errors, and the beat is served anyway.
//
// Counters (all uint64, names in COUNTER_NAMES): cycles run, R and W beats, bursts (all ports, and
// port 1's alone), stall cycles (a read burst outstanding and no R beat on any port in that cycle: the
// engine waiting on DDR latency or bandwidth), back-pressure cycles (rvalid while rready is low),
// error responses, protocol errors.

#include <cstdint>
#include <cstring>
#include <deque>
#include <new>

#include "Vengine.h"
#include "verilated.h"

#ifndef BUS_BYTES
#error "compile with -DBUS_BYTES=8 (64-bit AXI) or -DBUS_BYTES=16 (128-bit)"
#endif
#ifndef PORTS
#define PORTS 1
#endif

namespace {

constexpr uint32_t B = BUS_BYTES;
static_assert(B == 8 || B == 16, "BUS_BYTES must be 8 or 16");
static_assert(PORTS == 1 || PORTS == 2, "PORTS must be 1 or 2");
constexpr int NPORTS = PORTS;
constexpr uint8_t RESP_OKAY = 0, RESP_DECERR = 3;
constexpr uint8_t BURST_FIXED = 0, BURST_INCR = 1, BURST_WRAP = 2;
constexpr int64_t FP_ONE = 1 << 16;  // bandwidth bucket: 16.16 fixed point bytes

#define COUNTERS(X)                                                                                \
    X(cycles) X(read_beats) X(write_beats) X(read_bursts) X(write_bursts) X(stall_cycles)          \
    X(backpressure_cycles) X(read_error_beats) X(write_error_bursts) X(protocol_errors)            \
    X(skipped_cycles) X(port1_read_beats) X(port1_read_bursts)

struct Counters {
#define X(name) uint64_t name;
    COUNTERS(X)
#undef X
};

#define X(name) #name ","
const char COUNTER_NAMES[] = COUNTERS(X);
#undef X

struct Burst {
    uint64_t addr;      // address of the first beat (as issued)
    uint32_t beats;     // len + 1
    uint32_t size;      // bytes per beat (1 << AxSIZE)
    uint8_t kind;       // AxBURST
    uint8_t id;
    uint8_t resp;       // OKAY, or DECERR when any byte lies outside the array
    uint32_t done = 0;  // beats moved
    uint64_t ready_at = 0;  // reads: first cycle the first beat may be presented

    uint64_t beat_addr(uint32_t i) const {
        if (kind == BURST_FIXED) return addr;
        if (kind == BURST_WRAP) {
            uint64_t total = uint64_t(size) * beats;
            uint64_t lo = addr / total * total;
            return lo + (addr - lo + uint64_t(i) * size) % total;
        }
        return i == 0 ? addr : (addr & ~uint64_t(size - 1)) + uint64_t(i) * size;
    }
};

struct BResp {
    uint64_t ready_at;
    uint8_t resp, id;
};

// The inputs the engine sees in the current cycle (held in the simulation wrapper's registers).
struct Drive {
    bool arready[NPORTS], rvalid[NPORTS];                // DDR model (subordinate), per read port
    bool awready, wready, bvalid;                        // port 0's write channels
    bool l_awvalid, l_wvalid, l_bready, l_arvalid, l_rready;  // AXI4-Lite manager
    bool aresetn;
};

// The AXI4-Lite access in progress.
struct Lite {
    enum Kind { NONE, READ, WRITE } kind = NONE;
    uint32_t addr = 0, data = 0;
    bool a_pending = false, w_pending = false, done = false;
    uint8_t resp = 0;
};

const uint8_t ZERO_BEAT[B] = {};

// AXI data payloads: QData up to 64 bits, VlWide above
inline void put_data(QData& dst, const uint8_t* src) { std::memcpy(&dst, src, 8); }
template <std::size_t N>
inline void put_data(VlWide<N>& dst, const uint8_t* src) {
    for (std::size_t i = 0; i < N; ++i) std::memcpy(&dst[i], src + 4 * i, 4);
}
inline void get_data(const QData& src, uint8_t* dst) { std::memcpy(dst, &src, 8); }
template <std::size_t N>
inline void get_data(const VlWide<N>& src, uint8_t* dst) {
    for (std::size_t i = 0; i < N; ++i) std::memcpy(dst + 4 * i, &src[i], 4);
}

// A read port's signals on the Verilated top, by prefix: port 0 is m_axi_*, port 1 m_axi1_*.
#define READ_PORT_IO(NAME, P)                                                                          \
    struct NAME {                                                                                      \
        static bool arvalid(const Vengine* t) { return t->P##arvalid; }                              \
        static bool rready(const Vengine* t) { return t->P##rready; }                                \
        static void take_ar(const Vengine* t, Burst& b) {                                              \
            b.addr = t->P##araddr; b.beats = uint32_t(t->P##arlen) + 1;                               \
            b.size = 1u << t->P##arsize; b.kind = t->P##arburst; b.id = t->P##arid;                   \
        }                                                                                              \
        static void drive(Vengine* t, bool arready, bool rvalid) {                                     \
            t->P##arready = arready; t->P##rvalid = rvalid;                                            \
        }                                                                                              \
        static void beat(Vengine* t, const uint8_t* data, uint8_t resp, bool last, uint8_t id) {       \
            put_data(t->P##rdata, data); t->P##rresp = resp; t->P##rlast = last; t->P##rid = id;      \
        }                                                                                              \
    };
READ_PORT_IO(ReadIo0, m_axi_)
#if PORTS == 2
READ_PORT_IO(ReadIo1, m_axi1_)
#endif

// One read port of the DDR model: its bursts in AR order (the front one is being returned), its
// latency and outstanding limit.
struct ReadPort {
    std::deque<Burst> rq;
    uint64_t latency = 85;
    uint32_t max_reads = 16;
};

// Verilator escapes the port `interrupt` (a reserved word for it) as `__SYM__interrupt`.
template <class T>
auto irq_of(const T* t, int) -> decltype(uint8_t(t->__SYM__interrupt)) { return t->__SYM__interrupt; }
template <class T>
auto irq_of(const T* t, long) -> decltype(uint8_t(t->interrupt)) { return t->interrupt; }

struct Sim {
    VerilatedContext ctx;
    Vengine* top = nullptr;
    uint8_t* mem;
    uint64_t mem_bytes, base;

    // configuration (sim_config, sim_port_config)
    uint64_t write_latency = 16;
    int64_t rate = 8 * FP_ONE;  // DDR bytes per cycle, 16.16, shared by every channel of every port
    uint32_t max_writes = 16;

    // state
    uint64_t now = 0;       // the current cycle (cycles ended since creation)
    ReadPort rp[NPORTS];    // the read ports
    std::deque<Burst> wq;   // port 0's writes whose W beats are not all in, AW order
    std::deque<BResp> bq;   // port 0's B responses, in order
    int64_t rcredit = 0, wcredit = 0;  // the DDR bandwidth buckets: reads (all ports), writes
    uint32_t turn = 0;      // round robin among the read ports when the bucket cannot pay them all
    Drive cur{}, nxt{};
    Lite lite;
    Counters n{};

    Sim(uint8_t* m, uint64_t bytes, uint64_t b) : mem(m), mem_bytes(bytes), base(b) {
        ctx.traceEverOn(false);
        ctx.fatalOnError(false);
        top = new Vengine{&ctx, "engine"};
        cur.aresetn = nxt.aresetn = true;
        top->aresetn = 1;
        top->aclk = 0;
        top->eval();
    }
    ~Sim() {
        top->final();
        delete top;
    }

    // A burst's checks at its address handshake: range (DECERR) and protocol (counted).
    void check(Burst& b) {
        if (b.size > B || b.beats == 0) ++n.protocol_errors;
        uint64_t lo = ~uint64_t(0), hi = 0;
        for (uint32_t i = 0; i < b.beats; ++i) {
            uint64_t a = b.beat_addr(i) & ~uint64_t(B - 1);
            if (a < lo) lo = a;
            if (a + B - 1 > hi) hi = a + B - 1;
        }
        if (b.kind == BURST_INCR && (b.addr >> 12) != (((b.addr & ~uint64_t(b.size - 1)) +
                                                         uint64_t(b.beats) * b.size - 1) >> 12))
            ++n.protocol_errors;  // crosses a 4 KiB boundary
        b.resp = (lo >= base && hi < base + mem_bytes) ? RESP_OKAY : RESP_DECERR;
    }

    // A read port's handshakes of the current cycle; returns whether an R beat moved.
    template <class Io>
    bool take_reads(int p) {
        ReadPort& port = rp[p];
        const bool ar = cur.arready[p] && Io::arvalid(top);
        const bool r = cur.rvalid[p] && Io::rready(top);
        if (cur.rvalid[p] && !r) ++n.backpressure_cycles;
        if (r) {
            Burst& b = port.rq.front();
            rcredit -= int64_t(B) * FP_ONE;
            ++n.read_beats;
            if (p == 1) ++n.port1_read_beats;
            if (b.resp != RESP_OKAY) ++n.read_error_beats;
            if (++b.done == b.beats) port.rq.pop_front();
        }
        if (ar) {
            Burst b{};
            Io::take_ar(top, b);
            check(b);
            b.ready_at = now + port.latency;
            port.rq.push_back(b);
            ++n.read_bursts;
            if (p == 1) ++n.port1_read_bursts;
        }
        return r;
    }

    // Whether a read port has a beat ready for the next cycle (bandwidth aside).
    bool read_ready(int p) const {
        return !rp[p].rq.empty() && now >= rp[p].rq.front().ready_at;
    }

    // A read port's inputs for the next cycle.
    template <class Io>
    void drive_reads(int p, bool granted) {
        const ReadPort& port = rp[p];
        nxt.arready[p] = port.rq.size() < port.max_reads;
        nxt.rvalid[p] = granted;
        if (granted) {
            const Burst& b = port.rq.front();
            Io::beat(top, b.resp == RESP_OKAY ? mem + ((b.beat_addr(b.done) & ~uint64_t(B - 1)) - base) : ZERO_BEAT,
                     b.resp, b.done + 1 == b.beats, b.id);
        }
        Io::drive(top, nxt.arready[p], nxt.rvalid[p]);
    }

    // One clock cycle. The engine's outputs of the current cycle are valid (evaluated at the last
    // edge) and `cur` holds the inputs it sees: take the handshakes, let the DDR model and the
    // AXI4-Lite manager act on them, compute the next cycle's inputs, then the edge.
    void cycle() {
        // 1-2. this cycle's handshakes, taken by the DDR model
        bool outstanding = false;
        for (int p = 0; p < NPORTS; ++p) outstanding = outstanding || !rp[p].rq.empty();
        bool moved = take_reads<ReadIo0>(0);
#if PORTS == 2
        moved = take_reads<ReadIo1>(1) || moved;
#endif
        if (outstanding && !moved) ++n.stall_cycles;
        const bool aw = cur.awready && top->m_axi_awvalid;
        const bool w = cur.wready && top->m_axi_wvalid;
        const bool bh = cur.bvalid && top->m_axi_bready;
        if (w) {  // wready implies that wq is not empty
            Burst& b = wq.front();
            wcredit -= int64_t(B) * FP_ONE;
            ++n.write_beats;
            if (b.resp == RESP_OKAY) {
                uint8_t beat[B];
                get_data(top->m_axi_wdata, beat);
                const uint32_t strb = top->m_axi_wstrb;
                uint8_t* word = mem + ((b.beat_addr(b.done) & ~uint64_t(B - 1)) - base);
                if (strb == (1u << B) - 1)
                    std::memcpy(word, beat, B);
                else
                    for (uint32_t j = 0; j < B; ++j)
                        if (strb >> j & 1) word[j] = beat[j];
            }
            const bool last = ++b.done == b.beats;
            if (bool(top->m_axi_wlast) != last) ++n.protocol_errors;
            if (last) {
                if (b.resp != RESP_OKAY) ++n.write_error_bursts;
                bq.push_back(BResp{now + write_latency, b.resp, b.id});
                wq.pop_front();
            }
        }
        if (aw) {
            Burst b{};
            b.addr = top->m_axi_awaddr; b.beats = uint32_t(top->m_axi_awlen) + 1;
            b.size = 1u << top->m_axi_awsize; b.kind = top->m_axi_awburst; b.id = top->m_axi_awid;
            check(b);
            wq.push_back(b);
            ++n.write_bursts;
        }
        if (bh) bq.pop_front();

        // ... and the AXI4-Lite manager
        if (lite.kind != Lite::NONE && !lite.done) {
            if (cur.l_arvalid && top->s_axi_arready) lite.a_pending = false;
            if (cur.l_awvalid && top->s_axi_awready) lite.a_pending = false;
            if (cur.l_wvalid && top->s_axi_wready) lite.w_pending = false;
            if (cur.l_rready && top->s_axi_rvalid) {
                lite.done = true;
                lite.data = top->s_axi_rdata;
                lite.resp = top->s_axi_rresp;
            }
            if (cur.l_bready && top->s_axi_bvalid) {
                lite.done = true;
                lite.resp = top->s_axi_bresp;
            }
        }
        ++now;

        // 3. the next cycle's inputs
        // A bucket holds at most one beat per port plus one cycle's worth: fractions carry over, idle
        // time does not bank bandwidth. Read ports with a beat ready are paid in turn, starting from a
        // different one each cycle, while the bucket holds a whole beat.
        const int64_t beat = int64_t(B) * FP_ONE;
        const int64_t rcap = NPORTS * beat + rate - 1, wcap = beat + rate - 1;
        rcredit = rcredit + rate < rcap ? rcredit + rate : rcap;
        wcredit = wcredit + rate < wcap ? wcredit + rate : wcap;
        bool grant[NPORTS] = {};
        int64_t left = rcredit;
        for (int i = 0; i < NPORTS; ++i) {
            const int p = int((turn + i) % NPORTS);
            if (read_ready(p) && left >= beat) {
                grant[p] = true;
                left -= beat;
            }
        }
        turn = (turn + 1) % NPORTS;
        drive_reads<ReadIo0>(0, grant[0]);
#if PORTS == 2
        drive_reads<ReadIo1>(1, grant[1]);
#endif
        nxt.awready = wq.size() + bq.size() < max_writes;
        nxt.wready = !wq.empty() && wcredit >= beat;
        nxt.bvalid = !bq.empty() && now >= bq.front().ready_at;
        if (nxt.bvalid) {
            top->m_axi_bresp = bq.front().resp;
            top->m_axi_bid = bq.front().id;
        }
        const bool lr = lite.kind == Lite::READ && !lite.done, lw = lite.kind == Lite::WRITE && !lite.done;
        nxt.l_arvalid = lr && lite.a_pending;
        nxt.l_rready = lr;
        nxt.l_awvalid = lw && lite.a_pending;
        nxt.l_wvalid = lw && lite.w_pending;
        nxt.l_bready = lw;
        if (lr) top->s_axi_araddr = lite.addr;
        if (lw) {
            top->s_axi_awaddr = lite.addr;
            top->s_axi_wdata = lite.data;
            top->s_axi_wstrb = 0xF;
        }
        top->m_axi_awready = nxt.awready;
        top->m_axi_wready = nxt.wready;
        top->m_axi_bvalid = nxt.bvalid;
        top->s_axi_arvalid = nxt.l_arvalid;
        top->s_axi_rready = nxt.l_rready;
        top->s_axi_awvalid = nxt.l_awvalid;
        top->s_axi_wvalid = nxt.l_wvalid;
        top->s_axi_bready = nxt.l_bready;
        top->aresetn = nxt.aresetn;

        // 4. the edge: the engine takes this cycle's handshakes, the wrapper the next inputs
        top->aclk = 0;
        top->eval();
        top->aclk = 1;
        top->eval();
        cur = nxt;
        ++n.cycles;
    }

    bool reads_idle() const {
        for (int p = 0; p < NPORTS; ++p)
            if (!rp[p].rq.empty()) return false;
        return true;
    }
    void drop_in_flight() {
        for (int p = 0; p < NPORTS; ++p) rp[p].rq.clear();
        wq.clear();
        bq.clear();
    }

    bool ddr_idle() const { return reads_idle() && wq.empty() && bq.empty(); }

    // One AXI4-Lite access; returns the response, or -1 if none came within max_cycles.
    int lite_access(Lite::Kind kind, uint32_t addr, uint32_t data, uint32_t* out, uint32_t max_cycles) {
        lite.kind = kind;
        lite.addr = addr;
        lite.data = data;
        lite.a_pending = true;
        lite.w_pending = kind == Lite::WRITE;
        lite.done = false;
        for (uint32_t i = 0; i < max_cycles && !lite.done; ++i) cycle();
        const bool ok = lite.done;
        lite.kind = Lite::NONE;
        if (!ok) return -1;  // the request is withdrawn (an AXI violation, but the engine is stuck anyway)
        if (out) *out = lite.data;
        return lite.resp;
    }
};

}  // namespace

extern "C" {

// A new simulation over `mem` (mem_bytes bytes at device address `base`); NULL on failure.
void* sim_new(uint8_t* mem, uint64_t mem_bytes, uint64_t base) {
    try {
        return new Sim(mem, mem_bytes, base);
    } catch (...) {
        return nullptr;
    }
}

void sim_free(void* h) { delete static_cast<Sim*>(h); }

uint32_t sim_bus_bytes() { return B; }  // one port's data bytes

uint32_t sim_ports() { return NPORTS; }

const char* sim_counter_names() { return COUNTER_NAMES; }

const uint64_t* sim_counters(void* h) { return reinterpret_cast<const uint64_t*>(&static_cast<Sim*>(h)->n); }

void sim_clear_counters(void* h) { static_cast<Sim*>(h)->n = Counters{}; }

// The DDR model's knobs: latencies for bursts accepted from now on, the rate at once. Latencies
// are at least 1 (the cycle after the handshake).
void sim_config(void* h, uint64_t read_latency, uint64_t write_latency, int64_t bytes_per_cycle_fp16,
                uint32_t max_reads, uint32_t max_writes) {
    Sim* s = static_cast<Sim*>(h);
    for (int p = 0; p < NPORTS; ++p) {
        s->rp[p].latency = read_latency ? read_latency : 1;
        s->rp[p].max_reads = max_reads ? max_reads : 1;
    }
    s->write_latency = write_latency ? write_latency : 1;
    s->rate = bytes_per_cycle_fp16 > 0 ? bytes_per_cycle_fp16 : 1;
    s->max_writes = max_writes ? max_writes : 1;
}

// One read port's own latency and outstanding limit (after sim_config, which sets every port's);
// returns 0, or -1 for a port the engine does not have.
int sim_port_config(void* h, uint32_t port, uint64_t read_latency, uint32_t max_reads) {
    Sim* s = static_cast<Sim*>(h);
    if (port >= uint32_t(NPORTS)) return -1;
    s->rp[port].latency = read_latency ? read_latency : 1;
    s->rp[port].max_reads = max_reads ? max_reads : 1;
    return 0;
}

// aresetn low for `cycles` cycles, then high; the DDR model drops whatever was in flight (AXI
// resets both ends together) and an AXI4-Lite access in progress is abandoned.
void sim_reset(void* h, uint32_t cycles) {
    Sim* s = static_cast<Sim*>(h);
    s->lite = Lite{};
    s->nxt.aresetn = false;
    for (uint32_t i = 0; i < (cycles ? cycles : 1) + 1; ++i) {
        s->drop_in_flight();
        s->cycle();
    }
    s->drop_in_flight();
    s->nxt.aresetn = true;
    for (int i = 0; i < 3; ++i) s->cycle();
}

// Run until the interrupt is high (checked before each cycle: at once if it already is) or
// max_cycles have run; returns the cycles run.
uint64_t sim_run_until_interrupt(void* h, uint64_t max_cycles) {
    Sim* s = static_cast<Sim*>(h);
    uint64_t i = 0;
    while (i < max_cycles && !irq_of(s->top, 0)) {
        s->cycle();
        ++i;
    }
    return i;
}

// Run exactly `cycles` cycles.
void sim_run(void* h, uint64_t cycles) {
    Sim* s = static_cast<Sim*>(h);
    for (uint64_t i = 0; i < cycles; ++i) s->cycle();
}

int sim_interrupt(void* h) { return irq_of(static_cast<Sim*>(h)->top, 0) ? 1 : 0; }

int sim_ddr_idle(void* h) { return static_cast<Sim*>(h)->ddr_idle() ? 1 : 0; }

// Count `cycles` as run without evaluating the model: only for an engine known to be idle with no
// DDR transaction in flight (nothing would change). Returns 0 (and does nothing) if DDR is busy.
int sim_skip_idle(void* h, uint64_t cycles) {
    Sim* s = static_cast<Sim*>(h);
    if (!s->ddr_idle()) return 0;
    s->now += cycles;
    s->n.cycles += cycles;
    s->n.skipped_cycles += cycles;
    return 1;
}

// AXI4-Lite read at byte offset `addr`: returns RRESP (0..3), or -1 if no response came within
// max_cycles.
int sim_reg_read(void* h, uint32_t addr, uint32_t* data, uint32_t max_cycles) {
    return static_cast<Sim*>(h)->lite_access(Lite::READ, addr, 0, data, max_cycles);
}

// AXI4-Lite write of all four bytes: returns BRESP (0..3), or -1 on timeout.
int sim_reg_write(void* h, uint32_t addr, uint32_t data, uint32_t max_cycles) {
    return static_cast<Sim*>(h)->lite_access(Lite::WRITE, addr, data, nullptr, max_cycles);
}

}  // extern "C"
