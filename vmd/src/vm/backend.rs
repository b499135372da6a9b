//! The seam between the VM process and what runs the guest.
//!
//! The VM process (mod.rs) receives the start sequence, lets a backend
//! prepare as root (QEMU: spawned paused under the VM's uid; next, our own
//! /dev/kvm monitor: the VM created, memory mapped, the kernel loaded),
//! drops its own privileges with the filter the backend asks for on top
//! of the VM process's, then resumes the backend and runs one mio loop:
//! the parent's channel and the console relay ([`super::console`]) are its
//! own, the backend's descriptors are registered with tokens from
//! [`FIRST_BACKEND_TOKEN`] on. The backend answers the parent's commands
//! and tells what happened as [`BackendEvent`]s; when it has ended the
//! loop asks it how ([`Ended`]) and reports that to the parent.

use crate::seccomp::RoleFilter;
use common::imsg::VmCommand;
use mio::{Registry, Token};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

/// Tokens below this are the VM process's own (parent, console).
pub const FIRST_BACKEND_TOKEN: usize = 16;

/// What a backend tells the VM process, which tells the parent.
#[derive(Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// The guest runs; `pids` are the processes that run it.
    Running { pids: Vec<u32> },
    /// The guest powered off or reset (`reason` as the backend names it).
    Shutdown { reason: String },
    /// A start from a stream is under way (`note`: how far).
    StartProgress { note: String },
    /// A long command is under way (`note`: how far).
    CommandProgress { command: VmCommand, note: String },
    /// A command from the parent is done (or refused, with why).
    CommandDone {
        command: VmCommand,
        error: Option<String>,
    },
    /// The answer to [`Backend::query_disks`]: each disk's counters, in
    /// disk order.
    Disks(Vec<common::stats::DiskStats>),
}

/// How a backend ended.
#[derive(Debug)]
pub struct Ended {
    /// It ended cleanly (the VM process exits 0).
    pub clean: bool,
    /// How, for the parent's log (`VmGuestEnded`).
    pub why: String,
    /// The guest never ran: why its start failed.
    pub start_failed: Option<String>,
}

/// The threads of a VM process, each with its own filter. Our monitor
/// (issue 24) adds one role per vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// The loop: parent, console relay, the backend's descriptors.
    Main,
}

/// What runs a guest inside the VM process.
pub trait Backend {
    /// The system calls a thread of `role` makes for this backend; for
    /// [`ThreadRole::Main`] on top of [`crate::seccomp::CHILD_SYSCALLS`]
    /// and [`super::VM_SYSCALLS`].
    fn thread_filter(&self, role: ThreadRole) -> RoleFilter;

    /// After the drop: lets the guest run. Registers the backend's
    /// descriptors with `registry` under its tokens.
    fn resume(&mut self, registry: &Registry) -> std::io::Result<()>;

    /// Before the drop: the loop's registry (a clone), for descriptors
    /// a command brings later (`vmctl send`'s). Backends without such
    /// commands need not keep it.
    fn keep_registry(&mut self, _registry: Registry) {}

    /// One of the backend's tokens is ready.
    fn on_ready(&mut self, token: Token, buf: &mut [u8]);

    /// A command from the parent, with the client's descriptor when it
    /// [`takes_fd`](VmCommand::takes_fd) (the VM process checked); its
    /// answer comes as [`BackendEvent::CommandDone`], after any number of
    /// [`BackendEvent::CommandProgress`].
    fn command(&mut self, command: VmCommand, fd: Option<OwnedFd>);

    /// Asks for the disks' counters (`vmctl stats`); they come as
    /// [`BackendEvent::Disks`], one answer per query, in order. False:
    /// none will come (the VM process answers without disks).
    fn query_disks(&mut self) -> bool {
        false
    }

    /// What happened since the last call.
    fn take_events(&mut self) -> Vec<BackendEvent>;

    /// When the backend wants [`Backend::on_timer`] called (None: never).
    fn timer(&self) -> Option<Instant>;

    fn on_timer(&mut self, now: Instant);

    /// The guest has ended (or is ending): the loop stops and calls
    /// [`Backend::finish`].
    fn has_ended(&self) -> bool;

    /// Stops the guest now (the loop cannot go on).
    fn kill(&mut self);

    /// Collects what is left and says how the backend ended. `wait_until`
    /// waits for events until a deadline (false once it has passed).
    fn finish(&mut self, wait_until: &mut dyn FnMut(Instant) -> bool) -> Ended;
}

/// [`VmCommand::Probe`], the same for every backend: `steps` progress
/// notes, then `text` written to the client's descriptor.
pub fn probe(command: &VmCommand, text: &str, steps: u8, fd: Option<OwnedFd>) -> Vec<BackendEvent> {
    let mut events: Vec<BackendEvent> = (1..=steps)
        .map(|step| BackendEvent::CommandProgress {
            command: command.clone(),
            note: format!("step {step} of {steps}"),
        })
        .collect();
    let error = match fd {
        None => Some("no descriptor came with the probe".to_string()),
        // Never blocks the loop: the parent made the descriptor
        // non-blocking, and what does not fit now is an error.
        Some(fd) => super::console::write_all(fd.as_raw_fd(), text.as_bytes())
            .err()
            .map(|e| format!("writing to the client's descriptor: {e}")),
    };
    events.push(BackendEvent::CommandDone {
        command: command.clone(),
        error,
    });
    events
}
