//! Network boot: what a machine gets from Kagami between power-on and the agent — iPXE
//! scripts chosen by the host's state, and the files they load.

pub mod dhcp;
pub mod ipxe;
pub mod ramdisk;
pub mod tftp;
