//! `locked lladdr` as nftables rules: frames from a guest whose source
//! MAC is not its interface's are dropped (and counted) on the tap's
//! ingress, before they reach a bridge or the host's stack.
//!
//! Each daemon has a `netdev` table of its own, named after its state
//! file ([`nft_table_name`]; several vmd run side by side), with one
//! chain per locked tap:
//!
//! ```text
//! table netdev vmd_<hash> {
//!     chain lock-tap3 {
//!         type filter hook ingress device "tap3" priority -500; policy accept;
//!         ether saddr != fe:e1:ba:d0:00:01 counter drop
//!     }
//! }
//! ```
//!
//! On Linux >= 6.16 a netdev chain outlives its device and stays bound
//! to the name: a leftover `saddr != OLD` chain would cut off the next
//! VM whose tap gets that name. So a VM's chains are deleted when it
//! ends, before its tap's name can be used again, and the whole table
//! when vmd starts after a crash ([`NftOp::DropTable`]) and when it ends.
//! Deleting what is not there is no error: each deletion first adds the
//! object (a plain chain, an empty table), so the transaction never
//! meets ENOENT, on old kernels as on new ones.
//!
//! Rulesets are built as nft's JSON ([`nft_ruleset`], pure) and applied
//! by `nft -j -f` (reading its standard input) run by a forked helper
//! (helper.rs): the parent never waits for it. The helper's socket is
//! one more descriptor in the parent's loop, its deadline one more
//! timer, and its pid comes back from the loop's reaping; [`Nft`] runs one transaction at a time, in
//! the order they were asked for, and reports each as an [`NftDone`].

// Not called by Net yet (issue 19's building blocks): goes when it is.

use crate::parent::helper::{Helper, HelperError};
use common::ctl::CtlError;
use common::imsg::HelperAnswer;
use mio::{Registry, Token};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The nft program (Debian's `nftables` package).
pub const NFT_PROGRAM: &str = "/usr/sbin/nft";
/// How long one transaction may take (nft answers in milliseconds; this
/// bounds a hung program).
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of nft's error output is kept (its first lines say
/// what failed).
const NFT_STDERR_MAX: usize = 2048;
/// The chains' priority: before anything else on the tap's ingress.
const NFT_PRIORITY: i32 = -500;

/// One change to the daemon's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftOp {
    /// Frames on `tap`'s ingress whose source MAC is not `mac` are
    /// counted and dropped (the chain is made, or its rule replaced).
    Lock { tap: String, mac: [u8; 6] },
    /// `tap`'s chain is deleted (no error if there is none).
    Unlock { tap: String },
    /// The whole table, every chain in it, is deleted (no error if there
    /// is none): after a crash, before any VM starts, and when vmd ends.
    DropTable,
}

/// Names a transaction asked of [`Nft::submit`]; its [`NftDone`] carries
/// the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NftTicket(pub u64);

/// A transaction finished: applied whole, or not at all and why (one
/// line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftDone {
    pub ticket: NftTicket,
    pub result: Result<(), String>,
}

/// The table of the daemon whose state file is `state_path` (unique per
/// control socket, see state.rs): `vmd_` and a hash of the path, stable
/// across runs, so a vmd started after a crash finds its predecessor's.
pub fn nft_table_name(state_path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    // FNV-1a, as state.rs names long socket paths.
    let hash = state_path
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("vmd_{hash:016x}")
}

/// The chain of tap `tap`.
pub fn nft_chain_name(tap: &str) -> String {
    format!("lock-{tap}")
}

fn mac_text(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// The JSON transaction that applies `ops` to table `table` (`comment`
/// says whose it is, for someone reading `nft list ruleset`).
pub fn nft_ruleset(table: &str, comment: &str, ops: &[NftOp]) -> Value {
    let mut cmds = vec![json!({"add": {"table": {
        "family": "netdev", "name": table, "comment": comment
    }}})];
    for op in ops {
        match op {
            NftOp::Lock { tap, mac } => {
                let chain = nft_chain_name(tap);
                cmds.push(json!({"add": {"chain": {
                    "family": "netdev", "table": table, "name": chain,
                    "type": "filter", "hook": "ingress", "dev": tap,
                    "prio": NFT_PRIORITY, "policy": "accept"
                }}}));
                cmds.push(json!({"flush": {"chain": {
                    "family": "netdev", "table": table, "name": chain
                }}}));
                cmds.push(json!({"add": {"rule": {
                    "family": "netdev", "table": table, "chain": chain,
                    "expr": [
                        {"match": {
                            "op": "!=",
                            "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                            "right": mac_text(mac)
                        }},
                        {"counter": null},
                        {"drop": null}
                    ]
                }}}));
            }
            NftOp::Unlock { tap } => {
                // Added first (a plain chain if it is missing; nothing
                // changes if it is there), so the deletion cannot fail
                // with ENOENT; emptied, so it can be deleted.
                let chain =
                    json!({"family": "netdev", "table": table, "name": nft_chain_name(tap)});
                cmds.push(json!({"add": {"chain": chain}}));
                cmds.push(json!({"flush": {"chain": chain}}));
                cmds.push(json!({"delete": {"chain": chain}}));
            }
            NftOp::DropTable => {
                cmds.push(json!({"delete": {"table": {"family": "netdev", "name": table}}}));
            }
        }
    }
    json!({ "nftables": cmds })
}

/// Runs `program -j -f /proc/self/fd/0` with `input` on its standard input (in a
/// helper: this waits). Err: why, in one line, with the start of nft's
/// error output.
pub fn nft_run(program: &Path, input: &[u8]) -> Result<(), String> {
    let mut command = Command::new(program);
    command
        // `-f -` is /dev/stdin to nft, a link that a minimal /dev (a
        // devtmpfs alone) lacks; /proc's name for it is always there.
        .args(["-j", "-f", "/proc/self/fd/0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure makes one async-signal-safe call (prctl), so
    // it may run between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // SAFETY: prctl with integer arguments: nft dies with its
            // helper (killed at its deadline).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        format!(
            "cannot run {}: {e} (nft comes with Debian's nftables package)",
            program.display()
        )
    })?;
    // nft reads its whole input before it writes anything: no deadlock.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(input));
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = (&mut pipe)
            .take(NFT_STDERR_MAX as u64)
            .read_to_end(&mut stderr);
        // The rest is read and dropped, so nft never blocks on a full pipe.
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
    }
    let status = child
        .wait()
        .map_err(|e| format!("{}: cannot wait for it: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if status.success() {
        return Ok(());
    }
    let why = match (lines.is_empty(), written) {
        (false, _) => {
            let mut why = lines.join(" / ");
            if why.len() > NFT_STDERR_MAX {
                let mut end = NFT_STDERR_MAX;
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                why.truncate(end);
                why.push_str(" ...");
            }
            why
        }
        (true, Some(Err(e))) => format!("writing its input: {e}"),
        (true, _) => "no error message".to_string(),
    };
    Err(format!("{} failed ({status}): {why}", program.display()))
}

/// The transaction being applied.
struct Running {
    ticket: NftTicket,
    helper: Helper,
}

/// The daemon's nftables table: transactions queued and applied one at
/// a time by helpers, in order.
pub struct Nft {
    registry: Registry,
    token: Token,
    table: String,
    comment: String,
    program: PathBuf,
    timeout: Duration,
    queue: VecDeque<(NftTicket, Vec<NftOp>)>,
    running: Option<Running>,
    next_ticket: u64,
    /// Finished transactions not yet taken.
    done: Vec<NftDone>,
}

impl Nft {
    /// The table of the daemon whose state file is `state_path` and
    /// control socket `socket`; helpers' sockets are registered in
    /// `registry` (the parent loop's) under `token`.
    pub fn new(registry: Registry, token: Token, state_path: &Path, socket: &Path) -> Nft {
        Nft {
            registry,
            token,
            table: nft_table_name(state_path),
            comment: format!("vmd {}: locked lladdr", socket.display()),
            program: PathBuf::from(NFT_PROGRAM),
            timeout: NFT_TIMEOUT,
            queue: VecDeque::new(),
            running: None,
            next_ticket: 1,
            done: Vec::new(),
        }
    }

    #[cfg(test)]
    /// Another program than nft, another timeout (tests).
    pub fn with_program(mut self, program: &Path, timeout: Duration) -> Nft {
        self.program = program.to_path_buf();
        self.timeout = timeout;
        self
    }

    #[cfg(test)]
    pub fn token(&self) -> Token {
        self.token
    }

    #[cfg(test)]
    pub fn table(&self) -> &str {
        &self.table
    }

    #[cfg(test)]
    /// The running helper's pid.
    pub fn pid(&self) -> Option<Pid> {
        self.running.as_ref().map(|r| r.helper.pid())
    }

    /// Nothing queued or running, nothing to take.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_none() && self.done.is_empty()
    }

    /// Queues the transaction `ops` (applied whole or not at all); its
    /// outcome comes from [`Nft::take_done`] under the ticket returned.
    pub fn submit(&mut self, ops: Vec<NftOp>) -> NftTicket {
        let ticket = NftTicket(self.next_ticket);
        self.next_ticket += 1;
        self.queue.push_back((ticket, ops));
        self.run();
        ticket
    }

    /// The transactions that finished since the last call.
    pub fn take_done(&mut self) -> Vec<NftDone> {
        std::mem::take(&mut self.done)
    }

    /// The running helper's deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.running.as_ref().map(|r| r.helper.deadline())
    }

    /// Its socket is readable.
    pub fn handle_event(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        if let Some(outcome) = running.helper.read(&self.registry) {
            self.finish(outcome.map(|_| ()));
        }
    }

    /// The loop reaped `pid`: true if it was the running helper.
    pub fn reaped(&mut self, pid: Pid) -> bool {
        let Some(running) = self.running.as_mut() else {
            return false;
        };
        if running.helper.pid() != pid {
            return false;
        }
        let outcome = running.helper.reaped(&self.registry).map(|_| ());
        self.finish(outcome);
        true
    }

    /// A helper whose deadline passed is killed (the loop reaps it) and
    /// its transaction fails.
    pub fn tick(&mut self) {
        let Some(running) = self.running.as_mut() else {
            return;
        };
        if running.helper.deadline() <= Instant::now() {
            let e = running.helper.expire(&self.registry);
            self.finish(Err(e));
        }
    }

    fn finish(&mut self, outcome: Result<(), HelperError>) {
        let Some(running) = self.running.take() else {
            return;
        };
        let result = outcome.map_err(|e| match e {
            HelperError::Timeout { .. } => format!(
                "{} did not finish within {}s",
                self.program.display(),
                self.timeout.as_secs()
            ),
            other => other.to_string(),
        });
        self.done.push(NftDone {
            ticket: running.ticket,
            result: result.map_err(|e| format!("nftables table {}: {e}", self.table)),
        });
        self.run();
    }

    /// Starts the next transaction if none runs.
    fn run(&mut self) {
        while self.running.is_none() {
            let Some((ticket, ops)) = self.queue.pop_front() else {
                return;
            };
            let input = nft_ruleset(&self.table, &self.comment, &ops).to_string();
            let program = self.program.clone();
            let spawned = Helper::spawn(&self.registry, self.token, self.timeout, move || {
                let outcome = nft_run(&program, input.as_bytes())
                    .map(|()| HelperAnswer::Done)
                    .map_err(CtlError::Text);
                (Vec::new(), outcome)
            });
            match spawned {
                Ok(helper) => self.running = Some(Running { ticket, helper }),
                Err(e) => self.done.push(NftDone {
                    ticket,
                    result: Err(format!("nftables table {}: {e}", self.table)),
                }),
            }
        }
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        if let Some(running) = self.running.as_mut() {
            running.helper.cancel(&self.registry);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
