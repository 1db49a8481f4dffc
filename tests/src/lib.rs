//! Kagami's end-to-end tests live in `tests/tests/`: virtual machines (QEMU with TCG) boot from
//! the network against a real `kagami serve` and its agent ramdisk, as a rack's machines do.
//! `scripts/lab-setup` installs the lab (QEMU, iPXE ROMs, busybox, a Debian kernel).
