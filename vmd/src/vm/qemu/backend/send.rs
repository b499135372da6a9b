//! `vmctl send` with QEMU (verified with QEMU 7.2): the facts the
//! stream's header pins (`query-version`, the versioned machine type
//! behind `pc` from `query-machines`), MIGRATION events on, `stop`, the
//! write end of a pipe handed over with `getfd` (SCM_RIGHTS on QMP),
//! `migrate fd:` into it; the VM process frames what it reads
//! ([`crate::vm::send`]). Once QEMU says the migration completed and the
//! pipe is drained, the stream's end goes out, and once vmctl says it
//! has written all of it ([`common::stream::ACK`]) QEMU is told to
//! `quit`. Any failure before that closes the pipe and the client,
//! cancels the migration, waits for QEMU to say it has ended and
//! resumes the guest (`cont`, unless it was paused before the send).

use super::{hand_pipe, PipeEnd, QemuBackend};
use crate::log::{log_debug, log_info, log_warn};
use crate::vm::backend::BackendEvent;
use crate::vm::console::write_all;
use crate::vm::qemu::{qmp_command_with_args, qmp_command_with_id};
use crate::vm::send::{Pumped, StreamOut};
use common::imsg::VmCommand;
use common::stream::StreamHeader;
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often a send under way tells the parent (its reply deadline
/// starts again with each note).
const NOTE_EVERY: Duration = Duration::from_secs(2);
/// QEMU's name for the pipe's write end.
const FD_NAME: &str = "vmd-send";
/// QEMU's migration bandwidth for a send, bytes a second (its own
/// default is 128 MiB/s): no limit but the reader's.
const MAX_BANDWIDTH: u64 = 1 << 40;
/// The QMP ids of a send's commands start with this.
pub const ID_PREFIX: &str = "send-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Asking QEMU's version and machine, turning MIGRATION events on.
    Facts,
    /// `stop` sent.
    Stopping,
    /// `getfd` sent.
    Handing,
    /// `migrate` sent: data flows.
    Migrating,
    /// The end of the stream is being written.
    Ending,
    /// The stream is written: waiting for vmctl to say it has written
    /// all of it out.
    Acking,
    /// Failed: waiting for QEMU to end the migration, then `cont`.
    Cancelling,
    /// `cont` sent after a failure.
    Resuming,
}

pub struct SendJob {
    command: VmCommand,
    step: Step,
    /// The guest was paused before (a failure leaves it so).
    was_paused: bool,
    /// `stop` succeeded (a failure resumes the guest).
    stopped: bool,
    header: StreamHeader,
    /// Facts still to come.
    facts_left: u8,
    client: Option<OwnedFd>,
    stream: Option<StreamOut>,
    /// QEMU's last MIGRATION status.
    migration: Option<String>,
    failure: Option<String>,
    next_note: Instant,
    started: Instant,
}

impl SendJob {
    pub fn next_note(&self) -> Instant {
        self.next_note
    }
}

impl QemuBackend {
    /// `vmctl send`: starts the conversation; `client` is the stream's
    /// way out.
    pub(super) fn send_start(&mut self, command: VmCommand, client: Option<OwnedFd>) {
        let VmCommand::Send { vm } = &command else {
            return;
        };
        let Some(client) = client else {
            return self.command_done(command, Some("no descriptor came with send".into()));
        };
        if self.sending.is_some() {
            return self.command_done(command, Some("a send of this vm is under way".into()));
        }
        let mut vm = (**vm).clone();
        for (file, size) in [
            (&mut vm.kernel, self.boot_sizes.kernel),
            (&mut vm.initrd, self.boot_sizes.initrd),
            (&mut vm.bios, self.boot_sizes.bios),
        ] {
            if let Some(file) = file {
                file.size = size.unwrap_or(0);
            }
        }
        let header = StreamHeader {
            backend: "qemu".into(),
            qemu_version: String::new(),
            machine: String::new(),
            cpu: if self.kvm { "host" } else { "qemu64" }.into(),
            accel: if self.kvm { "kvm" } else { "tcg" }.into(),
            vm,
        };
        let now = Instant::now();
        self.sending = Some(SendJob {
            command,
            step: Step::Facts,
            was_paused: self.paused,
            stopped: false,
            header,
            facts_left: 4,
            client: Some(client),
            stream: None,
            migration: None,
            failure: None,
            next_note: now + NOTE_EVERY,
            started: now,
        });
        let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
        // QEMU throttles a migration to 128 MiB/s unless told otherwise:
        // the guest is paused, so as fast as the reader takes it.
        let unthrottled = json!({"max-bandwidth": MAX_BANDWIDTH});
        self.send_qmp(&[
            qmp_command_with_id("query-version", "send-version"),
            qmp_command_with_id("query-machines", "send-machines"),
            qmp_command_with_args("migrate-set-capabilities", caps, "send-caps"),
            qmp_command_with_args("migrate-set-parameters", unthrottled, "send-params"),
        ]);
    }

    /// Writes QMP lines for the send; a failure to write fails it.
    fn send_qmp(&mut self, lines: &[String]) {
        if let Err(e) = self.qmp_write(lines) {
            self.send_failed(e);
        }
    }

    /// QEMU answered one of the send's commands (`id` without the
    /// prefix).
    pub(super) fn send_answer(&mut self, id: &str, error: Option<String>, value: Value) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        match (id, error) {
            ("cancel", _) | ("quit", _) => {}
            ("cont", error) => {
                let why = job.failure.take().unwrap_or_default();
                let why = match error {
                    None => format!("{why}; the vm runs again"),
                    Some(e) => format!("{why}; and the vm could not be resumed: {e}"),
                };
                self.send_done(Some(why));
            }
            (_, Some(e)) if job.failure.is_some() => log_debug!("QMP send-{id}: {e}"),
            (id, Some(e)) => self.send_failed(format!("QEMU refused {id}: {e}")),
            ("version", None) => {
                let q = &value["qemu"];
                job.header.qemu_version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
                self.send_fact();
            }
            ("machines", None) => match resolved_machine(&value) {
                Some(machine) => {
                    job.header.machine = machine;
                    self.send_fact();
                }
                None => self.send_failed("QEMU names no versioned machine type for pc".into()),
            },
            ("caps", None) | ("params", None) => self.send_fact(),
            ("stop", None) => {
                job.stopped = true;
                self.send_hand_pipe();
            }
            ("getfd", None) => {
                job.step = Step::Migrating;
                let uri = json!({"uri": format!("fd:{FD_NAME}")});
                self.send_qmp(&[qmp_command_with_args("migrate", uri, "send-migrate")]);
                self.note("sending");
            }
            ("migrate", None) => log_debug!("migration started"),
            (other, None) => log_warn!("QMP answer for unknown id send-{other}"),
        }
    }

    /// One fact more; with all of them, `stop`.
    fn send_fact(&mut self) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        job.facts_left -= 1;
        if job.facts_left == 0 && job.failure.is_none() {
            job.step = Step::Stopping;
            self.note("pausing");
            self.send_qmp(&[qmp_command_with_id("stop", "send-stop")]);
        }
    }

    /// The guest is stopped: the stream's header goes out, and the write
    /// end of a pipe to QEMU.
    fn send_hand_pipe(&mut self) {
        let (Some(job), Some(registry), Some(qmp)) = (
            self.sending.as_mut(),
            self.registry.as_ref(),
            self.qmp.as_ref(),
        ) else {
            return self.send_failed("QEMU is exiting".into());
        };
        let Some(client) = job.client.take() else {
            return;
        };
        let stream = StreamOut::new(client, &job.header, registry).and_then(|mut stream| {
            let read = hand_pipe(qmp.as_raw_fd(), PipeEnd::Write, FD_NAME, "send-getfd")?;
            stream.attach_pipe(read, registry)?;
            Ok(stream)
        });
        match stream {
            Ok(stream) => {
                job.step = Step::Handing;
                job.stream = Some(stream);
                self.send_pump();
            }
            Err(e) => self.send_failed(e),
        }
    }

    /// A MIGRATION event.
    pub(super) fn send_migration(&mut self, status: String) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        log_debug!("migration {status}");
        let ended = matches!(status.as_str(), "completed" | "failed" | "cancelled");
        job.migration = Some(status.clone());
        match (job.step, status.as_str()) {
            (Step::Cancelling, _) if ended => self.send_resume(),
            (Step::Migrating, "completed") => self.send_pump(),
            (Step::Migrating, "failed" | "cancelled") => {
                self.send_failed(format!("QEMU's migration {status} (see vmd's log)"))
            }
            _ => {}
        }
    }

    /// The pipe or the client is ready (or the migration completed):
    /// moves the stream on.
    pub(super) fn send_pump(&mut self) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        let Some(stream) = job.stream.as_mut() else {
            return;
        };
        let completed = job.migration.as_deref() == Some("completed");
        match stream.pump() {
            Err(e) => self.send_failed(e),
            Ok(Pumped::Working) => {}
            Ok(Pumped::PipeEnded) if completed => {
                stream.finish();
                job.step = Step::Ending;
                self.send_pump();
            }
            // QEMU closes the pipe before it says the migration ended.
            Ok(Pumped::PipeEnded) => {}
            Ok(Pumped::Whole) if job.step == Step::Acking => match stream.acknowledged() {
                None => {}
                Some(false) => self.send_failed("the reader did not take the whole stream".into()),
                Some(true) => {
                    let secs = job.started.elapsed().as_secs_f64();
                    log_info!(
                        "sent {} bytes of state ({} bytes of stream) in {secs:.1}s",
                        stream.bytes,
                        stream.sent
                    );
                    job.stream = None;
                    self.send_done(None);
                    // The guest lives on at the other end: QEMU goes.
                    self.send_qmp(&[qmp_command_with_id("quit", "send-quit")]);
                }
            },
            Ok(Pumped::Whole) => match stream.end_write() {
                Ok(()) => {
                    job.step = Step::Acking;
                    self.send_pump();
                }
                Err(e) => self.send_failed(e),
            },
        }
    }

    /// The send failed: the stream is cut (QEMU's writes fail), the
    /// migration cancelled, and once QEMU says it ended, the guest resumes.
    fn send_failed(&mut self, why: String) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        if job.failure.is_some() {
            return;
        }
        log_warn!("send: {why}");
        job.failure = Some(why);
        job.stream = None;
        job.client = None;
        let migrating = matches!(job.step, Step::Migrating | Step::Ending | Step::Acking);
        let ended = matches!(
            job.migration.as_deref(),
            Some("completed" | "failed" | "cancelled")
        );
        if migrating && !ended {
            job.step = Step::Cancelling;
            self.send_qmp(&[qmp_command_with_id("migrate_cancel", "send-cancel")]);
        } else {
            self.send_resume();
        }
    }

    /// After a failure: `cont` if the send stopped a running guest.
    fn send_resume(&mut self) {
        let Some(job) = self.sending.as_mut() else {
            return;
        };
        if job.stopped && !job.was_paused {
            job.step = Step::Resuming;
            let fd = self.qmp.as_ref().map(|fd| fd.as_raw_fd());
            let line = qmp_command_with_id("cont", "send-cont");
            if let Some(Ok(())) = fd.map(|fd| write_all(fd, line.as_bytes())) {
                return;
            }
        }
        let why = job.failure.take().unwrap_or_default();
        self.send_done(Some(why));
    }

    fn send_done(&mut self, error: Option<String>) {
        if let Some(job) = self.sending.take() {
            if error.is_none() {
                self.paused = true;
            }
            self.events.push(BackendEvent::CommandDone {
                command: job.command,
                error,
            });
        }
    }

    fn note(&mut self, phase: &str) {
        if let Some(job) = self.sending.as_mut() {
            let bytes = job.stream.as_ref().map_or(0, |s| s.sent);
            job.next_note = Instant::now() + NOTE_EVERY;
            self.events.push(BackendEvent::CommandProgress {
                command: job.command.clone(),
                note: format!("{phase}: {bytes} bytes"),
            });
        }
    }

    /// Every [`NOTE_EVERY`]: a note to the parent, and whether the client
    /// went away while nothing flowed.
    pub(super) fn send_timer(&mut self, now: Instant) {
        let Some(job) = self.sending.as_ref() else {
            return;
        };
        if now < job.next_note {
            return;
        }
        if job.stream.as_ref().is_some_and(|s| s.reader_gone()) {
            return self.send_failed("the reader went away".into());
        }
        let phase = match job.step {
            Step::Facts | Step::Stopping => "pausing",
            Step::Handing | Step::Migrating => "sending",
            Step::Ending | Step::Acking => "ending",
            Step::Cancelling | Step::Resuming => "resuming",
        };
        self.note(phase);
    }

    /// QEMU is gone in the middle of a send.
    pub(super) fn send_abandon(&mut self) {
        if let Some(job) = self.sending.as_mut() {
            let why = job
                .failure
                .take()
                .unwrap_or_else(|| "QEMU ended during the send".into());
            job.stream = None;
            self.send_done(Some(why));
        }
    }
}

/// The versioned machine type QEMU runs as `pc` (vmd passes no
/// `-machine`): the entry whose alias is `pc`, else the default one.
fn resolved_machine(machines: &Value) -> Option<String> {
    let list = machines.as_array()?;
    let named = |pick: &dyn Fn(&Value) -> bool| {
        list.iter()
            .find(|m| pick(m))
            .and_then(|m| m["name"].as_str())
            .map(str::to_string)
    };
    named(&|m| m["alias"] == "pc").or_else(|| named(&|m| m["is-default"] == true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_behind_pc_is_versioned() {
        let machines = json!([
            {"name": "pc-q35-7.2", "alias": "q35"},
            {"name": "pc-i440fx-7.2", "alias": "pc", "is-default": true},
            {"name": "pc-i440fx-7.1"},
        ]);
        assert_eq!(
            resolved_machine(&machines).as_deref(),
            Some("pc-i440fx-7.2")
        );
        let no_alias = json!([{"name": "x-1.0", "is-default": true}]);
        assert_eq!(resolved_machine(&no_alias).as_deref(), Some("x-1.0"));
        assert_eq!(resolved_machine(&json!({})), None);
    }
}
