"""toolchain: the machine and the compile around a build (probe, toolchain checks, jobs, memory gate,
compiler cache, ninja, progress, jobserver, interrupts)."""
