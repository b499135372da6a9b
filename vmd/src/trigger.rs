//! Test triggers, compiled only with the `test-triggers` feature (the
//! regress suite builds it into its own target directory; release and
//! target/debug binaries never contain it).
//!
//! A child blocks four real-time signals and reads them from a signalfd;
//! each makes it attempt one system call its filter must refuse:
//!
//! | signal     | attempt                        |
//! |------------|--------------------------------|
//! | SIGRTMIN+1 | execve("/bin/sh")              |
//! | SIGRTMIN+2 | open("/etc/passwd")            |
//! | SIGRTMIN+3 | socket(AF_INET, SOCK_STREAM)   |
//! | SIGRTMIN+4 | ptrace(PTRACE_TRACEME)         |
//!
//! The parent raises every process's verbosity by one on SIGUSR1.
//!
//! `VMD_TEST_START_RATE_WINDOW=SECONDS` in the parent's environment
//! replaces the 6 s start rate window (registry.rs).

use crate::log::log_warn;
use crate::seccomp::Allowed;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What reading the trigger adds to a child's filter.
pub const SYSCALLS: &[Allowed] = &[(
    libc::SYS_read,
    "read the test trigger's signalfd (test builds only)",
)];

/// The start rate window a regress case set, if any.
pub fn start_rate_window() -> Option<std::time::Duration> {
    let secs = std::env::var("VMD_TEST_START_RATE_WINDOW").ok()?;
    secs.parse().ok().map(std::time::Duration::from_secs)
}

pub struct Trigger {
    fd: OwnedFd,
}

impl Trigger {
    /// Blocks the trigger signals and opens a signalfd for them (before
    /// the drop). Exits the child if that fails: a test build that cannot
    /// be triggered must not pass for one that was.
    pub fn setup() -> Trigger {
        // SAFETY: sigset manipulation on a local set, then signalfd on it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for n in 1..=4 {
                libc::sigaddset(&mut set, libc::SIGRTMIN() + n);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                log_warn!(
                    "test trigger: signalfd: {}",
                    std::io::Error::last_os_error()
                );
                std::process::exit(1);
            }
            Trigger {
                fd: OwnedFd::from_raw_fd(fd),
            }
        }
    }

    pub fn register(&self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.fd.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// Reads pending trigger signals and attempts the matching calls.
    pub fn fire(&self, role: &str) {
        loop {
            // SAFETY: reads one signalfd_siginfo into a local of that size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                return;
            }
            let which = info.ssi_signo as i32 - libc::SIGRTMIN();
            // Each attempt below must trap; reaching the log line after it
            // means the filter let it through.
            // SAFETY: system calls with valid constant arguments.
            let (name, rc) = unsafe {
                match which {
                    1 => {
                        let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
                        let envp = [std::ptr::null()];
                        (
                            "execve",
                            libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), envp.as_ptr()) as i64,
                        )
                    }
                    2 => (
                        "open",
                        libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) as i64,
                    ),
                    3 => (
                        "socket",
                        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
                    ),
                    4 => ("ptrace", libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)),
                    _ => continue,
                }
            };
            log_warn!("test trigger: {role} was allowed to call {name} (returned {rc})");
        }
    }
}

/// One interface a test build serves as a local interface from startup,
/// as `VMD_TEST_DHCP_SERVE` names it.
pub struct DhcpServe {
    pub ifname: String,
    pub vm_name: String,
    pub vmid: u32,
    pub index: u32,
    pub mac: [u8; 6],
    pub net_boot: bool,
}

/// `VMD_TEST_DHCP_SERVE=IFNAME,VMNAME,VMID,INDEX,MAC[,net][;...]` in the
/// parent's environment: existing interfaces (one end of a veth pair) the
/// parent serves DHCP on as it serves a local interface's tap, with that
/// VM's name, id, interface index and MAC (regress/dhcp).
pub fn dhcp_serve() -> Result<Vec<DhcpServe>, String> {
    let Ok(text) = std::env::var("VMD_TEST_DHCP_SERVE") else {
        return Ok(Vec::new());
    };
    text.split(';')
        .map(|spec| {
            let bad = || format!("VMD_TEST_DHCP_SERVE: bad entry {spec:?}");
            let fields: Vec<&str> = spec.split(',').collect();
            let (net_boot, fields) = match fields.as_slice() {
                [rest @ .., "net"] => (true, rest),
                all => (false, all),
            };
            let [ifname, vm_name, vmid, index, mac] = fields else {
                return Err(bad());
            };
            Ok(DhcpServe {
                ifname: ifname.to_string(),
                vm_name: vm_name.to_string(),
                vmid: vmid.parse().map_err(|_| bad())?,
                index: index.parse().map_err(|_| bad())?,
                mac: common::config::parse_lladdr(mac).ok_or_else(bad)?,
                net_boot,
            })
        })
        .collect()
}
