//! Pausing vCPUs, as Firecracker does: the monitor asks ([`Pause::ask`])
//! and kicks each vCPU thread with [`KICK_SIGNAL`] ([`kick`]). The
//! signal's handler sets the thread's `kvm_run.immediate_exit`, so a
//! vCPU inside KVM_RUN leaves it (EINTR) and one about to enter it
//! returns at once, whichever comes first: no kick is lost between the
//! vCPU loop's look at the pause and KVM_RUN. The loop then parks
//! the thread on a condition variable ([`Pause::park_while_asked`]) until
//! the monitor asks it to go on; KVM keeps the vCPU's state, so it
//! resumes where it was (an I/O exit not yet completed is completed by
//! the next KVM_RUN).

use super::bus::lock;
use kvm_ioctls::VcpuFd;
use std::cell::Cell;
use std::sync::{Condvar, Mutex};

/// The signal that kicks a vCPU thread out of KVM_RUN: SIGRTMIN (34
/// with glibc, a constant for the monitor's filter, which allows tgkill
/// with this signal only), which nothing else in the VM process uses
/// (the test triggers take SIGRTMIN+1 to +4).
pub const KICK_SIGNAL: libc::c_int = 34;

fn kick_signal() -> libc::c_int {
    KICK_SIGNAL
}

thread_local! {
    /// This vCPU thread's `kvm_run.immediate_exit`, for the handler;
    /// null outside [`with_immediate_exit`].
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    let flag = IMMEDIATE_EXIT.with(|p| p.get());
    if !flag.is_null() {
        // SAFETY: set by this very thread to its vCPU's kvm_run mapping,
        // which lives until with_immediate_exit clears the pointer.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick's handler (process-wide; before the filters: it
/// takes rt_sigaction).
pub fn install_kick_handler() -> std::io::Result<()> {
    if libc::SIGRTMIN() != KICK_SIGNAL {
        return Err(std::io::Error::other(format!(
            "SIGRTMIN is {}, not {KICK_SIGNAL}",
            libc::SIGRTMIN()
        )));
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" one.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only writes through a thread-local pointer.
    if unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `run` with the kick's handler pointed at `vcpu`'s
/// `immediate_exit`, the kick signal unblocked in this thread.
pub fn with_immediate_exit<T>(vcpu: &mut VcpuFd, run: impl FnOnce(&mut VcpuFd) -> T) -> T {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(flag));
    // SAFETY: an empty set with the kick signal added, for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    let result = run(vcpu);
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    result
}

/// This thread's id, for [`kick`].
pub fn thread_id() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Sends the kick to thread `tid` of process `pid` (tgkill: the only
/// call the monitor's filter adds for it; pthread_kill would also block
/// signals and ask for the pid).
pub fn kick(pid: libc::pid_t, tid: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: tgkill takes plain integers; a gone thread is ESRCH.
    if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, kick_signal()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the monitor wants the vCPUs parked.
#[derive(Default)]
pub struct Pause {
    asked: Mutex<bool>,
    changed: Condvar,
}

impl Pause {
    /// The monitor: park (true) or go on (false).
    pub fn ask(&self, paused: bool) {
        *lock(&self.asked) = paused;
        self.changed.notify_all();
    }

    /// A vCPU thread between two KVM_RUNs: while a pause is asked, parked;
    /// `parked(true)` once it is, `parked(false)` when it goes on. Clears
    /// the kick's `immediate_exit`. True if it parked.
    pub fn park_while_asked(&self, vcpu: &mut VcpuFd, parked: &dyn Fn(bool)) -> bool {
        let mut asked = lock(&self.asked);
        if !*asked {
            return false;
        }
        vcpu.set_kvm_immediate_exit(0);
        parked(true);
        while *asked {
            asked = self
                .changed
                .wait(asked)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        // A kick that came after the look above: not for this pause.
        vcpu.set_kvm_immediate_exit(0);
        parked(false);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// The state machine without a guest: a parked thread stays parked
    /// until asked to go on, and says so both times.
    #[test]
    fn a_pause_parks_until_asked_to_go_on() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("vm");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        let pause = Arc::new(Pause::default());
        let parked = |_: bool| panic!("parked without a pause");
        assert!(!pause.park_while_asked(&mut vcpu, &parked));
        pause.ask(true);
        let events = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (pause, events) = (pause.clone(), events.clone());
            std::thread::spawn(move || {
                vcpu.set_kvm_immediate_exit(1);
                let report = |on: bool| {
                    events.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(on);
                };
                let did = pause.park_while_asked(&mut vcpu, &report);
                (did, vcpu.get_kvm_run().immediate_exit)
            })
        };
        let wait = Duration::from_secs(60);
        assert_eq!(rx.recv_timeout(wait), Ok(true));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(events.load(Ordering::SeqCst), 1, "still parked");
        pause.ask(false);
        assert_eq!(rx.recv_timeout(wait), Ok(false));
        assert_eq!(thread.join().expect("join"), (true, 0));
    }
}
