# gpt-fpga: processing_system7 settings for the PYNQ-Z2, without board files.
#
# Sourced by build.tcl (and by tests/test_bitstream.py under a stub of Vivado). Plain Tcl 8.6: this
# file only defines procs.
#
# The DDR, PLL, bank-voltage and MIO values are those of Xilinx/PYNQ boards/Pynq-Z2/base/base.tcl
# (the base overlay's processing_system7 dict): DDR3, 16-bit bus, 4096 Mbit x16 device, 525 MHz
# (DDR3_1066F), the board's trace delays, and the PS peripherals the PYNQ image uses (QSPI, UART0,
# ENET0, USB0, SD0). Only user parameters are set; Vivado derives the divisors and the ACT_* values.
# At run time PYNQ reprograms only the FCLK settings from the .hwh: DDR and MIO come from the SD
# image's boot loader, so these values only keep the .hwh (and any boot image made from this
# project) true to the board.
#
# Then the ports this overlay needs: M_AXI_GP0 (registers), S_AXI_HP0 at 64 bits (the engine's DDR
# traffic) and, for the two-port engine, S_AXI_HP2 at 64 bits (its second read port), IRQ_F2P (the
# engine's interrupt) and FCLK0 at the engine clock from the IO PLL.

namespace eval gpt_fpga {}

# The IO PLL runs at 1000 MHz on the PYNQ-Z2 (50 MHz crystal x 20), so FCLK0 is 1000 / n MHz.
proc gpt_fpga::io_pll_mhz {} { return 1000.0 }

# processing_system7 DDR settings (base.tcl).
proc gpt_fpga::pynq_z2_ddr {} {
    return [list \
        CONFIG.PCW_UIPARAM_DDR_ENABLE {1} \
        CONFIG.PCW_UIPARAM_DDR_MEMORY_TYPE {DDR 3} \
        CONFIG.PCW_UIPARAM_DDR_PARTNO {Custom} \
        CONFIG.PCW_UIPARAM_DDR_BUS_WIDTH {16 Bit} \
        CONFIG.PCW_UIPARAM_DDR_DRAM_WIDTH {16 Bits} \
        CONFIG.PCW_UIPARAM_DDR_DEVICE_CAPACITY {4096 MBits} \
        CONFIG.PCW_UIPARAM_DDR_SPEED_BIN {DDR3_1066F} \
        CONFIG.PCW_UIPARAM_DDR_FREQ_MHZ {525} \
        CONFIG.PCW_UIPARAM_DDR_ECC {Disabled} \
        CONFIG.PCW_UIPARAM_DDR_HIGH_TEMP {Normal (0-85)} \
        CONFIG.PCW_UIPARAM_DDR_ADV_ENABLE {0} \
        CONFIG.PCW_UIPARAM_DDR_AL {0} \
        CONFIG.PCW_UIPARAM_DDR_BL {8} \
        CONFIG.PCW_UIPARAM_DDR_BANK_ADDR_COUNT {3} \
        CONFIG.PCW_UIPARAM_DDR_ROW_ADDR_COUNT {15} \
        CONFIG.PCW_UIPARAM_DDR_COL_ADDR_COUNT {10} \
        CONFIG.PCW_UIPARAM_DDR_CL {7} \
        CONFIG.PCW_UIPARAM_DDR_CWL {6} \
        CONFIG.PCW_UIPARAM_DDR_T_RCD {13.125} \
        CONFIG.PCW_UIPARAM_DDR_T_RP {13.125} \
        CONFIG.PCW_UIPARAM_DDR_T_RC {50.625} \
        CONFIG.PCW_UIPARAM_DDR_T_RAS_MIN {35.0} \
        CONFIG.PCW_UIPARAM_DDR_T_FAW {40.0} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_STOP_EN {0} \
        CONFIG.PCW_UIPARAM_DDR_USE_INTERNAL_VREF {0} \
        CONFIG.PCW_UIPARAM_DDR_TRAIN_WRITE_LEVEL {1} \
        CONFIG.PCW_UIPARAM_DDR_TRAIN_READ_GATE {1} \
        CONFIG.PCW_UIPARAM_DDR_TRAIN_DATA_EYE {1} \
        CONFIG.PCW_UIPARAM_DDR_BOARD_DELAY0 {0.223} \
        CONFIG.PCW_UIPARAM_DDR_BOARD_DELAY1 {0.212} \
        CONFIG.PCW_UIPARAM_DDR_BOARD_DELAY2 {0.085} \
        CONFIG.PCW_UIPARAM_DDR_BOARD_DELAY3 {0.092} \
        CONFIG.PCW_UIPARAM_DDR_DQS_TO_CLK_DELAY_0 {0.040} \
        CONFIG.PCW_UIPARAM_DDR_DQS_TO_CLK_DELAY_1 {0.058} \
        CONFIG.PCW_UIPARAM_DDR_DQS_TO_CLK_DELAY_2 {0.000} \
        CONFIG.PCW_UIPARAM_DDR_DQS_TO_CLK_DELAY_3 {0.000} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_0_LENGTH_MM {25.8} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_0_PACKAGE_LENGTH {80.4535} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_0_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_1_LENGTH_MM {25.8} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_1_PACKAGE_LENGTH {80.4535} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_1_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_2_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_2_PACKAGE_LENGTH {80.4535} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_2_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_3_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_3_PACKAGE_LENGTH {80.4535} \
        CONFIG.PCW_UIPARAM_DDR_CLOCK_3_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQS_0_LENGTH_MM {15.6} \
        CONFIG.PCW_UIPARAM_DDR_DQS_0_PACKAGE_LENGTH {105.056} \
        CONFIG.PCW_UIPARAM_DDR_DQS_0_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQS_1_LENGTH_MM {18.8} \
        CONFIG.PCW_UIPARAM_DDR_DQS_1_PACKAGE_LENGTH {66.904} \
        CONFIG.PCW_UIPARAM_DDR_DQS_1_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQS_2_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_DQS_2_PACKAGE_LENGTH {89.1715} \
        CONFIG.PCW_UIPARAM_DDR_DQS_2_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQS_3_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_DQS_3_PACKAGE_LENGTH {113.63} \
        CONFIG.PCW_UIPARAM_DDR_DQS_3_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQ_0_LENGTH_MM {16.5} \
        CONFIG.PCW_UIPARAM_DDR_DQ_0_PACKAGE_LENGTH {98.503} \
        CONFIG.PCW_UIPARAM_DDR_DQ_0_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQ_1_LENGTH_MM {18} \
        CONFIG.PCW_UIPARAM_DDR_DQ_1_PACKAGE_LENGTH {68.5855} \
        CONFIG.PCW_UIPARAM_DDR_DQ_1_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQ_2_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_DQ_2_PACKAGE_LENGTH {90.295} \
        CONFIG.PCW_UIPARAM_DDR_DQ_2_PROPOGATION_DELAY {160} \
        CONFIG.PCW_UIPARAM_DDR_DQ_3_LENGTH_MM {0} \
        CONFIG.PCW_UIPARAM_DDR_DQ_3_PACKAGE_LENGTH {103.977} \
        CONFIG.PCW_UIPARAM_DDR_DQ_3_PROPOGATION_DELAY {160} \
    ]
}

# Clocks, bank voltages and the PS peripherals of the PYNQ image (base.tcl).
proc gpt_fpga::pynq_z2_board {} {
    return [list \
        CONFIG.PCW_CRYSTAL_PERIPHERAL_FREQMHZ {50} \
        CONFIG.PCW_APU_PERIPHERAL_FREQMHZ {650} \
        CONFIG.PCW_APU_CLK_RATIO_ENABLE {6:2:1} \
        CONFIG.PCW_PRESET_BANK0_VOLTAGE {LVCMOS 3.3V} \
        CONFIG.PCW_PRESET_BANK1_VOLTAGE {LVCMOS 1.8V} \
        CONFIG.PCW_QSPI_PERIPHERAL_ENABLE {1} \
        CONFIG.PCW_QSPI_GRP_SINGLE_SS_ENABLE {1} \
        CONFIG.PCW_QSPI_GRP_FBCLK_ENABLE {1} \
        CONFIG.PCW_QSPI_PERIPHERAL_FREQMHZ {200} \
        CONFIG.PCW_UART0_PERIPHERAL_ENABLE {1} \
        CONFIG.PCW_UART0_UART0_IO {MIO 14 .. 15} \
        CONFIG.PCW_UART0_BAUD_RATE {115200} \
        CONFIG.PCW_UART_PERIPHERAL_FREQMHZ {100} \
        CONFIG.PCW_ENET0_PERIPHERAL_ENABLE {1} \
        CONFIG.PCW_ENET0_ENET0_IO {MIO 16 .. 27} \
        CONFIG.PCW_ENET0_GRP_MDIO_ENABLE {1} \
        CONFIG.PCW_ENET0_GRP_MDIO_IO {MIO 52 .. 53} \
        CONFIG.PCW_ENET0_PERIPHERAL_FREQMHZ {1000 Mbps} \
        CONFIG.PCW_USB0_PERIPHERAL_ENABLE {1} \
        CONFIG.PCW_USB0_USB0_IO {MIO 28 .. 39} \
        CONFIG.PCW_USB0_RESET_ENABLE {0} \
        CONFIG.PCW_SD0_PERIPHERAL_ENABLE {1} \
        CONFIG.PCW_SD0_SD0_IO {MIO 40 .. 45} \
        CONFIG.PCW_SD0_GRP_CD_ENABLE {1} \
        CONFIG.PCW_SD0_GRP_CD_IO {MIO 47} \
        CONFIG.PCW_SDIO_PERIPHERAL_FREQMHZ {50} \
    ]
}

# The overlay's own PS ports: GP0 master, HP0 slave (64-bit) and with two ports HP2 (64-bit),
# fabric interrupt, FCLK0 + its reset.
proc gpt_fpga::overlay_ports {fclk0_mhz {ports 1}} {
    set hp2 [expr {$ports == 2 ? 1 : 0}]
    return [list \
        CONFIG.PCW_USE_M_AXI_GP0 {1} \
        CONFIG.PCW_USE_M_AXI_GP1 {0} \
        CONFIG.PCW_USE_S_AXI_HP0 {1} \
        CONFIG.PCW_S_AXI_HP0_DATA_WIDTH {64} \
        CONFIG.PCW_USE_S_AXI_HP2 $hp2 \
        CONFIG.PCW_S_AXI_HP2_DATA_WIDTH {64} \
        CONFIG.PCW_USE_FABRIC_INTERRUPT {1} \
        CONFIG.PCW_IRQ_F2P_INTR {1} \
        CONFIG.PCW_EN_CLK0_PORT {1} \
        CONFIG.PCW_EN_RST0_PORT {1} \
        CONFIG.PCW_FPGA_FCLK0_ENABLE {1} \
        CONFIG.PCW_FCLK_CLK0_BUF {TRUE} \
        CONFIG.PCW_FCLK0_PERIPHERAL_CLKSRC {IO PLL} \
        CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $fclk0_mhz \
    ]
}

# Everything, as one `set_property -dict` list (DDR and board first, then the overlay's ports).
proc gpt_fpga::pynq_z2_ps7_config {fclk0_mhz {ports 1}} {
    return [concat [gpt_fpga::pynq_z2_ddr] [gpt_fpga::pynq_z2_board] [gpt_fpga::overlay_ports $fclk0_mhz $ports]]
}
