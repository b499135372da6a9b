//! Code shared by vmd and vmctl: the vm.conf parser, size and name rules,
//! disk formats and images, command-line option parsing, the message
//! protocol and the status table.

pub mod config;
pub mod ctl;
pub mod dhcp;
pub mod disk;
pub mod event;
pub mod getopt;
pub mod image;
pub mod imsg;
pub mod linkgroup;
pub mod local;
pub mod name;
pub mod net;
pub mod qcow2;
pub mod size;
pub mod stats;
pub mod status;
pub mod stream;
