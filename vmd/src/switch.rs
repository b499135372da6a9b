//! The switch process: network services for local interfaces (the
//! BOOTP/DHCP server, on packet sockets the parent will hand over).
//!
//! Starts from a fresh exec (no inherited filter), drops to _vmd in the
//! empty chroot and adds no calls of its own to
//! [`seccomp::CHILD_SYSCALLS`]. For now it only waits for its parent.

use crate::log::{log_debug, log_warn};
use crate::proc;
use common::imsg::{Message, Role};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

const PARENT: Token = Token(0);
#[cfg(feature = "test-triggers")]
const TRIGGER: Token = Token(2);

pub fn switch_main(verbosity: u8) -> ExitCode {
    let mut start = match proc::child_start(Role::Switch, verbosity) {
        Ok(start) => start,
        Err(e) => {
            eprintln!("vmd: switch: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(feature = "test-triggers")]
    let trigger = crate::trigger::Trigger::setup();
    let mut poll = match Poll::new() {
        Ok(poll) => poll,
        Err(e) => {
            log_warn!("cannot create the event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let registered = poll.registry().register(
        &mut SourceFd(&start.channel.sock.as_raw_fd()),
        PARENT,
        Interest::READABLE,
    );
    #[cfg(feature = "test-triggers")]
    let registered = registered.and_then(|()| trigger.register(poll.registry(), TRIGGER));
    if let Err(e) = registered {
        log_warn!("cannot register with the event loop: {e}");
        return ExitCode::FAILURE;
    }

    if let Err(e) = proc::child_drop_to_vmd(Role::Switch, &start, &[]) {
        log_warn!("{e}");
        return ExitCode::FAILURE;
    }
    log_debug!("running");

    let mut events = Events::with_capacity(16);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            log_warn!("event loop: {e}");
            return ExitCode::FAILURE;
        }
        for event in events.iter() {
            match event.token() {
                PARENT => {
                    for frame in proc::child_receive(&mut start.channel) {
                        switch_dispatch_parent(frame.message);
                    }
                }
                #[cfg(feature = "test-triggers")]
                TRIGGER => trigger.fire("switch"),
                _ => {}
            }
        }
    }
}

fn switch_dispatch_parent(message: Message) {
    log_warn!(
        "unexpected message {} from the parent",
        message.type_code().1
    );
}
