"""`make bitstream` (hw/bitstream.py, hw/vivado/*.tcl) without Vivado.

* The Python entry with no `vivado` on PATH: one error line, exit 2, and the Verilog, the Tcl and
  gpt_fpga.json written all the same; a clock the IO PLL cannot make is refused before anything.
* The Tcl parses with tclsh 8.6 (`info complete`), and runs under FAKE_VIVADO below: a stub of every
  Vivado command build.tcl uses, which records each call and keeps just enough state to check what
  real Vivado would refuse (a module reference before its source is compiled, a pin the IP does not
  have with this configuration, an unconnected interconnect clock, a misaligned address, a run
  that was not launched), and doing what Vivado does that the flow checks: inferring the engine's AXI
  parameters from the Verilog's attributes, deriving the FCLK0 dividers and the axi_intc's input kind
  in validate_bd_design, a BD 41-1356 critical warning for an unmapped HIGH_OCM. From the record: the
  PS7 settings, the module reference, the wiring (the interrupt reaches IRQ_F2P[0] only through the
  axi_intc), the address map (512 MB of DDR for the engine, HIGH_OCM excluded, the controller on GP0),
  the IP versions looked up, the checks after validate_bd_design, the strategy, the timing gate (setup,
  hold, pulse width, the summary's verdict) and the outputs' names, with each check's failure. What
  only Vivado can tell (that 2022.1 / 2024.1 accept every property and infer the interfaces, synthesis,
  timing) is listed in docs/bitstream.md.

A missing tclsh follows tests/conftest.py's rule: skipped, or failed under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tool_missing
from gpt_fpga.hw import bitstream as bs
from gpt_fpga.hw.top import interface_parameters

VIVADO_DIR = REPO / "hw" / "vivado"
TCLSH = shutil.which("tclsh8.6") or shutil.which("tclsh")


def needs_tclsh(fn):
    """The missing_tool mark (tests/conftest.py: skip, or fail under CI=true) when tclsh is missing."""
    return pytest.mark.missing_tool("tclsh (Tcl 8.6)", "apt-get install tcl8.6")(fn) if TCLSH is None else fn


# ---------------------------------------------------------------------------------------------
# A stub of Vivado's Tcl commands. Run as `tclsh fake_vivado.tcl -mode batch ... -source S -tclargs A`
# (the command line of real Vivado), it defines the commands, sources S with argv = A and writes every
# call as a JSON array (one per line) to $FAKE_LOG, plus ["property", object, NAME, value] for each
# property set. FAKE_WNS / FAKE_WHS are the slack of the worst setup / hold path, FAKE_WPWS the pulse-width
# slack and FAKE_VERDICT the timing summary's last line (default: Vivado's, from the three), FAKE_VERSION
# the version, FAKE_EXTRA_IP more VLNVs in the IP catalog. As Vivado, the stub infers the engine's AXI
# parameters from the Verilog's X_INTERFACE_PARAMETER (FAKE_INFER "busif NAME value": one that it
# infers otherwise), derives the FCLK0 dividers and the axi_intc's input kind only in
# validate_bd_design (FAKE_DIVISORS "d0 d1", FAKE_INTC_KIND: other outcomes), prints critical warning
# BD 41-1356 for a HIGH_OCM segment neither mapped nor excluded, and FAKE_CRITICAL into impl_1's log.
FAKE_VIVADO = r"""
set ::calls {}
proc rec {args} { lappend ::calls $args }
proc jstr {s} {
    set out ""
    foreach ch [split $s ""] {
        scan $ch %c code
        if {$ch eq "\\"} { append out "\\\\" } elseif {$ch eq "\""} { append out "\\\"" } \
        elseif {$code < 32} { append out [format "\\u%04x" $code] } else { append out $ch }
    }
    return "\"$out\""
}
proc dump {} {
    set f [open $::env(FAKE_LOG) w]
    fconfigure $f -encoding utf-8
    foreach c $::calls { puts $f "\[[join [lmap w $c {jstr $w}] ,]\]" }
    close $f
}
rename exit real_exit
proc exit {{code 0}} { rec exit $code; dump; real_exit $code }
proc env {name default} { if {[info exists ::env($name)]} { return $::env($name) }; return $default }
proc opt {argsv name} {
    set i [lsearch -exact $argsv $name]
    if {$i < 0} { return "" }
    return [lindex $argsv [expr {$i + 1}]]
}
proc positional {argsv valued} {
    set out {}
    for {set i 0} {$i < [llength $argsv]} {incr i} {
        set a [lindex $argsv $i]
        if {$a in $valued} { incr i } elseif {[string index $a 0] ne "-"} { lappend out $a }
    }
    return $out
}
proc bytes {v} {
    if {[regexp -nocase {^([0-9]+)([KMG])$} $v -> n u]} {
        return [expr {wide($n) << [dict get {K 10 M 20 G 30} [string toupper $u]]}]
    }
    return [expr {wide($v)}]
}

set ::props [dict create]
proc setp {obj name value} {
    rec property $obj [string toupper $name] $value
    dict set ::props $obj [string toupper $name] $value
}
proc getp {obj name {default ""}} {
    set n [string toupper $name]
    if {[dict exists $::props $obj $n]} { return [dict get $::props $obj $n] }
    return $default
}

set ::catalog [concat {
    xilinx.com:ip:processing_system7:5.4 xilinx.com:ip:processing_system7:5.5
    xilinx.com:ip:proc_sys_reset:5.0 xilinx.com:ip:axi_interconnect:2.1 xilinx.com:ip:smartconnect:1.0
    xilinx.com:ip:axi_intc:4.1 xilinx.com:ip:xlconcat:2.1
} [env FAKE_EXTRA_IP ""]]
set ::files {}
set ::cells [dict create]
set ::connected [dict create]
set ::maps [dict create]
set ::runs [dict create]
set ::nets {}
set ::excluded [dict create]
set ::validated 0
set ::strategies {{Vivado Implementation Defaults} Performance_Explore Performance_ExtraTimingOpt
                  Performance_NetDelay_high Flow_RunPhysOpt}
proc critical {msg} {
    puts "CRITICAL WARNING: $msg"
    if {$::logfile ne ""} { set fh [open $::logfile a]; puts $fh "CRITICAL WARNING: $msg"; close $fh }
}

proc version {args} { rec version {*}$args; return [env FAKE_VERSION 2022.1] }
proc create_project {args} {
    rec create_project {*}$args
    lassign [positional $args {-part}] ::proj ::proj_dir
    set ::part [opt $args -part]
    file mkdir $::proj_dir
    return $::proj
}
proc current_project {} { return $::proj }
proc current_fileset {} { return sources_1 }
proc set_property {args} {
    rec set_property {*}$args
    if {[lindex $args 0] eq "-dict"} {
        set d [lindex $args 1]; set objs [lrange $args 2 end]
    } else {
        set d [lrange $args 0 1]; set objs [lrange $args 2 end]
    }
    if {[llength $d] % 2 || $objs eq "" || "" in $objs} { error "set_property: bad arguments $args" }
    foreach obj $objs { foreach {k v} $d { setp $obj $k $v } }
}
proc add_files {args} {
    rec add_files {*}$args
    foreach f [positional $args {-fileset}] {
        if {![file exists $f]} { error "add_files: no file $f" }
        lappend ::files $f
    }
}
proc update_compile_order {args} { rec update_compile_order {*}$args; set ::compiled $::files }
proc create_bd_design {name} { rec create_bd_design $name; set ::bd $name }
proc get_ipdefs {args} {
    rec get_ipdefs {*}$args
    set pattern [lindex [positional $args {-filter}] 0]
    return [lsearch -all -inline -glob $::catalog $pattern]
}

# the ports of module `top` in the compiled sources
proc module_text {top} {
    foreach f $::compiled {
        set fh [open $f]; set text [read $fh]; close $fh
        if {[regexp "module $top \\((.*?)\\);" $text -> body]} { return $body }
    }
    error "create_bd_cell: module $top is not in the compiled sources"
}
proc module_ports {top} {
    set decl {(?:input|output)\s+wire\s+(?:\[[^\]]*\]\s*)?(\w+)}
    return [lmap {all name} [regexp -all -inline $decl [module_text $top]] {set name}]
}
# what Vivado infers from X_INTERFACE_PARAMETER "XIL_INTERFACENAME busif, NAME value, ..."
proc infer_parameters {cell top} {
    foreach {all text} [regexp -all -inline {X_INTERFACE_PARAMETER = "XIL_INTERFACENAME ([^"]*)"} [module_text $top]] {
        set items [split $text ,]
        set busif [string trim [lindex $items 0]]
        foreach item [lrange $items 1 end] {
            lassign [string trim $item] name value
            setp /$cell/$busif CONFIG.$name $value
        }
    }
    set level [regexp {SENSITIVITY LEVEL_HIGH[^\n]*\n\s*output wire interrupt\M} [module_text $top]]
    dict set ::cells $cell level_irq $level
    if {[env FAKE_INFER ""] ne ""} {
        lassign [env FAKE_INFER ""] busif name value
        setp /$cell/$busif CONFIG.$name $value
    }
}
proc create_bd_cell {args} {
    rec create_bd_cell {*}$args
    if {![info exists ::bd]} { error "create_bd_cell before create_bd_design" }
    set type [opt $args -type]
    set name [lindex [positional $args {-type -vlnv -reference}] 0]
    if {$type eq "module"} {
        if {![info exists ::compiled]} { error "module reference before update_compile_order" }
        set ports [module_ports [opt $args -reference]]
        set intf {}
        foreach p {s_axi m_axi m_axi1} { if {[lsearch -glob $ports ${p}_*] >= 0} { lappend intf $p } }
        dict set ::cells $name [dict create kind module ports $ports intf $intf]
        infer_parameters $name [opt $args -reference]
    } else {
        set vlnv [opt $args -vlnv]
        if {$vlnv ni $::catalog} { error "create_bd_cell: $vlnv is not in the IP catalog" }
        dict set ::cells $name [dict create kind [lindex [split $vlnv :] 2] vlnv $vlnv]
    }
    return "/$name"
}
# pins and interfaces a cell has now (the PS7's depend on its configuration, as in Vivado)
proc cell_pins {name} {
    set c [dict get $::cells $name]
    set o /$name
    switch -- [dict get $c kind] {
        module { return [list [dict get $c ports] [dict get $c intf]] }
        processing_system7 {
            set pins {}; set intf {DDR FIXED_IO}
            if {[getp $o CONFIG.PCW_EN_CLK0_PORT 1]} { lappend pins FCLK_CLK0 }
            if {[getp $o CONFIG.PCW_EN_RST0_PORT 1]} { lappend pins FCLK_RESET0_N }
            if {[getp $o CONFIG.PCW_USE_M_AXI_GP0 0]} { lappend pins M_AXI_GP0_ACLK; lappend intf M_AXI_GP0 }
            foreach hp {HP0 HP2} {
                if {[getp $o CONFIG.PCW_USE_S_AXI_$hp 0]} { lappend pins S_AXI_${hp}_ACLK; lappend intf S_AXI_$hp }
            }
            if {[getp $o CONFIG.PCW_USE_FABRIC_INTERRUPT 0] && [getp $o CONFIG.PCW_IRQ_F2P_INTR 0]} {
                lappend pins IRQ_F2P
            }
            return [list $pins $intf]
        }
        axi_intc { return [list {s_axi_aclk s_axi_aresetn intr irq} {s_axi}] }
        proc_sys_reset {
            return [list {slowest_sync_clk ext_reset_in aux_reset_in dcm_locked mb_debug_sys_rst
                          peripheral_aresetn interconnect_aresetn peripheral_reset bus_struct_reset mb_reset} {}]
        }
        axi_interconnect {
            set pins {ACLK ARESETN}; set intf {}
            foreach {side n} [list S [getp $o CONFIG.NUM_SI 1] M [getp $o CONFIG.NUM_MI 2]] {
                for {set i 0} {$i < $n} {incr i} {
                    set p [format %s%02d $side $i]
                    lappend pins ${p}_ACLK ${p}_ARESETN; lappend intf ${p}_AXI
                }
            }
            return [list $pins $intf]
        }
    }
    error "no pins for [dict get $c kind]"
}
proc find_pin {path which} {
    lassign [split [string trimleft $path /] /] cell pin
    if {![dict exists $::cells $cell]} { return "" }
    if {$pin in [lindex [cell_pins $cell] $which]} { return /$cell/$pin }
    return ""
}
proc get_bd_pins {args} { rec get_bd_pins {*}$args; find_pin [lindex [positional $args {}] 0] 0 }
proc get_bd_intf_pins {args} { rec get_bd_intf_pins {*}$args; find_pin [lindex [positional $args {}] 0] 1 }
proc mark {objs} { foreach o $objs { if {$o eq ""} { error "connect: empty object" }; dict incr ::connected $o } }
proc connect_bd_net {args} { rec connect_bd_net {*}$args; mark $args; lappend ::nets $args }
proc connect_bd_intf_net {args} {
    rec connect_bd_intf_net {*}$args
    if {[llength $args] != 2} { error "connect_bd_intf_net takes two interfaces" }
    mark $args
}
proc make_bd_intf_pins_external {args} { rec make_bd_intf_pins_external {*}$args; mark $args }

proc get_bd_addr_spaces {args} {
    rec get_bd_addr_spaces {*}$args
    set name [string trimleft [lindex $args 0] /]
    lassign [split $name /] cell space
    if {![dict exists $::cells $cell]} { return "" }
    set kind [dict get $::cells $cell kind]
    if {($kind eq "processing_system7" && $space eq "Data") ||
        ($kind eq "module" && $space in [lindex [cell_pins $cell] 1] && [string match m_* $space])} { return /$name }
    return ""
}
proc slave_segments {} {
    set out {}
    dict for {name c} $::cells {
        if {[dict get $c kind] eq "module" && "s_axi" in [dict get $c intf]} { lappend out $name/s_axi/reg0 }
        if {[dict get $c kind] eq "axi_intc"} { lappend out $name/S_AXI/Reg }
        foreach hp {HP0 HP2} {
            if {"S_AXI_$hp" in [lindex [cell_pins $name] 1]} {
                lappend out $name/S_AXI_$hp/${hp}_DDR_LOWOCM $name/S_AXI_$hp/${hp}_HIGH_OCM
            }
        }
    }
    return $out
}
proc get_bd_addr_segs {args} {
    rec get_bd_addr_segs {*}$args
    set space [opt $args -of_objects]
    if {"-excluded" in $args} { return [expr {[dict exists $::excluded $space] ? [dict get $::excluded $space] : ""}] }
    if {$space ne ""} { return [dict keys [dict filter $::maps script {k v} {expr {[dict get $v space] eq $space}}]] }
    return [lmap s [lsearch -all -inline -glob [slave_segments] [string trimleft [lindex $args 0] /]] {string cat / $s}]
}
proc assign_bd_address {args} {
    rec assign_bd_address {*}$args
    set space [opt $args -target_address_space]
    set seg [lindex [positional $args {-offset -range -target_address_space}] 0]
    set offset [bytes [opt $args -offset]]; set range [bytes [opt $args -range]]
    if {$space eq "" || $seg eq ""} { error "assign_bd_address: no space or segment" }
    if {$range & ($range - 1) || $offset % $range} {
        error "assign_bd_address: range must be a power of two and the offset aligned to it"
    }
    set name $space/SEG_[string map {/ _} [string trimleft $seg /]]
    dict set ::maps $name [dict create space $space]
    setp $name OFFSET [format 0x%08X $offset]
    setp $name RANGE [format 0x%08X $range]
}
proc exclude_bd_addr_seg {args} {
    rec exclude_bd_addr_seg {*}$args
    set space [opt $args -target_address_space]
    set seg [lindex [positional $args {-target_address_space -offset -range}] 0]
    if {$space eq "" || $seg ni [lmap s [slave_segments] {string cat / $s}]} { error "exclude_bd_addr_seg: bad arguments $args" }
    dict lappend ::excluded $space $space/SEG_[string map {/ _} [string trimleft $seg /]]
}
proc validate_bd_design {args} {
    rec validate_bd_design {*}$args
    set ::validated 1
    # BD 41-1356: a master that reaches a port's DDR but neither maps nor excludes its HIGH_OCM
    dict for {name v} $::maps {
        if {[regexp {^(.*)/SEG_(.*)_(HP[0-9])_DDR_LOWOCM$} $name -> space ps hp]} {
            set ocm $space/SEG_${ps}_${hp}_HIGH_OCM
            set excluded [expr {[dict exists $::excluded $space] && $ocm in [dict get $::excluded $space]}]
            if {![dict exists $::maps $ocm] && !$excluded} {
                critical "\[BD 41-1356\] Address block </$ps/${hp}_HIGH_OCM> is not mapped into <$space>.\
                          Please use Address Editor to either map or exclude it."
            }
        }
    }
    dict for {name c} $::cells {
        lassign [cell_pins $name] pins intf
        foreach p [concat [lsearch -all -inline -glob $pins *ACLK] [lsearch -all -inline -glob $pins *ARESETN] \
                          [lsearch -all -inline -regexp $pins {^(s_axi_)?(aclk|aresetn)$}] $intf] {
            if {![dict exists $::connected /$name/$p]} { error "validate_bd_design: /$name/$p is not connected" }
        }
    }
}
proc save_bd_design {args} { rec save_bd_design {*}$args }
proc get_files {args} {
    rec get_files {*}$args
    if {[lindex $args 0] eq "$::bd.bd"} { return $::proj_dir/$::proj.srcs/sources_1/bd/$::bd/$::bd.bd }
    return ""
}
proc generate_target {args} { rec generate_target {*}$args }
proc make_wrapper {args} {
    rec make_wrapper {*}$args
    set f $::proj_dir/$::proj.gen/sources_1/bd/$::bd/hdl/$::bd\_wrapper.v
    file mkdir [file dirname $f]
    set fh [open $f w]; puts $fh "module $::bd\_wrapper; endmodule"; close $fh
    return $f
}
proc launch_runs {args} {
    rec launch_runs {*}$args
    set run [lindex [positional $args {-jobs -to_step}] 0]
    if {$run eq "impl_1" && ![dict exists $::runs synth_1]} { error "impl_1 before synth_1" }
    set step [expr {$run eq "synth_1" ? "synth_design" : [opt $args -to_step]}]
    dict set ::runs $run 1
    setp $run PROGRESS 100%
    setp $run STATUS "$step Complete!"
    setp $run DIRECTORY $::proj_dir/$::proj.runs/$run
    if {$step eq "write_bitstream" && [env FAKE_CRITICAL ""] ne ""} {
        file mkdir $::proj_dir/$::proj.runs/impl_1
        set fh [open $::proj_dir/$::proj.runs/impl_1/runme.log w]
        puts $fh "INFO: \[Common 17-1\] fake run\nCRITICAL WARNING: [env FAKE_CRITICAL {}]"
        close $fh
    }
    if {$step eq "write_bitstream"} {
        foreach {f text} [list $::proj_dir/$::proj.runs/impl_1/$::bd\_wrapper.bit FAKE-BIT \
                               $::proj_dir/$::proj.gen/sources_1/bd/$::bd/hw_handoff/$::bd.hwh FAKE-HWH] {
            file mkdir [file dirname $f]
            set fh [open $f w]; puts $fh $text; close $fh
        }
    }
}
proc get_runs {name} { rec get_runs $name; if {$name ni {synth_1 impl_1}} { error "no run $name" }; return $name }
proc list_property_value {args} {
    rec list_property_value {*}$args
    if {$args ne {strategy impl_1}} { error "list_property_value: not stubbed: $args" }
    return $::strategies
}
proc wait_on_run {args} { rec wait_on_run {*}$args }
proc open_run {args} { rec open_run {*}$args }
proc write_report {args} { set fh [open [opt $args -file] w]; puts $fh "fake report: $args"; close $fh }
proc report_utilization {args} { rec report_utilization {*}$args; write_report {*}$args }
proc report_timing_summary {args} {
    rec report_timing_summary {*}$args
    set wns [env FAKE_WNS 0.250]; set whs [env FAKE_WHS 0.050]; set wpws [env FAKE_WPWS 2.750]
    set ok [expr {$wns >= 0 && $whs >= 0 && $wpws >= 0}]
    set verdict [env FAKE_VERDICT [expr {$ok ? "All user specified timing constraints are met." : "Timing constraints are not met."}]]
    set fh [open [opt $args -file] w]
    puts $fh "| Design Timing Summary\n| ---------------------\n"
    puts $fh "    WNS(ns)      TNS(ns)  TNS Failing Endpoints  TNS Total Endpoints      WHS(ns)      THS(ns)  THS Failing Endpoints  THS Total Endpoints     WPWS(ns)     TPWS(ns)  TPWS Failing Endpoints  TPWS Total Endpoints  "
    puts $fh "    -------      -------  ---------------------  -------------------      -------      -------  ---------------------  -------------------     --------     --------  ----------------------  --------------------  "
    puts $fh [format "%11s %12s %22s %20s %12s %12s %22s %20s %12s %12s %23s %21s" $wns 0.000 0 12345 $whs 0.000 0 12345 $wpws 0.000 0 5678]
    puts $fh "\n\n$verdict\n"
    close $fh
}
proc get_timing_paths {args} {
    rec get_timing_paths {*}$args
    setp path_max SLACK [env FAKE_WNS 0.250]
    setp path_min SLACK [env FAKE_WHS 0.050]
    return [expr {[opt $args -delay_type] eq "max" ? "path_max" : "path_min"}]
}
proc get_property {name obj} {
    rec get_property $name $obj
    if {$obj eq ""} { error "get_property $name: no object" }
    set n [string toupper $name]
    # values Vivado derives: until validate_bd_design, the IP's defaults (FCLK0 50 MHz, edge input)
    if {[regexp {^CONFIG.PCW_FCLK0_PERIPHERAL_DIVISOR([01])$} $n -> d]} {
        if {!$::validated} { return [lindex {10 2} $d] }
        set div [expr {max(1, round(1000.0 / [getp $obj CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ 50]))}]
        return [lindex [env FAKE_DIVISORS "$div 1"] $d]
    }
    if {$n eq "CONFIG.PCW_IOPLL_CTRL_FBDIV"} { return 20 }
    if {$n eq "CONFIG.C_KIND_OF_INTR" && [dict exists $::cells [string trimleft $obj /]]} {
        set level 0
        foreach net $::nets {
            if {"$obj/intr" in $net} {
                foreach p $net {
                    lassign [split [string trimleft $p /] /] c pin
                    if {$pin eq "interrupt" && [dict get $::cells $c kind] eq "module" && [dict get $::cells $c level_irq]} { set level 1 }
                }
            }
        }
        if {$::validated && $level} { return [env FAKE_INTC_KIND 0xFFFFFFFE] }
        return 0xFFFFFFFF
    }
    if {$n eq "CONFIG.C_KIND_OF_LVL"} { return 0xFFFFFFFF }
    if {$n eq "VLNV" && $obj in $::catalog} { return $obj }
    return [getp $obj $n]
}

# vivado's own command line
set script [opt $argv -source]
set ::logfile [opt $argv -log]
set i [lsearch -exact $argv -tclargs]
set argv [expr {$i < 0 ? {} : [lrange $argv [expr {$i + 1}] end]}]
set argc [llength $argv]
rec vivado {*}$::argv
source $script
dump
real_exit 0
"""


def tcl_path_ok(path: Path) -> bool:
    """True when tclsh's `info complete` accepts the whole file."""
    script = f"set f [open {{{path}}}]; set s [read $f]; close $f; puts [info complete $s]"
    r = subprocess.run([TCLSH], input=script, capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "1"


def run_fake(out: Path, tmp: Path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """build.tcl under the stub in `out`, as `vivado -mode batch -source build.tcl -tclargs params.tcl`."""
    fake = tmp / "fake_vivado.tcl"
    fake.write_text(FAKE_VIVADO)
    log = tmp / "calls.jsonl"
    r = subprocess.run([TCLSH, str(fake), "-mode", "batch", "-nojournal", "-source", "build.tcl", "-tclargs",
                        "params.tcl"], cwd=out, capture_output=True, text=True,
                       env={**os.environ, "FAKE_LOG": str(log), **env}, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def props(calls, obj) -> dict[str, str]:
    return {c[2]: c[3] for c in calls if c[0] == "property" and c[1] == obj}


def index(calls, pred) -> int:
    for i, c in enumerate(calls):
        if pred(c):
            return i
    raise AssertionError("no such call")


# How an interrupt crosses a cell as PYNQ walks it (pynqmetadata's interrupt views): an axi_intc's intr
# to its irq, an xlconcat's In<n> to its dout.
CROSSINGS = {"axi_intc": (r"intr", r"irq"), "xlconcat": (r"In\d+", r"dout")}


def interrupt_routes(calls, src: str, dst: str, through=tuple(CROSSINGS)) -> list[list[str]]:
    """Every route of nets from pin `src` to pin `dst`, as the cells it crosses (only `through` kinds)."""
    kinds = {"/" + c[-1]: c[c.index("-vlnv") + 1].split(":")[2] for c in calls
             if c[0] == "create_bd_cell" and "-vlnv" in c}
    nets = [set(c[1:]) for c in calls if c[0] == "connect_bd_net"]
    routes = []

    def walk(pin, crossed):
        for net in (n for n in nets if pin in n):
            for other in net - {pin}:
                if other == dst:
                    routes.append(crossed)
                cell, name = other.rsplit("/", 1)
                kind = kinds.get(cell)
                if kind in through and cell not in crossed and re.fullmatch(CROSSINGS[kind][0], name):
                    walk(f"{cell}/{CROSSINGS[kind][1]}", crossed + [cell])

    walk(src, [])
    return routes


def env_without_vivado() -> dict:
    """os.environ with every PATH folder that holds a `vivado` removed."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "vivado").exists()]
    return {**os.environ, "PATH": os.pathsep.join(dirs)}


# ---------------------------------------------------------------------------------------------
# the no-Vivado path of the real entry (its outputs feed the Tcl tests)

@pytest.fixture(scope="module")
def no_vivado(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlay")
    stale = out / "gpt_fpga.bit"
    stale.write_text("an older build")
    r = subprocess.run([sys.executable, "-m", "gpt_fpga.hw.bitstream", "--out", str(out)], capture_output=True,
                       text=True, env=env_without_vivado(), cwd=REPO, timeout=300)
    return r, out


@pytest.fixture
def overlay(no_vivado, tmp_path) -> Path:
    """A private copy of the written folder (the Tcl runs write into it)."""
    return Path(shutil.copytree(no_vivado[1], tmp_path / "overlay"))


def test_without_vivado_one_line_exit_2_and_the_inputs_are_written(no_vivado):
    r, out = no_vivado
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    for word in ("Vivado", "not on PATH", "2022.1", "PYNQ 3.0", "2024.1", "PYNQ 3.1", "make synth", str(out),
                 "vivado -mode batch -source build.tcl -tclargs params.tcl"):
        assert word in line, word
    for name in ("build.tcl", "pynq_z2_ps7.tcl", "params.tcl", "gpt_fpga_engine.v", "gpt_fpga.json"):
        assert (out / name).is_file(), name
    assert not (out / "gpt_fpga.bit").exists(), "a stale bitstream must not sit next to the new json"
    assert (out / "build.tcl").read_text() == (VIVADO_DIR / "build.tcl").read_text()
    assert "module gpt_fpga_engine (" in (out / "gpt_fpga_engine.v").read_text()
    ident = json.loads((out / "gpt_fpga.json").read_text())
    assert ident["engine"]["weights"] == "int8" and ident["engine"]["group"] is None
    # the board's default: a 128-bit datapath on two 64-bit ports (HP0, HP2) at 142.857 MHz
    assert ident["engine"]["bus_bits"] == 128 and ident["engine"]["ports"] == 2
    assert ident["engine"]["top"] == "gpt_fpga_engine"
    assert ident["engine"]["identity_registers"]["HW_CONFIG"] == 128 | 2 << 24  # bus 128, int8, group 0, 2 ports
    assert ident["clock"]["divisor"] == 7 and abs(ident["clock"]["fclk0_mhz"] - 1000 / 7) < 1e-5
    assert ident["registers"]["base"] == 0x4000_0000
    assert ident["ddr"] == {"base": 0, "range": 512 << 20,
                            "ports": [{"master": "m_axi", "port": "S_AXI_HP0", "segment": "HP0_DDR_LOWOCM"},
                                      {"master": "m_axi1", "port": "S_AXI_HP2", "segment": "HP2_DDR_LOWOCM"}]}
    verilog = (out / "gpt_fpga_engine.v").read_text()
    assert "m_axi1_arvalid" in verilog and "m_axi1_awvalid" not in verilog  # port 1 reads only
    assert len(ident["git"]["commit"]) == 40 and ident["vivado"] is None
    assert (ident["bitstream"], ident["hwh"]) == ("gpt_fpga.bit", "gpt_fpga.hwh")


@pytest.mark.parametrize("clock", ["150", "111.11", "250", "99", "fast"])
def test_a_clock_the_io_pll_cannot_make_is_refused(tmp_path, clock):
    out = tmp_path / "overlay"
    r = subprocess.run([sys.executable, "-m", "gpt_fpga.hw.bitstream", "--clock-mhz", clock, "--out", str(out)],
                       capture_output=True, text=True, env=env_without_vivado(), cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and "100, 125, 142.857, 166.67, 200" in r.stderr
    assert clock in r.stderr
    assert not out.exists(), "nothing is written for a refused request"


@pytest.mark.parametrize("clock, divisor", [("100", 10), ("125", 8), ("142.857", 7), ("142.86", 7), ("166.67", 6),
                                            ("166.667", 6), ("200", 5)])
def test_io_pll_clocks(clock, divisor):
    assert bs.fclk0_divisor(bs.parse_clock(clock)) == divisor


def test_bad_weights_are_one_line(tmp_path):
    rc = bs.main(["--weights", "int3", "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_makefile_passes_the_variables():
    if shutil.which("make") is None:
        tool_missing("make", "apt-get install make")
    r = subprocess.run(["make", "-n", "bitstream", "WEIGHTS=int4", "GROUP=64", "PORTS=1", "CLOCK_MHZ=100"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = " ".join(r.stdout.replace("\\\n", " ").split())
    assert "-m gpt_fpga.hw.bitstream --weights int4 --group 64 --ports 1 --clock-mhz 100" in cmd
    r = subprocess.run(["make", "-n", "bitstream"], cwd=REPO, capture_output=True, text=True, timeout=60)
    cmd = " ".join(r.stdout.replace("\\\n", " ").split())
    assert '--weights int8 --group 128 --ports 2 --clock-mhz 142.857 --strategy "auto"' in cmd
    r = subprocess.run(["make", "-n", "bitstream", "STRATEGY=Vivado Implementation Defaults"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert '--strategy "Vivado Implementation Defaults"' in r.stdout
    help_text = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "make bitstream" in help_text


# ---------------------------------------------------------------------------------------------
# the Tcl

@needs_tclsh
@pytest.mark.parametrize("name", ["build.tcl", "pynq_z2_ps7.tcl"])
def test_tcl_parses(name):
    assert tcl_path_ok(VIVADO_DIR / name)


@needs_tclsh
def test_generated_params_parse(overlay):
    assert tcl_path_ok(overlay / "params.tcl")


def test_no_version_locked_tcl():
    """No write_bd_tcl version lock (it refuses any other Vivado) and no hard-coded IP version."""
    for path in VIVADO_DIR.glob("*.tcl"):
        text = path.read_text()
        assert "scripts_vivado_version" not in text and "current_vivado_version" not in text, path
        assert not re.search(r"xilinx\.com:ip:\w+:\d", text), path


@needs_tclsh
def test_flow_under_a_vivado_stub(overlay, tmp_path):
    r, calls = run_fake(overlay, tmp_path, FAKE_WNS="0.412", FAKE_WHS="0.031")
    assert r.returncode == 0, r.stdout + r.stderr
    names = [c[0] for c in calls]

    # project and the module reference, after its source is compiled
    create = calls[names.index("create_project")]
    assert "-part" in create and create[create.index("-part") + 1] == "xc7z020clg400-1"
    added = index(calls, lambda c: c[0] == "add_files" and c[-1].endswith("gpt_fpga_engine.v"))
    compiled = index(calls, lambda c: c[0] == "update_compile_order")
    module = index(calls, lambda c: c[:3] == ["create_bd_cell", "-type", "module"])
    assert added < compiled < module
    assert calls[module][3:] == ["-reference", "gpt_fpga_engine", "engine"]

    # IP versions looked up (FINN style), the latest taken
    looked_up = {c[2] for c in calls if c[0] == "get_ipdefs"}
    assert looked_up == {"xilinx.com:ip:processing_system7:*", "xilinx.com:ip:proc_sys_reset:*",
                         "xilinx.com:ip:axi_interconnect:*", "xilinx.com:ip:axi_intc:*"}
    assert all("-all" in c for c in calls if c[0] == "get_ipdefs")
    vlnvs = {c[-1]: c[c.index("-vlnv") + 1] for c in calls if c[0] == "create_bd_cell" and "-vlnv" in c}
    assert vlnvs == {"ps7": "xilinx.com:ip:processing_system7:5.5", "rst_fclk0": "xilinx.com:ip:proc_sys_reset:5.0",
                     "ctrl_interconnect": "xilinx.com:ip:axi_interconnect:2.1",
                     "mem_interconnect": "xilinx.com:ip:axi_interconnect:2.1",
                     "mem1_interconnect": "xilinx.com:ip:axi_interconnect:2.1",
                     "axi_intc": "xilinx.com:ip:axi_intc:4.1"}

    # the PS7, configured for the PYNQ-Z2 by hand
    ps7 = props(calls, "/ps7")
    expected = {
        "CONFIG.PCW_UIPARAM_DDR_MEMORY_TYPE": "DDR 3", "CONFIG.PCW_UIPARAM_DDR_BUS_WIDTH": "16 Bit",
        "CONFIG.PCW_UIPARAM_DDR_DRAM_WIDTH": "16 Bits", "CONFIG.PCW_UIPARAM_DDR_DEVICE_CAPACITY": "4096 MBits",
        "CONFIG.PCW_UIPARAM_DDR_FREQ_MHZ": "525", "CONFIG.PCW_UIPARAM_DDR_SPEED_BIN": "DDR3_1066F",
        "CONFIG.PCW_UIPARAM_DDR_PARTNO": "Custom", "CONFIG.PCW_UIPARAM_DDR_T_RCD": "13.125",
        "CONFIG.PCW_UIPARAM_DDR_T_RC": "50.625", "CONFIG.PCW_UIPARAM_DDR_BOARD_DELAY0": "0.223",
        "CONFIG.PCW_UIPARAM_DDR_DQS_TO_CLK_DELAY_1": "0.058", "CONFIG.PCW_CRYSTAL_PERIPHERAL_FREQMHZ": "50",
        "CONFIG.PCW_PRESET_BANK1_VOLTAGE": "LVCMOS 1.8V", "CONFIG.PCW_UART0_UART0_IO": "MIO 14 .. 15",
        "CONFIG.PCW_USE_M_AXI_GP0": "1", "CONFIG.PCW_USE_S_AXI_HP0": "1", "CONFIG.PCW_S_AXI_HP0_DATA_WIDTH": "64",
        "CONFIG.PCW_USE_S_AXI_HP2": "1", "CONFIG.PCW_S_AXI_HP2_DATA_WIDTH": "64",
        "CONFIG.PCW_USE_FABRIC_INTERRUPT": "1", "CONFIG.PCW_IRQ_F2P_INTR": "1",
        "CONFIG.PCW_FCLK0_PERIPHERAL_CLKSRC": "IO PLL", "CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ": "142.857",
    }
    assert {k: ps7.get(k) for k in expected} == expected
    assert not any(k.startswith("CONFIG.PCW_ACT_") for k in ps7), "ACT_* values are Vivado's to derive"
    assert ["make_bd_intf_pins_external", "/ps7/DDR", "/ps7/FIXED_IO"] in calls

    # the engine's AXI facts come from the Verilog (inferred by the stub as Vivado does) and are only
    # read back: no set_property on its interfaces, every parameter of params.tcl compared
    assert not [c for c in calls if c[0] == "set_property" and c[-1].startswith("/engine")]
    engine = bs.make_engine("int8", 32, 2)
    for busif, expected in interface_parameters(engine).items():
        read_back = {c[1][len("CONFIG."):] for c in calls if c[0] == "get_property" and c[2] == f"/engine/{busif}"}
        assert read_back == set(expected), busif
        assert index(calls, lambda c: c[:3] == ["get_property", "CONFIG.PROTOCOL", f"/engine/{busif}"]) < \
            index(calls, lambda c: c[:2] == ["launch_runs", "synth_1"])
    assert props(calls, "/engine/m_axi")["CONFIG.MAX_BURST_LENGTH"] == "16"
    assert props(calls, "/engine/m_axi1")["CONFIG.READ_WRITE_MODE"] == "READ_ONLY"

    # wiring
    intf = {tuple(c[1:]) for c in calls if c[0] == "connect_bd_intf_net"}
    assert intf == {("/ps7/M_AXI_GP0", "/ctrl_interconnect/S00_AXI"), ("/ctrl_interconnect/M00_AXI", "/engine/s_axi"),
                    ("/ctrl_interconnect/M01_AXI", "/axi_intc/s_axi"),
                    ("/engine/m_axi", "/mem_interconnect/S00_AXI"), ("/mem_interconnect/M00_AXI", "/ps7/S_AXI_HP0"),
                    ("/engine/m_axi1", "/mem1_interconnect/S00_AXI"), ("/mem1_interconnect/M00_AXI", "/ps7/S_AXI_HP2")}
    nets = [set(c[1:]) for c in calls if c[0] == "connect_bd_net"]
    # the interrupt as PYNQ 3.x finds it: IRQ_F2P[0] is reached only through an axi_intc's intr
    assert interrupt_routes(calls, "/engine/interrupt", "/ps7/IRQ_F2P") == [["/axi_intc"]]
    assert interrupt_routes(calls, "/engine/interrupt", "/ps7/IRQ_F2P", through=()) == []
    intc = props(calls, "/axi_intc")
    assert (intc["CONFIG.C_IRQ_IS_LEVEL"], intc["CONFIG.C_IRQ_ACTIVE"]) == ("1", "1")
    for name in ("C_KIND_OF_INTR", "C_KIND_OF_LVL", "C_IRQ_IS_LEVEL", "C_IRQ_ACTIVE"):  # read back once validated
        assert index(calls, lambda c: c[:3] == ["get_property", f"CONFIG.{name}", "/axi_intc"]) > \
            calls.index(["validate_bd_design"])
    assert any({"/ps7/FCLK_CLK0", "/axi_intc/s_axi_aclk", "/ctrl_interconnect/M01_ACLK"} <= n for n in nets)
    assert any({"/rst_fclk0/peripheral_aresetn", "/axi_intc/s_axi_aresetn"} <= n for n in nets)
    assert any({"/ps7/FCLK_CLK0", "/engine/aclk", "/ps7/S_AXI_HP0_ACLK", "/ps7/S_AXI_HP2_ACLK",
                "/ps7/M_AXI_GP0_ACLK"} <= n for n in nets)
    assert any({"/rst_fclk0/peripheral_aresetn", "/engine/aresetn"} <= n for n in nets)
    assert {"/ps7/FCLK_RESET0_N", "/rst_fclk0/ext_reset_in"} in nets
    assert props(calls, "/ctrl_interconnect")["CONFIG.NUM_MI"] == "2"  # the engine's and the axi_intc's registers
    for ic in ("mem_interconnect", "mem1_interconnect"):
        assert props(calls, f"/{ic}")["CONFIG.NUM_MI"] == "1"

    # address map: registers on GP0, all 512 MB of DDR for the engine through HP0
    assigns = [c for c in calls if c[0] == "assign_bd_address"]
    by_seg = {c[-1]: dict(zip(c[1:-1:2], c[2:-1:2])) for c in assigns}
    reg = by_seg["/engine/s_axi/reg0"]
    assert reg == {"-offset": "0x40000000", "-range": "64K", "-target_address_space": "/ps7/Data"}
    # the controller on GP0 (the PS's data space, behind M_AXI_GP0 -> ctrl_interconnect -> M01)
    assert by_seg["/axi_intc/S_AXI/Reg"] == {"-offset": "0x41800000", "-range": "64K", "-target_address_space": "/ps7/Data"}
    assert props(calls, "/ps7/Data/SEG_axi_intc_S_AXI_Reg") == {"OFFSET": "0x41800000", "RANGE": "0x00010000"}
    for master, hp in (("m_axi", "HP0"), ("m_axi1", "HP2")):
        ddr = by_seg[f"/ps7/S_AXI_{hp}/{hp}_DDR_LOWOCM"]
        assert ddr["-target_address_space"] == f"/engine/{master}"
        low = int(ddr["-offset"], 16)
        size = {"M": 1 << 20, "K": 1 << 10}[ddr["-range"][-1]] * int(ddr["-range"][:-1])
        assert (low, low + size - 1) == (0x0000_0000, 0x1FFF_FFFF)
        assert props(calls, f"/engine/{master}/SEG_ps7_S_AXI_{hp}_{hp}_DDR_LOWOCM") == {"OFFSET": "0x00000000",
                                                                                      "RANGE": "0x20000000"}
        assert ["exclude_bd_addr_seg", "-target_address_space", f"/engine/{master}",
                f"/ps7/S_AXI_{hp}/{hp}_HIGH_OCM"] in calls
    assert "CRITICAL WARNING" not in r.stdout  # the stub's BD 41-1356 for a HIGH_OCM left unmapped

    # FCLK0 checked as PYNQ sets it, from the dividers Vivado derived in validate_bd_design
    validate_at = calls.index(["validate_bd_design"])
    for name in ("PCW_FCLK0_PERIPHERAL_DIVISOR0", "PCW_FCLK0_PERIPHERAL_DIVISOR1", "PCW_IOPLL_CTRL_FBDIV"):
        assert index(calls, lambda c: c[:3] == ["get_property", f"CONFIG.{name}", "/ps7"]) > validate_at, name
    assert not [c for c in calls if c[0] == "get_property" and "PCW_ACT_" in c[1]]

    # validated before the runs; the runs go to write_bitstream; slack read from the worst paths
    validate = names.index("validate_bd_design")
    assert validate < index(calls, lambda c: c[:2] == ["launch_runs", "synth_1"])
    impl_at = index(calls, lambda c: c[:2] == ["launch_runs", "impl_1"])
    impl = calls[impl_at]
    assert impl[impl.index("-to_step") + 1] == "write_bitstream"
    # 142.857 MHz: a performance strategy, set before the run
    assert index(calls, lambda c: c == ["set_property", "strategy", "Performance_ExtraTimingOpt", "impl_1"]) < impl_at
    assert ["get_property", "SLACK", "path_max"] in calls and ["get_property", "SLACK", "path_min"] in calls
    assert ["set_property", "top", "gpt_fpga_wrapper", "sources_1"] in calls

    # outputs: one basename for the .bit, the .hwh (from <proj>.gen/.../hw_handoff) and the json
    assert (overlay / "gpt_fpga.bit").read_text() == "FAKE-BIT\n"
    assert (overlay / "gpt_fpga.hwh").read_text() == "FAKE-HWH\n"
    assert {p.stem for p in overlay.glob("gpt_fpga.*")} == {"gpt_fpga"}
    assert {p.suffix for p in overlay.glob("gpt_fpga.*")} == {".bit", ".hwh", ".json"}
    for report in ("gpt_fpga_utilization.rpt", "gpt_fpga_utilization_hier.rpt", "gpt_fpga_timing.rpt"):
        assert (overlay / report).is_file(), report
    result = json.loads((overlay / "vivado_result.json").read_text())
    assert result["wns_ns"] == 0.412 and result["whs_ns"] == 0.031 and result["timing_met"] is True
    assert result["wpws_ns"] == 2.75 and result["timing_summary_met"] is True
    assert result["impl_strategy"] == "Performance_ExtraTimingOpt" and result["timing_report"] == "gpt_fpga_timing.rpt"
    assert abs(result["fclk0_actual_mhz"] - 1000 / 7) < 1e-5 and result["vivado_version"] == "2022.1"
    assert result["fclk0_divisors"] == [7, 1] and result["io_pll_mhz"] == 1000
    assert result["ip"]["ps7"] == "xilinx.com:ip:processing_system7:5.5"


@needs_tclsh
def test_one_port_flow_under_a_vivado_stub(tmp_path):
    """PORTS=1: the 64-bit engine on HP0 alone; HP2 stays off and nothing is wired or mapped to it."""
    out = tmp_path / "overlay1"
    r = subprocess.run([sys.executable, "-m", "gpt_fpga.hw.bitstream", "--ports", "1", "--clock-mhz", "100",
                        "--out", str(out)], capture_output=True, text=True, env=env_without_vivado(), cwd=REPO,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    ident = json.loads((out / "gpt_fpga.json").read_text())
    assert (ident["engine"]["bus_bits"], ident["engine"]["ports"]) == (64, 1)
    assert [p["port"] for p in ident["ddr"]["ports"]] == ["S_AXI_HP0"]
    r, calls = run_fake(out, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ps7 = props(calls, "/ps7")
    assert ps7["CONFIG.PCW_USE_S_AXI_HP0"] == "1" and ps7["CONFIG.PCW_USE_S_AXI_HP2"] == "0"
    assert ps7["CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ"] == "100"
    intf = {tuple(c[1:]) for c in calls if c[0] == "connect_bd_intf_net"}
    assert ("/engine/m_axi", "/mem_interconnect/S00_AXI") in intf and not any("HP2" in " ".join(c) for c in intf)
    assert not [c for c in calls if c[0] == "create_bd_cell" and c[-1] == "mem1_interconnect"]
    assert not [c for c in calls if c[0] == "assign_bd_address" and "HP2" in c[-1]]
    assert [c[-1] for c in calls if c[0] == "exclude_bd_addr_seg"] == ["/ps7/S_AXI_HP0/HP0_HIGH_OCM"]
    assert interface_parameters(bs.make_engine("int8", 32, 1)).keys() == {"s_axi", "m_axi"}
    assert ["set_property", "strategy", "Vivado Implementation Defaults", "impl_1"] in calls  # 100 MHz
    assert interrupt_routes(calls, "/engine/interrupt", "/ps7/IRQ_F2P") == [["/axi_intc"]]


def test_bad_ports_are_one_line(tmp_path):
    rc = bs.main(["--ports", "3", "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


@needs_tclsh
@pytest.mark.parametrize("env, what", [
    (dict(FAKE_WNS="-0.123"), "WNS = -0.123"), (dict(FAKE_WHS="-0.01"), "WHS = -0.01"),
    (dict(FAKE_WPWS="-0.4"), "pulse width not met: WPWS = -0.4 ns"),
    (dict(FAKE_VERDICT="Timing constraints are not met."), "report_timing_summary does not say all timing "
                                                            "constraints are met"),
    (dict(FAKE_VERDICT="All user specified timing constraints are met. (2 inter-clock checks not met)"),
     "does not say all timing constraints are met")])
def test_timing_violations_fail_the_build_and_copy_no_bitstream(overlay, tmp_path, env, what):
    """Setup, hold, pulse width, and the summary's verdict: each alone stops the build."""
    (overlay / "gpt_fpga.bit").write_text("stale")
    r, calls = run_fake(overlay, tmp_path, **env)
    assert what in one_error(r) and "no bitstream copied" in one_error(r)
    assert not (overlay / "gpt_fpga.bit").exists() and not (overlay / "gpt_fpga.hwh").exists()
    assert (overlay / "gpt_fpga_timing.rpt").is_file(), "the timing report is kept for the diagnosis"
    assert json.loads((overlay / "vivado_result.json").read_text())["timing_met"] is False
    assert calls[-1] == ["exit", "1"]


@needs_tclsh
def test_latest_ip_version_is_taken(overlay, tmp_path):
    r, calls = run_fake(overlay, tmp_path, FAKE_EXTRA_IP="xilinx.com:ip:processing_system7:5.10")
    assert r.returncode == 0, r.stdout
    ps7 = calls[index(calls, lambda c: c[0] == "create_bd_cell" and c[-1] == "ps7")]
    assert ps7[ps7.index("-vlnv") + 1] == "xilinx.com:ip:processing_system7:5.10"  # 5.10 > 5.5 > 5.4


def one_error(r) -> str:
    """The build's single "ERROR: [gpt_fpga]" line (exit 1)."""
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERROR: [gpt_fpga]")]
    assert r.returncode == 1 and len(errors) == 1, r.stdout
    return errors[0]


@needs_tclsh
def test_tcl_refuses_a_clock_vivado_cannot_make(overlay, tmp_path):
    """A hand-edited params.tcl asking for 150 MHz: the dividers Vivado derives give 142.857 and the flow stops."""
    params = overlay / "params.tcl"
    params.write_text(params.read_text().replace("clock_mhz 142.857 ", "clock_mhz 150 "))
    r, calls = run_fake(overlay, tmp_path)
    assert "FCLK0: asked for 150 MHz, Vivado gives 142.857 MHz (IO PLL 1000 MHz / 7 / 1)" in one_error(r)
    assert "launch_runs" not in [c[0] for c in calls]


@needs_tclsh
@pytest.mark.parametrize("env, what", [
    (dict(FAKE_DIVISORS="7 2"), "FCLK0: asked for 142.857 MHz, Vivado gives 71.429 MHz (IO PLL 1000 MHz / 7 / 2)"),
    (dict(FAKE_INFER="m_axi MAX_BURST_LENGTH 256"),
     "Vivado inferred engine/m_axi differently from the X_INTERFACE_PARAMETER of gpt_fpga_engine.v: "
     "MAX_BURST_LENGTH 256 (the Verilog says 16)"),
    (dict(FAKE_INFER="s_axi PROTOCOL AXI4"), "engine/s_axi differently"),
    (dict(FAKE_INTC_KIND="0xFFFFFFFF"), "/axi_intc must have input 0 level-sensitive (not edge) for the engine's "
                                        "level interrupt: CONFIG.C_KIND_OF_INTR is '0xFFFFFFFF'"),
])
def test_what_vivado_derives_is_checked_before_synthesis(overlay, tmp_path, env, what):
    """Dividers that miss the clock, an interface inferred otherwise than the Verilog says, an edge-triggered
    controller input: one line naming both sides, and nothing is synthesized."""
    r, calls = run_fake(overlay, tmp_path, **env)
    assert what in one_error(r)
    assert "launch_runs" not in [c[0] for c in calls]


@needs_tclsh
def test_interface_check_catches_a_verilog_without_the_attributes(overlay, tmp_path):
    """A top Verilog whose X_INTERFACE_PARAMETER is gone (Vivado then infers defaults): the build stops."""
    v = overlay / "gpt_fpga_engine.v"
    v.write_text(re.sub(r'\(\* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME m_axi1,[^"]*" \*\)', "", v.read_text()))
    r, calls = run_fake(overlay, tmp_path)
    assert "Vivado inferred engine/m_axi1 differently" in one_error(r) and "PROTOCOL (unset)" in one_error(r)


@needs_tclsh
def test_unknown_strategy_is_refused_by_the_tcl(overlay, tmp_path):
    params = overlay / "params.tcl"
    params.write_text(params.read_text().replace("impl_strategy Performance_ExtraTimingOpt",
                                                 "impl_strategy Performance_Nonesuch"))
    r, calls = run_fake(overlay, tmp_path)
    line = one_error(r)
    assert "implementation strategy 'Performance_Nonesuch' is not one of this Vivado's" in line
    assert "Performance_ExtraTimingOpt" in line and not any(c[:2] == ["launch_runs", "impl_1"] for c in calls)


@pytest.mark.parametrize("name, clock, chosen", [("auto", 142.857, "Performance_ExtraTimingOpt"),
                                                 ("auto", 125, "Performance_ExtraTimingOpt"),
                                                 ("auto", 100, "Vivado Implementation Defaults"),
                                                 ("default", 200, "Vivado Implementation Defaults"),
                                                 ("Performance_Explore", 100, "Performance_Explore")])
def test_strategy_choice(name, clock, chosen):
    assert bs.impl_strategy(name, clock) == chosen


def test_bad_strategy_is_one_line(tmp_path, capsys):
    assert bs.main(["--strategy", "Perf{x}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "STRATEGY='Perf{x}' is not a strategy name" in err
    assert not (tmp_path / "o").exists()


@needs_tclsh
def test_the_python_entry_runs_vivado_and_records_its_result(no_vivado, tmp_path, monkeypatch, capsys):
    """`make bitstream` with a `vivado` on PATH (the stub behind a shell script): the command line, the
    outputs and gpt_fpga.json completed with Vivado's version, clock and slack; 142.857 MHz, int4."""
    import gpt_fpga.hw.synth as synth

    verilog = (no_vivado[1] / "gpt_fpga_engine.v").read_text()
    monkeypatch.setattr(synth, "engine_verilog", lambda weights, group: verilog)  # the int8 text; only ports matter
    fake = tmp_path / "fake_vivado.tcl"
    fake.write_text(FAKE_VIVADO)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vivado").write_text(f'#!/bin/sh\nexec "{TCLSH}" "{fake}" "$@"\n')
    (bindir / "vivado").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_VERSION", "2024.1")
    monkeypatch.setenv("FAKE_WNS", "0.137")
    out = tmp_path / "overlay"

    assert bs.main(["--weights", "int4", "--group", "32", "--clock-mhz", "142.857", "--out", str(out)]) == 0
    assert ", Performance_ExtraTimingOpt, WNS 0.137 ns, WPWS 2.75 ns; 0 critical warning(s)" in capsys.readouterr().out
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls[0] == ["vivado", "params.tcl"]  # argv as build.tcl sees it
    ident = json.loads((out / "gpt_fpga.json").read_text())
    assert ident["engine"]["weights"] == "int4" and ident["engine"]["group"] == 32
    assert ident["clock"]["divisor"] == 7 and abs(ident["clock"]["fclk0_mhz"] - 142.857143) < 1e-6
    assert ident["vivado"]["vivado_version"] == "2024.1" and ident["vivado"]["wns_ns"] == 0.137
    assert abs(ident["vivado"]["fclk0_actual_mhz"] - 142.857143) < 1e-6
    assert ident["vivado"]["impl_strategy"] == "Performance_ExtraTimingOpt"
    assert ident["vivado"]["critical_warnings"] == []  # no BD 41-1356: every HIGH_OCM is excluded
    assert ident["interrupt"] == {"controller": "axi_intc", "input": 0, "base": 0x4180_0000, "base_hex": "0x41800000",
                                  "range": 65536, "irq": "IRQ_F2P[0]", "pin": "engine/interrupt"}
    assert props(calls, "/ps7")["CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ"] == "142.857"
    assert (out / "gpt_fpga.bit").is_file() and (out / "gpt_fpga.hwh").is_file()

    # every CRITICAL WARNING of the runs' logs goes into the build report, once each
    warning = "[Constraints 18-5210] No constraints selected for write."
    monkeypatch.setenv("FAKE_CRITICAL", warning)
    assert bs.main(["--out", str(out), "--strategy", "default"]) == 0
    ident = json.loads((out / "gpt_fpga.json").read_text())
    assert ident["vivado"]["critical_warnings"] == [warning]
    assert ident["vivado"]["impl_strategy"] == "Vivado Implementation Defaults"
    assert "1 critical warning(s) (listed in the json)" in capsys.readouterr().out

    monkeypatch.setenv("FAKE_WNS", "-1.5")
    assert bs.main(["--out", str(out)]) == 1
    assert not (out / "gpt_fpga.bit").exists()
    assert json.loads((out / "gpt_fpga.json").read_text())["vivado"] is None
