//! `vmctl receive` with QEMU: QEMU was started paused with `-incoming
//! defer` and the stream's versioned machine type ([`incoming_args`]);
//! the boot files' sizes were checked against the header
//! ([`check_boot_sizes`]). After the QMP handshake, instead of `cont`:
//! QEMU's version is checked against the header's, MIGRATION events
//! turned on, the read end of a pipe handed over with `getfd` and
//! `migrate-incoming fd:`; the VM process feeds the stream's data into
//! the pipe ([`crate::vm::receive`]). Once the stream's hash checks out
//! and QEMU says the migration completed, the disks are locked (retried
//! for a while: on the same host the sender holds them until its stream
//! is written) and only then `cont` lets the guest run. Any failure kills
//! QEMU: the start fails with the reason and vmd releases everything.

use super::{hand_pipe, PipeEnd, QemuBackend};
use crate::log::{log_debug, log_info, log_warn};
use crate::vm::backend::BackendEvent;
use crate::vm::qemu::{qmp_command, qmp_command_with_args, qmp_command_with_id, start_reason};
use crate::vm::receive::{Fed, StreamIn};
use common::stream::{StreamFile, StreamHeader};
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// QEMU's name for the pipe's read end.
const FD_NAME: &str = "vmd-recv";
/// The QMP ids of a receive's commands start with this.
pub const ID_PREFIX: &str = "recv-";
/// How long the disks' locks are tried once the stream is whole.
const LOCK_WAIT: Duration = Duration::from_secs(20);
const LOCK_RETRY: Duration = Duration::from_millis(100);
/// How often a receive under way tells the parent (a slow stream, over
/// ssh say, may take longer than a start's deadline).
const NOTE_EVERY: Duration = Duration::from_secs(2);

pub struct RecvJob {
    header: StreamHeader,
    stream: StreamIn,
    /// Each disk layer's descriptor (a copy) and whether it is writable:
    /// locked as the parent locks any VM's disks, once the stream is whole.
    disks: Vec<(OwnedFd, bool, String)>,
    started: bool,
    whole: bool,
    completed: bool,
    /// Locking the disks until then.
    lock_until: Option<Instant>,
    next_try: Option<Instant>,
    began: Instant,
    /// The next note to the parent (its start's deadline starts again),
    /// and the bytes at the last: a stream that stalls gets none.
    next_note: Instant,
    noted: u64,
}

impl RecvJob {
    pub fn new(header: StreamHeader, stream: StreamIn, disks: Vec<(OwnedFd, bool)>) -> RecvJob {
        let paths: Vec<String> = header.vm.disks.iter().map(|d| d.path.clone()).collect();
        let disks = disks
            .into_iter()
            .enumerate()
            .map(|(i, (fd, w))| (fd, w, paths.get(i).cloned().unwrap_or_default()))
            .collect();
        RecvJob {
            header,
            stream,
            disks,
            started: false,
            whole: false,
            completed: false,
            lock_until: None,
            next_try: None,
            began: Instant::now(),
            next_note: Instant::now() + NOTE_EVERY,
            noted: 0,
        }
    }

    pub fn timer(&self) -> Option<Instant> {
        Some(
            self.next_try
                .map_or(self.next_note, |at| at.min(self.next_note)),
        )
    }

    pub fn header(&self) -> &StreamHeader {
        &self.header
    }
}

/// QEMU's extra arguments for a VM started from a stream with `header`.
pub fn incoming_args(header: &StreamHeader) -> Vec<String> {
    ["-machine", &header.machine, "-incoming", "defer"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The boot files QEMU got must be the sizes the stream's header names
/// (their ROMs are in the guest's state).
pub fn check_boot_sizes(
    header: &StreamHeader,
    got: [(&'static str, Option<u64>); 3],
) -> Result<(), String> {
    let want: [&Option<StreamFile>; 3] = [&header.vm.kernel, &header.vm.initrd, &header.vm.bios];
    for ((what, size), file) in got.into_iter().zip(want) {
        match (size, file) {
            (Some(size), Some(file)) if size != file.size => {
                return Err(format!(
                    "the {what} {} is {size} bytes, the sender's was {}",
                    file.path, file.size
                ))
            }
            (None, Some(file)) => return Err(format!("no {what} {} here", file.path)),
            (Some(_), None) => return Err(format!("the stream's vm had no {what}")),
            _ => {}
        }
    }
    Ok(())
}

impl QemuBackend {
    /// QMP is ready: the receive starts where `cont` would have gone.
    /// False when this is no receive (send `cont`).
    pub(super) fn recv_begin(&mut self) -> bool {
        let Some(job) = self.receiving.as_mut() else {
            return false;
        };
        if job.started {
            return false;
        }
        job.started = true;
        let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
        self.recv_qmp(&[
            qmp_command_with_id("query-version", "recv-version"),
            qmp_command_with_args("migrate-set-capabilities", caps, "recv-caps"),
        ]);
        true
    }

    fn recv_qmp(&mut self, lines: &[String]) {
        if let Err(e) = self.qmp_write(lines) {
            self.recv_failed(e);
        }
    }

    pub(super) fn recv_answer(&mut self, id: &str, error: Option<String>, value: Value) {
        let Some(job) = self.receiving.as_mut() else {
            return;
        };
        match (id, error) {
            (id, Some(e)) => self.recv_failed(format!("QEMU refused {id}: {e}")),
            ("version", None) => {
                let q = &value["qemu"];
                let here = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
                if here != job.header.qemu_version {
                    let why = format!(
                        "the stream is from QEMU {}, this host runs QEMU {here}",
                        job.header.qemu_version
                    );
                    self.recv_failed(why);
                }
            }
            ("caps", None) => self.recv_hand_pipe(),
            ("getfd", None) => {
                let uri = json!({"uri": format!("fd:{FD_NAME}")});
                self.recv_qmp(&[qmp_command_with_args(
                    "migrate-incoming",
                    uri,
                    "recv-migrate",
                )]);
            }
            ("migrate", None) => self.recv_pump(),
            (other, None) => log_warn!("QMP answer for unknown id recv-{other}"),
        }
    }

    /// A pipe to QEMU: its read end with `getfd`.
    fn recv_hand_pipe(&mut self) {
        let (Some(job), Some(registry), Some(qmp)) = (
            self.receiving.as_mut(),
            self.registry.as_ref(),
            self.qmp.as_ref(),
        ) else {
            return;
        };
        let handed = hand_pipe(qmp.as_raw_fd(), PipeEnd::Read, FD_NAME, "recv-getfd")
            .and_then(|write| job.stream.attach_pipe(write, registry));
        if let Err(e) = handed {
            self.recv_failed(e);
        }
    }

    /// The stream or the pipe is ready: moves the stream on.
    pub(super) fn recv_pump(&mut self) {
        let Some(job) = self.receiving.as_mut() else {
            return;
        };
        match job.stream.pump() {
            Err(e) => self.recv_failed(e),
            Ok(Fed::Working) => {}
            Ok(Fed::Whole) if !job.whole => {
                job.whole = true;
                log_debug!("the stream is whole: {} bytes of state", job.stream.bytes);
                self.recv_finish();
            }
            Ok(Fed::Whole) => {}
        }
    }

    /// A MIGRATION event.
    pub(super) fn recv_migration(&mut self, status: String) {
        let Some(job) = self.receiving.as_mut() else {
            return;
        };
        log_debug!("incoming migration {status}");
        match status.as_str() {
            "completed" => {
                job.completed = true;
                self.recv_finish();
            }
            "failed" | "cancelled" => self.recv_failed(format!(
                "QEMU could not load the stream ({status}); see vmd's log"
            )),
            _ => {}
        }
    }

    /// With the stream whole and the migration completed: the disks'
    /// locks, then `cont`.
    fn recv_finish(&mut self) {
        let Some(job) = self.receiving.as_mut() else {
            return;
        };
        if !(job.whole && job.completed) {
            return;
        }
        let now = Instant::now();
        let until = *job.lock_until.get_or_insert(now + LOCK_WAIT);
        match lock_disks(&job.disks) {
            Ok(()) => {
                let secs = job.began.elapsed().as_secs_f64();
                log_info!("received {} bytes of state in {secs:.1}s", job.stream.bytes);
                self.receiving = None;
                self.recv_qmp(&[qmp_command("cont")]);
            }
            Err((path, true)) if now < until => {
                log_debug!("disk {path} still in use; trying again");
                job.next_try = Some(now + LOCK_RETRY);
            }
            Err((path, _)) => self.recv_failed(format!("disk {path} is in use")),
        }
    }

    pub(super) fn recv_timer(&mut self, now: Instant) {
        if let Some(job) = self.receiving.as_mut() {
            if now >= job.next_note {
                job.next_note = now + NOTE_EVERY;
                if job.stream.bytes > job.noted {
                    job.noted = job.stream.bytes;
                    let note = format!("receiving: {} bytes", job.stream.bytes);
                    self.events.push(BackendEvent::StartProgress { note });
                }
            }
        }
        if let Some(job) = self.receiving.as_mut() {
            if job.next_try.is_some_and(|at| now >= at) {
                job.next_try = None;
                self.recv_finish();
            }
        }
    }

    /// The receive failed: QEMU is killed, and the start fails with why.
    fn recv_failed(&mut self, why: String) {
        if self.receiving.take().is_none() {
            return;
        }
        log_warn!("receive: {why}");
        self.start_error.get_or_insert(start_reason(&why));
        let _ = nix::sys::signal::kill(self.qemu, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Locks every disk layer as the parent does for any start (exclusive if
/// writable, shared if not), or which one failed and whether it is only
/// in use (worth another try).
fn lock_disks(disks: &[(OwnedFd, bool, String)]) -> Result<(), (String, bool)> {
    for (fd, writable, path) in disks {
        let op = if *writable {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let busy = nix::errno::Errno::last() == nix::errno::Errno::EWOULDBLOCK;
            return Err((path.clone(), busy));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::stream::StreamVm;

    #[test]
    fn boot_files_must_be_the_senders_sizes() {
        let file = |size| {
            Some(StreamFile {
                path: "/boot/k".into(),
                size,
            })
        };
        let header = StreamHeader {
            backend: "qemu".into(),
            qemu_version: "7.2.0".into(),
            machine: "pc-i440fx-7.2".into(),
            cpu: "qemu64".into(),
            accel: "tcg".into(),
            vm: StreamVm {
                kernel: file(10),
                ..StreamVm::default()
            },
        };
        let got = |k| [("kernel", k), ("initrd", None), ("BIOS", None)];
        assert_eq!(check_boot_sizes(&header, got(Some(10))), Ok(()));
        assert_eq!(
            check_boot_sizes(&header, got(Some(11))),
            Err("the kernel /boot/k is 11 bytes, the sender's was 10".into())
        );
        assert!(check_boot_sizes(&header, got(None)).is_err());
        assert_eq!(
            incoming_args(&header),
            ["-machine", "pc-i440fx-7.2", "-incoming", "defer"]
        );
    }
}
