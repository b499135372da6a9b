//! vmctl's output to a closed pipe (`vmctl status | head -1`): it ends as
//! a C tool does, by SIGPIPE, with nothing on stderr (no panic).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_vmctl_quietly() {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("-h")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("vmctl runs");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
