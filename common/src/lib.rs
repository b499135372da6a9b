//! Code shared by vmd and vmctl: the vm.conf parser, size and name rules,
//! disk formats, command-line option parsing and the message protocol.

pub mod config;
pub mod disk;
pub mod getopt;
pub mod imsg;
pub mod name;
pub mod size;
