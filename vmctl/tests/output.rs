//! vmctl's messages when it cannot write them: an error on a closed
//! stderr still ends vmctl with its exit status, not in a panic.

use std::process::{Command, Stdio};

#[test]
fn an_error_on_a_closed_stderr_still_exits_1() {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let status = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(["-s", "/nonexistent/vmd.sock", "status"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(write))
        .status()
        .expect("vmctl runs");
    // A panic would exit 101.
    assert_eq!(status.code(), Some(1), "{status:?}");
}
