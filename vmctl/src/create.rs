//! `vmctl create`: make raw and qcow2 disk images without the daemon.

use crate::Global;
use std::process::ExitCode;

pub const USAGE: &str = "disk [-b base | -i disk] [-s size]";

pub fn run(_: &Global, _: &[String]) -> ExitCode {
    eprintln!("vmctl: create is not built yet");
    ExitCode::FAILURE
}
