//! Seccomp filters for the children: an allow-list per role (each role's
//! module lists its system calls, each with the reason it needs it) on top
//! of the calls every child's loop makes ([`CHILD_SYSCALLS`]).
//!
//! Anything else traps (SECCOMP_RET_TRAP): the SIGSYS handler sends the
//! refused call's number and name to the parent as a `RefusedSyscall`
//! message and the child dies of SIGSYS, which the parent logs. A silent
//! RET_KILL would leave nothing a user can read.

use common::imsg::{self, Message};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use thiserror::Error;

/// A system call a role may make, and why.
pub type Allowed = (i64, &'static str);

/// A system call a role may make only when argument `arg` is one of
/// `values` (compared as 64-bit values), and why.
pub struct ArgRule {
    pub nr: i64,
    pub arg: u8,
    pub values: &'static [u64],
    pub why: &'static str,
}

/// A system call allowed when every `(argument, value)` of `args`
/// matches, with values known only at run time (a descriptor the thread
/// was given); several rules for one call are alternatives. Values that
/// fit in 32 bits are compared as 32-bit values (descriptors are ints).
pub struct MatchRule {
    pub nr: i64,
    pub args: Vec<(u8, u64)>,
    pub why: &'static str,
}

/// What one thread role may call: calls with any arguments, and calls
/// restricted by their arguments. Each role's lists live in its module.
#[derive(Clone, Copy)]
pub struct RoleFilter {
    pub syscalls: &'static [Allowed],
    pub with_args: &'static [ArgRule],
}

/// What every child's main loop does: wait for events, talk to the parent,
/// allocate memory, exit.
pub const CHILD_SYSCALLS: &[Allowed] = &[
    (libc::SYS_epoll_wait, "mio waits for events (older libc)"),
    (libc::SYS_epoll_pwait, "mio waits for events"),
    (
        libc::SYS_recvmsg,
        "read frames and passed fds from the parent",
    ),
    (
        libc::SYS_sendmsg,
        "send frames (log lines, replies) to the parent",
    ),
    (
        libc::SYS_close,
        "close received descriptors and finished connections",
    ),
    (libc::SYS_mmap, "memory allocator: large blocks"),
    (libc::SYS_munmap, "memory allocator: release large blocks"),
    (libc::SYS_mremap, "memory allocator: grow large blocks"),
    (libc::SYS_brk, "memory allocator: heap"),
    (libc::SYS_madvise, "memory allocator: return freed pages"),
    (libc::SYS_getpid, "stamp frames with our pid"),
    (
        libc::SYS_clock_gettime,
        "read the clock (timers, rate limits) where the vDSO cannot (hpet, acpi_pm clock sources)",
    ),
    (
        libc::SYS_exit_group,
        "exit when the parent closes the socket",
    ),
    (libc::SYS_exit, "exit (thread)"),
    (
        libc::SYS_restart_syscall,
        "resume an interrupted wait after SIGSTOP/SIGCONT (ptrace, job control)",
    ),
    (
        libc::SYS_sigaltstack,
        "exit: the runtime's thread-local destructors disable the signal stack",
    ),
];

/// The system call the SIGSYS handler makes to die: it is in no allow-list,
/// and with SIGSYS blocked inside the handler the kernel delivers the
/// second SIGSYS with its default action (terminate). The arguments are
/// invalid, so it could do nothing even if it ran.
const DEATH_SYSCALL: i64 = libc::SYS_reboot;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("seccomp: unsupported architecture {0}")]
    Arch(String),
    #[error("seccomp: cannot build the filter: {0}")]
    Build(String),
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(nix::errno::Errno),
}

/// Compiles a filter allowing `lists` and trapping everything else.
pub fn compile(lists: &[&[Allowed]]) -> Result<BpfProgram, SeccompError> {
    compile_with_args(lists, &[])
}

/// Compiles a filter allowing `lists` with any arguments, `arg_rules`
/// only with their argument values, and trapping everything else. A call
/// may not be in both (the unrestricted rule would win).
pub fn compile_with_args(
    lists: &[&[Allowed]],
    arg_rules: &[&[ArgRule]],
) -> Result<BpfProgram, SeccompError> {
    compile_matching(lists, arg_rules, &[])
}

/// [`compile_with_args`], and calls allowed by [`MatchRule`]s.
pub fn compile_matching(
    lists: &[&[Allowed]],
    arg_rules: &[&[ArgRule]],
    matches: &[MatchRule],
) -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH.to_string()))?;
    let mut rules = BTreeMap::new();
    for (nr, _why) in lists.iter().flat_map(|list| list.iter()) {
        if *nr == DEATH_SYSCALL {
            return Err(SeccompError::Build(
                "the SIGSYS handler's reboot call must stay refused".into(),
            ));
        }
        rules.insert(*nr, Vec::new());
    }
    let mut restricted: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in arg_rules.iter().flat_map(|list| list.iter()) {
        if rules.contains_key(&rule.nr) || rule.nr == DEATH_SYSCALL {
            return Err(SeccompError::Build(format!(
                "system call {} ({}) is both restricted by its arguments and allowed with any",
                syscall_name(rule.nr),
                rule.why
            )));
        }
        for value in rule.values {
            let cond =
                SeccompCondition::new(rule.arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, *value)
                    .map_err(|e| SeccompError::Build(e.to_string()))?;
            restricted.entry(rule.nr).or_default().push(
                SeccompRule::new(vec![cond]).map_err(|e| SeccompError::Build(e.to_string()))?,
            );
        }
    }
    for rule in matches {
        if rules.contains_key(&rule.nr) || rule.nr == DEATH_SYSCALL || rule.args.is_empty() {
            return Err(SeccompError::Build(format!(
                "system call {} ({}) is both restricted by its arguments and allowed with any",
                syscall_name(rule.nr),
                rule.why
            )));
        }
        let conds = rule
            .args
            .iter()
            .map(|&(arg, value)| {
                let len = if value <= u32::MAX as u64 {
                    SeccompCmpArgLen::Dword
                } else {
                    SeccompCmpArgLen::Qword
                };
                SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
                    .map_err(|e| SeccompError::Build(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        restricted
            .entry(rule.nr)
            .or_default()
            .push(SeccompRule::new(conds).map_err(|e| SeccompError::Build(e.to_string()))?);
    }
    rules.extend(restricted);
    // Debug builds of Rust's std check a descriptor is open (F_GETFD)
    // before closing it; allow exactly that, in those builds only.
    #[cfg(debug_assertions)]
    rules.insert(libc::SYS_fcntl, vec![fcntl_getfd_rule()?]);
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

#[cfg(debug_assertions)]
fn fcntl_getfd_rule() -> Result<SeccompRule, SeccompError> {
    let cond = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    SeccompRule::new(vec![cond]).map_err(|e| SeccompError::Build(e.to_string()))
}

/// Where the handler reports, and the pid it puts in the frame (getpid
/// itself may be refused).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
static REPORT_PID: AtomicU32 = AtomicU32::new(0);

/// Installs the SIGSYS handler that reports refused calls on `fd`.
pub fn install_sigsys_handler(fd: RawFd) -> Result<(), SeccompError> {
    REPORT_FD.store(fd, Ordering::Relaxed);
    REPORT_PID.store(std::process::id(), Ordering::Relaxed);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigAction(sigsys_handler),
        nix::sys::signal::SaFlags::SA_SIGINFO | nix::sys::signal::SaFlags::SA_RESETHAND,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only reads atomics, encodes into a stack buffer
    // and makes raw system calls; it never allocates or takes a lock.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGSYS, &action) }
        .map_err(SeccompError::Handler)?;
    Ok(())
}

/// The name of system call `nr`, for the log.
pub fn syscall_name(nr: i64) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if let Some((_, name)) = crate::syscall_names::SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
    {
        return name;
    }
    let _ = nr;
    "unknown"
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: for SIGSYS the kernel fills siginfo's _sigsys member: after
    // the three ints and padding (16 bytes) come the call address (8 bytes)
    // and then the int system call number, 24 bytes in.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() } as i64;
    let message = Message::RefusedSyscall {
        nr,
        name: Cow::Borrowed(syscall_name(nr)),
    };
    let mut buf = [0u8; 128];
    let pid = REPORT_PID.load(Ordering::Relaxed);
    if let Ok(len) = imsg::encode_frame_into(&message, 0, pid, false, &mut buf) {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: msghdr is plain data; zeroed is an empty header, and the
        // iovec it points to outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: sendmsg on our own socket with a valid header. Children
        // only ever send whole frames to the parent (imsg::send_blocking,
        // Channel::send_whole), so the stream is at a frame boundary here.
        unsafe { libc::sendmsg(REPORT_FD.load(Ordering::Relaxed), &msg, libc::MSG_NOSIGNAL) };
    }
    // SAFETY: raw system calls with constant arguments; see DEATH_SYSCALL.
    unsafe {
        libc::syscall(DEATH_SYSCALL, 0, 0, 0, 0);
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn names_refused_calls() {
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(libc::SYS_openat), "openat");
        assert_eq!(syscall_name(libc::SYS_ptrace), "ptrace");
        assert_eq!(syscall_name(-1), "unknown");
    }

    #[test]
    fn compiles_every_role_and_keeps_the_death_call_refused() {
        assert!(compile(&[CHILD_SYSCALLS, crate::control::CONTROL_SYSCALLS]).is_ok());
        assert!(compile(&[CHILD_SYSCALLS, crate::switch::SWITCH_SYSCALLS]).is_ok());
        assert!(compile(&[CHILD_SYSCALLS]).is_ok());
        assert!(compile_with_args(
            &[
                CHILD_SYSCALLS,
                crate::vm::VM_SYSCALLS,
                crate::vm::qemu::QEMU_SYSCALLS
            ],
            &[crate::vm::qemu::QEMU_ARG_RULES]
        )
        .is_ok());
        assert!(compile_with_args(
            &[
                CHILD_SYSCALLS,
                crate::vm::VM_SYSCALLS,
                crate::vm::kvm::KVM_MAIN_SYSCALLS
            ],
            &[crate::vm::kvm::KVM_MAIN_ARG_RULES]
        )
        .is_ok());
        // A call restricted by its arguments cannot also be allowed with any.
        let kill_any: &[Allowed] = &[(libc::SYS_kill, "any")];
        assert!(compile_with_args(
            &[CHILD_SYSCALLS, kill_any],
            &[crate::vm::qemu::QEMU_ARG_RULES]
        )
        .is_err());
        assert!(compile(&[CHILD_SYSCALLS, &[(DEATH_SYSCALL, "no")]]).is_err());
    }

    #[test]
    fn every_allowed_call_has_a_reason() {
        for (nr, why) in CHILD_SYSCALLS
            .iter()
            .chain(crate::control::CONTROL_SYSCALLS)
            .chain(crate::switch::SWITCH_SYSCALLS)
            .chain(crate::vm::VM_SYSCALLS)
            .chain(crate::vm::qemu::QEMU_SYSCALLS)
            .chain(crate::vm::kvm::KVM_MAIN_SYSCALLS)
            .chain(crate::vm::kvm::vcpu::THREAD_SYSCALLS)
            .chain(crate::vm::kvm::vcpu::VCPU_SYSCALLS)
            .chain(crate::vm::kvm::virtio::attach::IO_SYSCALLS)
        {
            assert!(!why.is_empty(), "system call {nr} has no reason");
        }
        for rule in crate::vm::qemu::QEMU_ARG_RULES {
            assert!(
                !rule.why.is_empty(),
                "system call {} has no reason",
                rule.nr
            );
            assert!(
                !rule.values.is_empty(),
                "system call {} allows no value",
                rule.nr
            );
        }
    }

    /// Runs `call` in a forked child under a filter that allows kill only
    /// with signal 0; returns how the child ended.
    fn under_kill_filter(signal: libc::c_int) -> nix::sys::wait::WaitStatus {
        const KILL_PROBE: &[ArgRule] = &[ArgRule {
            nr: libc::SYS_kill,
            arg: 1,
            values: &[0],
            why: "test: probe a pid only",
        }];
        let filter = compile_with_args(&[CHILD_SYSCALLS], &[KILL_PROBE]).expect("compile");
        let me = std::process::id() as libc::pid_t;
        // SAFETY: the child makes only raw system calls on the filter
        // built above, then _exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if seccompiler::apply_filter(&filter).is_err() {
                    libc::_exit(2);
                }
                // Signal 0 to our parent only checks it exists.
                let rc = libc::syscall(libc::SYS_kill, me, signal);
                libc::_exit(if rc == 0 { 0 } else { 1 })
            },
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("waitpid")
            }
        }
    }

    #[test]
    fn argument_rules_allow_their_values_and_trap_the_others() {
        use nix::sys::wait::WaitStatus;
        let allowed = under_kill_filter(0);
        assert!(matches!(allowed, WaitStatus::Exited(_, 0)), "{allowed:?}");
        // SIGCONT to the test runner would be harmless, but the filter
        // traps it before it is sent.
        let refused = under_kill_filter(libc::SIGCONT);
        assert!(
            matches!(
                refused,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{refused:?}"
        );
    }
}
