//! `vmctl -H [user@]host`: every command against another host, over
//! nothing but ssh.
//!
//! A command that only talks to vmd (status, stop ID, wait, pause,
//! unpause, reload, reset, log) speaks vmd's protocol to
//! `ssh HOST vmctl proxy`, which relays one connection to the remote
//! socket: vmd sees the ssh user as its peer, and the remote socket's
//! permissions apply unchanged. A command that names files, a terminal
//! or a stream (start, load, create, console, send, receive, stop -a)
//! runs as a whole on the remote host, `ssh HOST vmctl COMMAND ...`:
//! its paths are the remote host's, its console the remote pty, and a
//! descriptor (which cannot cross ssh) never has to.

use crate::console::write_all;
use crate::vms::fail;
use crate::Global;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, Shutdown, SockFlag, SockType};
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The ssh command, `$VMCTL_SSH` split at blanks (`ssh -F FILE -p 2222`)
/// or plain `ssh`.
pub const SSH_VARIABLE: &str = "VMCTL_SSH";

/// Where vmctl is run on the remote host: found on its PATH.
const REMOTE_VMCTL: &str = "vmctl";

/// The ssh command line up to the host: `$VMCTL_SSH` or `ssh`, then
/// `-e none` (`~.` is vmctl's console escape, not ssh's).
fn ssh_command(tty: bool) -> Command {
    let words: Vec<String> = std::env::var(SSH_VARIABLE)
        .ok()
        .map(|line| line.split_whitespace().map(String::from).collect())
        .filter(|words: &Vec<String>| !words.is_empty())
        .unwrap_or_else(|| vec!["ssh".into()]);
    let mut command = Command::new(&words[0]);
    command.args(&words[1..]);
    command.args(["-e", "none", if tty { "-t" } else { "-T" }]);
    command
}

/// `word` quoted for the remote user's shell, which reads ssh's command.
fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The remote vmctl's command line: its global options (the socket `-s`
/// named, which is the remote host's), then `words`.
fn remote_line(global: &Global, words: &[&str]) -> String {
    let mut line = vec![REMOTE_VMCTL.to_string()];
    line.extend(std::iter::repeat_n("-v".to_string(), global.verbose.into()));
    if let Some(socket) = &global.remote_socket {
        line.push("-s".into());
        line.push(shell_quote(socket));
    }
    line.extend(words.iter().map(|w| shell_quote(w)));
    line.join(" ")
}

/// The host `-H` names, refused when ssh would take it for an option.
fn checked_host(host: &str) -> Result<&str, String> {
    if host.is_empty() || host.starts_with('-') {
        Err(format!("invalid host: {host:?}"))
    } else {
        Ok(host)
    }
}

/// Runs `vmctl COMMAND ARGS` on the remote host with this terminal (a
/// tty for console and start, which may attach one) and exits as it did;
/// ssh's own failures exit 255, as ssh does.
pub fn run_whole(global: &Global, host: &str, name: &str, args: &[String]) -> ExitCode {
    let host = match checked_host(host) {
        Ok(host) => host,
        Err(e) => return fail(&e),
    };
    // The remote vmctl's output is ssh's pipe: it cannot see this one.
    if name == "send" {
        if let Some(refusal) = crate::send::stdout_refusal() {
            return fail(refusal);
        }
    }
    let tty = matches!(name, "console" | "start") && std::io::stdin().is_terminal();
    let mut words = vec![name];
    words.extend(args.iter().map(String::as_str));
    let mut command = ssh_command(tty);
    command.arg(host).arg("--").arg(remote_line(global, &words));
    match command.status() {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => fail(&format!("ssh to {host}: {status}")),
        },
        Err(e) => fail(&format!("cannot run ssh: {e}")),
    }
}

/// The connection `vmctl proxy` relays on the remote host: one end of a
/// socketpair that is ssh's standard input and output.
pub struct Tunnel {
    host: String,
    ssh: Child,
}

impl Tunnel {
    /// Starts `ssh HOST vmctl proxy` and returns the local end of the
    /// connection.
    pub fn open(global: &Global, host: &str) -> Result<(OwnedFd, Tunnel), String> {
        let host = checked_host(host)?;
        let (local, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let theirs_out = theirs.try_clone().map_err(|e| format!("dup: {e}"))?;
        let ssh = ssh_command(false)
            .arg(host)
            .arg("--")
            .arg(remote_line(global, &["proxy"]))
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::from(theirs_out))
            .spawn()
            .map_err(|e| format!("cannot run ssh: {e}"))?;
        let tunnel = Tunnel {
            host: host.to_string(),
            ssh,
        };
        Ok((local, tunnel))
    }

    /// Why the connection closed before vmd's answer: how ssh ended
    /// (it has printed its own reason), waited for a few seconds.
    pub fn closed(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.ssh.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break None,
            }
        };
        match status.and_then(|s| s.code()) {
            Some(255) => format!("ssh to {} failed (its message is above)", self.host),
            Some(code) => format!(
                "the connection to {} closed: `vmctl proxy` there exited {code}",
                self.host
            ),
            None => format!("the connection to {} closed", self.host),
        }
    }
}

impl Drop for Tunnel {
    /// vmctl has its answers: ssh may go.
    fn drop(&mut self) {
        let _ = self.ssh.kill();
        let _ = self.ssh.wait();
    }
}

/// `vmctl proxy` (hidden; what `-H` runs on the remote host): relays
/// standard input to the control socket and the socket to standard
/// output until either side closes.
pub fn proxy(socket_path: &Path) -> ExitCode {
    let sock = match crate::client::connect_socket(socket_path) {
        Ok(sock) => sock,
        Err(e) => return fail(&e),
    };
    match relay(std::io::stdin().as_fd(), std::io::stdout().as_fd(), &sock) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("proxy: {e}")),
    }
}

/// Copies `input` to `sock` and `sock` to `output` (blocking writes: each
/// side is one peer), half-closing the socket when `input` ends, until
/// vmd closes the connection.
fn relay(input: BorrowedFd, output: BorrowedFd, sock: &OwnedFd) -> Result<(), Errno> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut input_open = true;
    loop {
        let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        if input_open {
            fds.push(PollFd::new(input, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let ready = |fd: &PollFd| {
            fd.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            })
        };
        let sock_ready = ready(&fds[0]);
        let input_ready = input_open && ready(&fds[1]);
        if sock_ready {
            match read_retrying(sock.as_fd(), &mut buf)? {
                0 => return Ok(()),
                n => write_all(output, &buf[..n])?,
            }
        }
        if input_ready {
            match read_retrying(input, &mut buf)? {
                0 => {
                    input_open = false;
                    let _ = socket::shutdown(sock.as_raw_fd(), Shutdown::Write);
                }
                n => write_all(sock.as_fd(), &buf[..n])?,
            }
        }
    }
}

/// One read, retried when a signal interrupts it.
fn read_retrying(fd: BorrowedFd, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_the_remote_shell() {
        assert_eq!(shell_quote("web"), "web");
        assert_eq!(shell_quote("/var/lib/vmd/a.qcow2"), "/var/lib/vmd/a.qcow2");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
    }

    #[test]
    fn hosts_that_look_like_options_are_refused() {
        assert!(checked_host("-oProxyCommand=x").is_err());
        assert!(checked_host("").is_err());
        assert_eq!(checked_host("root@h"), Ok("root@h"));
    }
}
