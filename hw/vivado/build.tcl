# gpt-fpga: the PYNQ-Z2 overlay (bitstream + .hwh) in Vivado batch mode.
#
#   cd build/overlay && vivado -mode batch -nojournal -log vivado.log -source build.tcl -tclargs params.tcl
#
# `python -m gpt_fpga.hw.bitstream` (make bitstream) writes params.tcl next to a copy of this file,
# with the engine's Verilog and pynq_z2_ps7.tcl. Relative paths in params.tcl are relative to its
# folder, so that folder can be copied to any Vivado machine as it is.
#
# Steps
#   1. project for the part in params.tcl (xc7z020clg400-1), the engine's Verilog added;
#   2. block design: processing_system7 configured for the PYNQ-Z2 by hand (no board files,
#      pynq_z2_ps7.tcl); the engine as a module reference; AXI interconnect GP0 -> engine registers
#      (AXI3 -> AXI4-Lite) and each engine DDR master -> its own interconnect -> an HP port (AXI4 ->
#      AXI3: the HP ports are AXI3, the interconnect's protocol converter translates; the engine
#      never issues more than 16 beats, so no burst is split): m_axi -> HP0, and with two ports
#      m_axi1 -> HP2 (HP0/HP1 share one DDR-controller port and HP2/HP3 another, so HP0 + HP2 reach
#      two); proc_sys_reset on FCLK0 driving every aresetn; interrupt -> IRQ_F2P;
#   3. address map: registers at reg_base on GP0; HPn_DDR_LOWOCM over all 512 MB for each engine
#      master; every mapping read back and checked; validate_bd_design;
#   4. synthesis and implementation to write_bitstream; utilization and timing reports;
#   5. WNS (and WHS) from the worst timing path: negative slack fails the build, and no .bit is
#      copied; otherwise the .bit and the .hwh are copied next to each other with one basename.
#
# Vivado 2022.1 (PYNQ 3.0 images) and 2024.1 (PYNQ 3.1) both run it: nothing here comes from
# write_bd_tcl, and every IP's version is looked up with get_ipdefs (the latest one is taken).
# Any failure prints one "ERROR: [gpt_fpga] ..." line and exits 1. Tcl 8.5 is enough (no lmap, no try).

namespace eval ::gpt_fpga {
    variable P [dict create]
    variable base [pwd]
}

proc ::gpt_fpga::log {msg} { puts "INFO: \[gpt_fpga\] $msg" }

proc ::gpt_fpga::param {name} {
    variable P
    if {![dict exists $P $name]} { error "params.tcl has no '$name' (re-run make bitstream)" }
    return [dict get $P $name]
}

# A path named in params.tcl, relative to params.tcl's folder.
proc ::gpt_fpga::path {name} {
    variable base
    return [file normalize [file join $base [param $name]]]
}

# "64K", "512M", "0x20000000", "65536" -> bytes.
proc ::gpt_fpga::to_bytes {value} {
    set v [string trim $value]
    if {[regexp -nocase {^([0-9]+)\s*([KMG])$} $v -> n unit]} {
        return [expr {wide($n) << [dict get {K 10 M 20 G 30} [string toupper $unit]]}]
    }
    if {[string is wideinteger -strict $v]} { return [expr {wide($v)}] }
    error "not a size or address: '$value'"
}

# The one object of a list, or an error naming what was looked for.
proc ::gpt_fpga::one {objects what} {
    if {[llength $objects] != 1} {
        error "expected one $what, found [llength $objects]: $objects"
    }
    return [lindex $objects 0]
}

proc ::gpt_fpga::pin {name} { return [one [get_bd_pins -quiet $name] "pin $name"] }
proc ::gpt_fpga::intf {name} { return [one [get_bd_intf_pins -quiet $name] "interface $name"] }
proc ::gpt_fpga::pins {names} {
    set out {}
    foreach name $names { lappend out [pin $name] }
    return $out
}

# Version strings: "5.5" < "5.10"; anything package vcompare refuses falls back to string order.
proc ::gpt_fpga::newer {a b} {
    if {[catch {package vcompare $a $b} c]} { set c [string compare $a $b] }
    return [expr {$c > 0}]
}

# FINN-style lookup: the IP catalog's latest version of vendor:library:name, usable in IP integrator.
proc ::gpt_fpga::latest_vlnv {pattern} {
    set best ""
    foreach def [get_ipdefs -all $pattern -filter {DESIGN_TOOL_CONTEXTS =~ *IPI*}] {
        set vlnv [get_property VLNV $def]
        if {$best eq "" || [newer [lindex [split $vlnv :] 3] [lindex [split $best :] 3]]} { set best $vlnv }
    }
    if {$best eq ""} { error "no IP matches $pattern in this Vivado's IP catalog" }
    return $best
}

proc ::gpt_fpga::json_str {s} {
    return "\"[string map {\\ \\\\ \" \\\" \n \\n \r \\r \t \\t} $s]\""
}

proc ::gpt_fpga::json_num {x} {
    if {[string is double -strict $x]} { return $x }
    return null
}

# A run finished every step it was asked for, or the build stops naming its log.
proc ::gpt_fpga::check_run {name} {
    set run [get_runs $name]
    set progress [get_property PROGRESS $run]
    set status [get_property STATUS $run]
    if {$progress ne "100%" || [string match -nocase "*error*" $status] || [string match -nocase "*fail*" $status]} {
        error "$name did not complete ($status, $progress); see [get_property DIRECTORY $run]/runme.log"
    }
    log "$name: $status"
}

# The address segment mapped at `offset` with `range` bytes in address space `space`, or an error.
proc ::gpt_fpga::check_mapped {space offset range what} {
    foreach seg [get_bd_addr_segs -of_objects $space] {
        set o [get_property OFFSET $seg]
        set r [get_property RANGE $seg]
        if {$o ne "" && $r ne "" && [to_bytes $o] == $offset && [to_bytes $r] == $range} {
            log [format "%s: %s at 0x%08X, %d bytes" $what $seg $offset $range]
            return $seg
        }
    }
    set found {}
    foreach seg [get_bd_addr_segs -of_objects $space] {
        lappend found "$seg (OFFSET [get_property OFFSET $seg], RANGE [get_property RANGE $seg])"
    }
    error [format "%s is not mapped at 0x%08X with %d bytes in %s; found: %s" $what $offset $range $space \
        [expr {$found eq "" ? "nothing" : [join $found {, }]}]]
}

proc ::gpt_fpga::check_version {} {
    set v [version -short]
    set major_minor [join [lrange [split $v .] 0 1] .]
    if {$major_minor ni {2022.1 2024.1}} {
        log "WARNING: Vivado $v: this flow targets 2022.1 (PYNQ 3.0 images) and 2024.1 (PYNQ 3.1); \
             the board's PYNQ must read this Vivado's .hwh"
    }
    return $v
}

proc ::gpt_fpga::main {argv} {
    variable P
    variable base
    if {[llength $argv] != 1} {
        error "usage: vivado -mode batch -source build.tcl -tclargs params.tcl"
    }
    set params [file normalize [lindex $argv 0]]
    if {![file exists $params]} { error "no params file $params (make bitstream writes it)" }
    set base [file dirname $params]
    set ::gpt_fpga::params [dict create]
    uplevel #0 [list source $params]
    set P $::gpt_fpga::params

    set out_dir $base
    set out [param out_name]
    set bd [param bd_name]
    set proj [param project_name]
    set proj_dir [path project_dir]
    set cell [param engine_cell]
    set clock [param clock_mhz]
    set reg_base [to_bytes [param reg_base]]
    set reg_range [to_bytes [param reg_range]]
    set ddr_base [to_bytes [param ddr_base]]
    set ddr_range [to_bytes [param ddr_range]]
    set ports [param ports]
    if {$ports ni {1 2}} { error "params.tcl: ports must be 1 or 2, got '$ports'" }
    # engine DDR master -> (interconnect, PS7 HP port): port 0 reads and writes, port 1 only reads
    set ddr_ports [list m_axi [list mem_interconnect S_AXI_HP0 HP0]]
    if {$ports == 2} { lappend ddr_ports m_axi1 [list mem1_interconnect S_AXI_HP2 HP2] }

    # A failed or interrupted build must never leave an older bitstream next to new inputs.
    foreach f [list $out.bit $out.hwh vivado_result.json] { file delete -force [file join $out_dir $f] }

    set vivado [check_version]
    log "Vivado $vivado, part [param part], FCLK0 $clock MHz, engine [param engine_desc], $ports DDR port(s)"
    uplevel #0 [list source [path ps7_config]]

    # 1. project and sources
    create_project -force $proj $proj_dir -part [param part]
    set_property target_language Verilog [current_project]
    add_files -norecurse [path verilog]
    update_compile_order -fileset sources_1

    # 2. block design
    create_bd_design $bd
    set vlnv [dict create]
    foreach {key pattern} {
        ps7 xilinx.com:ip:processing_system7:*
        reset xilinx.com:ip:proc_sys_reset:*
        interconnect xilinx.com:ip:axi_interconnect:*
    } {
        dict set vlnv $key [latest_vlnv $pattern]
        log "IP $key: [dict get $vlnv $key]"
    }

    set ps7 [create_bd_cell -type ip -vlnv [dict get $vlnv ps7] ps7]
    set_property -dict [::gpt_fpga::pynq_z2_ps7_config $clock $ports] $ps7
    set fclk0 [get_property CONFIG.PCW_ACT_FPGA0_PERIPHERAL_FREQMHZ $ps7]
    if {![string is double -strict $fclk0] || abs($fclk0 - $clock) > 0.01} {
        error "FCLK0 came out at '$fclk0' MHz, not $clock MHz (the IO PLL gives 1000 MHz / n)"
    }
    log "FCLK0: $fclk0 MHz"
    make_bd_intf_pins_external [intf ps7/DDR] [intf ps7/FIXED_IO]

    # The engine: a module reference to the Verilog top (interfaces inferred from s_axi_*, m_axi_*,
    # aclk, aresetn, interrupt and the X_INTERFACE_* attributes of hw/top.py).
    set engine [create_bd_cell -type module -reference [param top] $cell]
    # What each of the engine's DDR masters issues, so the interconnect sizes its AXI4 -> AXI3
    # conversion: bursts of at most 16 beats (never split), this many outstanding. Vivado's defaults
    # are only slower (a burst splitter), so a Vivado that refuses these properties gets a warning.
    foreach {master _} $ddr_ports {
        if {[catch {
            set_property -dict [list \
                CONFIG.MAX_BURST_LENGTH [param m_axi_max_burst] \
                CONFIG.NUM_READ_OUTSTANDING [param m_axi_read_outstanding] \
                CONFIG.NUM_WRITE_OUTSTANDING [param m_axi_write_outstanding] \
                CONFIG.SUPPORTS_NARROW_BURST {0} \
            ] [intf $cell/$master]
        } msg]} {
            log "WARNING: could not annotate $cell/$master ($msg); the interconnect will assume 256-beat bursts"
        }
    }

    set reset [create_bd_cell -type ip -vlnv [dict get $vlnv reset] rst_fclk0]
    set ctrl_ic [create_bd_cell -type ip -vlnv [dict get $vlnv interconnect] ctrl_interconnect]
    set_property -dict [list CONFIG.NUM_SI {1} CONFIG.NUM_MI {1}] $ctrl_ic
    foreach {master port} $ddr_ports {
        set mem_ic [create_bd_cell -type ip -vlnv [dict get $vlnv interconnect] [lindex $port 0]]
        set_property -dict [list CONFIG.NUM_SI {1} CONFIG.NUM_MI {1} \
            CONFIG.S00_HAS_REGSLICE {1} CONFIG.M00_HAS_REGSLICE {1}] $mem_ic
    }

    # registers: PS GP0 (AXI3 master) -> interconnect -> engine s_axi (AXI4-Lite)
    connect_bd_intf_net [intf ps7/M_AXI_GP0] [intf ctrl_interconnect/S00_AXI]
    connect_bd_intf_net [intf ctrl_interconnect/M00_AXI] [intf $cell/s_axi]
    # DDR: each engine master (AXI4, 64-bit) -> its interconnect (protocol converter) -> its PS HP
    # port (AXI3, 64-bit)
    set ics [list ctrl_interconnect]
    set clocked [list ps7/M_AXI_GP0_ACLK $cell/aclk rst_fclk0/slowest_sync_clk]
    foreach {master port} $ddr_ports {
        lassign $port ic hp
        connect_bd_intf_net [intf $cell/$master] [intf $ic/S00_AXI]
        connect_bd_intf_net [intf $ic/M00_AXI] [intf ps7/$hp]
        lappend ics $ic
        lappend clocked ps7/${hp}_ACLK
    }

    # one clock: FCLK0
    set peripheral_resets [list $cell/aresetn]
    set interconnect_resets {}
    foreach ic $ics {
        lappend clocked $ic/ACLK $ic/S00_ACLK $ic/M00_ACLK
        lappend peripheral_resets $ic/S00_ARESETN $ic/M00_ARESETN
        lappend interconnect_resets $ic/ARESETN
    }
    connect_bd_net {*}[pins [concat ps7/FCLK_CLK0 $clocked]]
    # resets: FCLK_RESET0_N -> proc_sys_reset -> active-low resets, synchronous to FCLK0
    connect_bd_net {*}[pins {ps7/FCLK_RESET0_N rst_fclk0/ext_reset_in}]
    connect_bd_net {*}[pins [concat rst_fclk0/peripheral_aresetn $peripheral_resets]]
    connect_bd_net {*}[pins [concat rst_fclk0/interconnect_aresetn $interconnect_resets]]
    # interrupt: level, active high, straight to IRQ_F2P[0] (the only line; PYNQ needs no axi_intc)
    connect_bd_net [pin $cell/interrupt] [pin ps7/IRQ_F2P]

    # 3. address map
    set ps_space [one [get_bd_addr_spaces ps7/Data] "PS address space ps7/Data"]
    set reg_seg [one [get_bd_addr_segs $cell/s_axi/*] "register segment of $cell/s_axi"]
    assign_bd_address -offset [param reg_base] -range [param reg_range] -target_address_space $ps_space $reg_seg
    check_mapped $ps_space $reg_base $reg_range "engine registers"
    foreach {master port} $ddr_ports {
        lassign $port ic hp prefix
        set m_space [one [get_bd_addr_spaces $cell/$master] "address space $cell/$master"]
        set name ps7/$hp/${prefix}_DDR_LOWOCM
        set ddr_seg [one [get_bd_addr_segs $name] "segment $name"]
        assign_bd_address -offset [param ddr_base] -range [param ddr_range] -target_address_space $m_space $ddr_seg
        check_mapped $m_space $ddr_base $ddr_range "DDR for the engine's $master (${prefix}_DDR_LOWOCM)"
    }

    validate_bd_design
    save_bd_design

    # 4. synthesis and implementation
    set bd_file [one [get_files $bd.bd] "block design file $bd.bd"]
    generate_target all $bd_file
    set wrapper [make_wrapper -files $bd_file -top]
    add_files -norecurse $wrapper
    set_property top ${bd}_wrapper [current_fileset]
    update_compile_order -fileset sources_1

    set jobs [param jobs]
    launch_runs synth_1 -jobs $jobs
    wait_on_run synth_1
    check_run synth_1
    launch_runs impl_1 -to_step write_bitstream -jobs $jobs
    wait_on_run impl_1
    check_run impl_1
    open_run impl_1

    set util [file join $out_dir ${out}_utilization.rpt]
    set timing [file join $out_dir ${out}_timing.rpt]
    report_utilization -file $util
    report_utilization -hierarchical -file [file join $out_dir ${out}_utilization_hier.rpt]
    report_timing_summary -max_paths 10 -report_unconstrained -file $timing

    # 5. timing: the worst setup and hold paths over every clock
    set setup [get_timing_paths -delay_type max -max_paths 1 -nworst 1]
    set hold [get_timing_paths -delay_type min -max_paths 1 -nworst 1]
    if {$setup eq "" || $hold eq ""} {
        error "no constrained timing path (is FCLK0 constrained?); see $timing"
    }
    set wns [get_property SLACK $setup]
    set whs [get_property SLACK $hold]
    set met [expr {[string is double -strict $wns] && [string is double -strict $whs] && $wns >= 0 && $whs >= 0}]

    set f [open [file join $out_dir vivado_result.json] w]
    puts $f "{"
    puts $f "  \"vivado_version\": [json_str $vivado],"
    puts $f "  \"part\": [json_str [param part]],"
    puts $f "  \"fclk0_requested_mhz\": [json_num $clock],"
    puts $f "  \"fclk0_actual_mhz\": [json_num $fclk0],"
    puts $f "  \"wns_ns\": [json_num $wns],"
    puts $f "  \"whs_ns\": [json_num $whs],"
    puts $f "  \"timing_met\": [expr {$met ? "true" : "false"}],"
    set ip {}
    dict for {k v} $vlnv { lappend ip "[json_str $k]: [json_str $v]" }
    puts $f "  \"ip\": {[join $ip {, }]}"
    puts $f "}"
    close $f

    if {![string is double -strict $wns] || $wns < 0} {
        error "timing not met at FCLK0 = $clock MHz: WNS = $wns ns (setup; worst paths in $timing);\
               no bitstream copied. Lower CLOCK_MHZ (100, 125, 142.857, 166.67, 200)"
    }
    if {![string is double -strict $whs] || $whs < 0} {
        error "hold timing not met: WHS = $whs ns (worst paths in $timing); no bitstream copied"
    }
    log "timing met at $clock MHz: WNS $wns ns, WHS $whs ns"

    # 6. outputs: <out>.bit and <out>.hwh side by side (pynq.Overlay finds the .hwh by basename)
    set bits [glob -nocomplain -directory [file join $proj_dir $proj.runs impl_1] *.bit]
    set bit [one $bits "bitstream in $proj.runs/impl_1"]
    set hwh [file join $proj_dir $proj.gen sources_1 bd $bd hw_handoff $bd.hwh]
    if {![file exists $hwh]} {
        # Vivado before 2020.2 kept the hand-off files under .srcs
        set hwh [file join $proj_dir $proj.srcs sources_1 bd $bd hw_handoff $bd.hwh]
    }
    if {![file exists $hwh]} { error "no hardware handoff $bd.hwh under $proj_dir" }
    file copy -force $bit [file join $out_dir $out.bit]
    file copy -force $hwh [file join $out_dir $out.hwh]
    log "wrote [file join $out_dir $out.bit] and [file join $out_dir $out.hwh]; reports: $util, $timing"
}

if {[catch {::gpt_fpga::main $argv} ::gpt_fpga::failure]} {
    puts "ERROR: \[gpt_fpga\] $::gpt_fpga::failure"
    exit 1
}
