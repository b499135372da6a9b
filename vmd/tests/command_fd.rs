//! A client's descriptor, end to end: a real vmd (built with the
//! `test-triggers` feature, which accepts the test command `probe`) runs a
//! real VM (QEMU, TCG, SeaBIOS with an empty disk); a client sends `probe`
//! with the write end of a pipe over the control socket; the descriptor
//! travels client -> control -> parent -> VM process, whose backend
//! reports progress (each note reaching the client) and writes the probe's
//! text into it. Descriptors that come with the wrong requests are refused.
//! And a raw start frame from a user (what vmctl cannot send) changes only
//! what its template's `allow instance` permits.
//!
//! Needs root, the user _vmd, QEMU and SeaBIOS (`sh regress/setup`), as
//! `make test` has. Run: cargo test -p vmd --features test-triggers
//! --target-dir target/test-triggers --test command_fd (Makefile `test`).
#![cfg(feature = "test-triggers")]

use common::ctl::{CtlError, CtlRequest, VmTarget};
use common::imsg::{send_blocking, Channel, Frame, Message};
use common::status::VmState;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: a loaded machine only makes each step slower.
const WAIT: Duration = Duration::from_secs(120);

/// A vmd of this test's own (temp dir, socket, vm.conf), stopped and
/// removed however the test ends.
struct Vmd {
    dir: PathBuf,
    child: Child,
}

impl Vmd {
    /// A vmd in a temp dir of this test's (`name`), its vm.conf the VM
    /// `probe` and `extra` (`@DIR@` in it: the temp dir).
    fn start(name: &str, extra: &str) -> Vmd {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs vmd and needs root (make test runs it as root)"
        );
        for need in ["/usr/share/seabios/bios.bin", "/usr/bin/qemu-system-x86_64"] {
            assert!(
                Path::new(need).exists(),
                "{need} is missing: run sh regress/setup"
            );
        }
        let dir = std::env::temp_dir().join(format!("vmd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("temp dir");
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(1 << 20))
            .expect("disk image");
        let conf = dir.join("vm.conf");
        std::fs::write(
            &conf,
            format!(
                "accel tcg\nvm \"probe\" {{\n disable\n disk \"{}\"\n memory 64M\n}}\n{}",
                disk.display(),
                extra.replace("@DIR@", &dir.display().to_string())
            ),
        )
        .expect("vm.conf");
        let log = std::fs::File::create(dir.join("vmd.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_vmd"))
            .args(["-d", "-v", "-f"])
            .arg(&conf)
            .arg("-s")
            .arg(dir.join("vmd.sock"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("vmd runs");
        Vmd { dir, child }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmd.log")).unwrap_or_default()
    }

    /// A client connection, once vmd listens.
    fn connect(&self) -> Client {
        let sock = self.dir.join("vmd.sock");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(stream) = UnixStream::connect(&sock) {
                return Client {
                    channel: Channel::new(OwnedFd::from(stream)),
                    queued: Default::default(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "vmd never listened:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Vmd {
    /// SIGTERM (vmd powers its VMs down), a second SIGTERM after 2s
    /// (vmd forces them), then SIGKILL if it lingers.
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        'signals: for wait in [2, 30] {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                // Reaped: its pid is no longer ours to signal.
                if let Ok(Some(_)) = self.child.try_wait() {
                    break 'signals;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client as vmctl is one: frames out, frames back (several may come in
/// one read; `queued` keeps them in order).
struct Client {
    channel: Channel,
    queued: std::collections::VecDeque<Frame>,
}

impl Client {
    fn send(&mut self, request: CtlRequest, fd: Option<OwnedFd>) {
        let frame = Frame {
            fd,
            ..Frame::new(Message::Ctl(request))
        };
        send_blocking(self.channel.sock.as_fd(), frame).expect("request sent");
    }

    /// The next message, within WAIT.
    fn receive(&mut self) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(frame) = self.queued.pop_front() {
                return frame.message;
            }
            let mut fds = [PollFd::new(self.channel.sock.as_fd(), PollFlags::POLLIN)];
            assert!(Instant::now() < deadline, "vmd did not answer");
            let _ = poll(&mut fds, PollTimeout::from(1000u16));
            let (frames, eof) = self.channel.receive().expect("reading vmd's answer");
            self.queued.extend(frames);
            assert!(!eof || !self.queued.is_empty(), "vmd closed the connection");
        }
    }

    /// VM `name`'s state and pid, as `status` shows it.
    fn vm(&mut self, name: &str) -> Option<(VmState, Option<u32>)> {
        self.send(CtlRequest::Status, None);
        let mut found = None;
        loop {
            match self.receive() {
                Message::CtlVm(info) if info.name == name => found = Some((info.state, info.pid)),
                Message::CtlVm(_) => {}
                Message::CtlVmEnd => return found,
                other => panic!("unexpected answer to status: {other:?}"),
            }
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
}

/// Everything written to `read` until its writers are gone, within WAIT.
fn read_to_end(read: OwnedFd) -> String {
    let mut file = std::fs::File::from(read);
    let mut text = String::new();
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    assert!(
        poll(&mut fds, PollTimeout::from(60_000u16)).expect("poll") > 0,
        "nothing came through the pipe"
    );
    file.read_to_string(&mut text).expect("reading the pipe");
    text
}

#[test]
fn a_descriptor_travels_to_the_vm_process_and_back() {
    let vmd = Vmd::start("command-fd", "");
    let mut client = vmd.connect();
    // A start is answered once the guest runs (its QMP said so): only
    // then does the backend take commands.
    let start = common::ctl::StartRequest {
        target: VmTarget::Name("probe".into()),
        vm: common::config::VmConfig::new("probe"),
    };
    client.send(CtlRequest::Start(Box::new(start)), None);
    match client.receive() {
        Message::CtlVmResult { error: None, .. } => {}
        other => panic!("the VM did not start: {other:?}\n{}", vmd.log()),
    }
    let Some((VmState::Running, Some(vm_pid))) = client.vm("probe") else {
        panic!("the started VM is not running:\n{}", vmd.log());
    };

    // Every thread of the VM process runs under its filter.
    for task in std::fs::read_dir(format!("/proc/{vm_pid}/task")).expect("VM process tasks") {
        let status = std::fs::read_to_string(task.expect("task").path().join("status"))
            .expect("task status");
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "a VM process thread without its filter:\n{status}"
        );
    }

    let target = || VmTarget::Name("probe".into());
    let text = "through control, the parent and the VM process";
    let (read, write) = pipe();
    let probe = CtlRequest::Probe {
        target: target(),
        text: text.into(),
        steps: 3,
    };
    client.send(probe, Some(write));
    for step in 1..=3 {
        match client.receive() {
            Message::CtlProgress { note, .. } => assert_eq!(note, format!("step {step} of 3")),
            other => panic!("want progress {step}, got {other:?}\n{}", vmd.log()),
        }
    }
    match client.receive() {
        Message::CtlVmResult { error: None, .. } => {}
        other => panic!("probe failed: {other:?}\n{}", vmd.log()),
    }
    // Our write end went with the request; the VM process closed its copy.
    assert_eq!(read_to_end(read), text);

    // A descriptor where none is taken, none where one is: refused, and
    // the connection goes on.
    let (_read, write) = pipe();
    client.send(CtlRequest::Pause { target: target() }, Some(write));
    match client.receive() {
        Message::CtlFail { errno, lines } => {
            assert_eq!(errno, libc::EINVAL);
            assert_eq!(lines, ["a descriptor came with pause, which takes none"]);
        }
        other => panic!("pause with a descriptor: {other:?}"),
    }
    let probe = CtlRequest::Probe {
        target: target(),
        text: "x".into(),
        steps: 0,
    };
    client.send(probe, None);
    match client.receive() {
        Message::CtlFail { errno, lines } => {
            assert_eq!(errno, libc::EINVAL);
            assert_eq!(lines, ["probe needs a descriptor and none came"]);
        }
        other => panic!("probe without a descriptor: {other:?}"),
    }
    // A probe of a VM that does not exist fails like any VM command.
    let (_read, write) = pipe();
    let probe = CtlRequest::Probe {
        target: VmTarget::Name("nosuchvm".into()),
        text: "x".into(),
        steps: 0,
    };
    client.send(probe, Some(write));
    match client.receive() {
        Message::CtlVmResult {
            error: Some(error), ..
        } => assert_ne!(error, CtlError::Errno(0)),
        other => panic!("probe of a missing VM: {other:?}"),
    }
    // Still running: nothing above disturbed the VM.
    assert_eq!(client.vm("probe").map(|v| v.0), Some(VmState::Running));
}

/// The attack review's raw start frame: an instance asking for settings
/// its template's `allow instance` does not permit (accel, a shutdown
/// timeout), from a user who may create instances, is refused; vmctl has
/// no option for them, so only a raw frame carries them.
#[test]
fn a_raw_instance_request_changes_only_what_the_template_allows() {
    const NOBODY: u32 = 65534;
    let vmd = Vmd::start(
        "raw-instance",
        "socket owner nobody\n\
         vm \"tpl\" {\n disable\n memory 64M\n allow instance { owner nobody }\n}\n",
    );
    // nobody reaches the socket in the test's directory.
    std::fs::set_permissions(
        &vmd.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    // Our root connection first: vmd listens, the socket's owner is set.
    let mut root = vmd.connect();
    let deadline = Instant::now() + WAIT;
    let sock = vmd.dir.join("vmd.sock");
    let owner = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .ok()
    };
    while owner(&sock) != Some(NOBODY) {
        assert!(
            Instant::now() < deadline,
            "the socket never became nobody's"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (what, change) in [
        (
            "accel",
            (|vm: &mut common::config::VmConfig| vm.accel = Some(common::config::Accel::Kvm))
                as fn(&mut common::config::VmConfig),
        ),
        ("shutdown timeout", |vm| vm.shutdown_timeout = Some(86400)),
    ] {
        let mut vm = common::config::VmConfig::new("inst");
        vm.instance_of = Some("tpl".into());
        change(&mut vm);
        let request = CtlRequest::Start(Box::new(common::ctl::StartRequest {
            target: VmTarget::Name("inst".into()),
            vm,
        }));
        let sock = sock.clone();
        // A thread of our own that becomes nobody (raw calls change only
        // the calling thread's credentials, which SO_PEERCRED reads).
        let answer = std::thread::spawn(move || {
            // SAFETY: raw set*id calls with integer arguments, on this
            // thread only; it ends after the request.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                    0
                );
                assert_eq!(
                    libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                    0
                );
                assert_eq!(
                    libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                    0
                );
            }
            let stream = UnixStream::connect(&sock).expect("nobody connects");
            let mut client = Client {
                channel: Channel::new(OwnedFd::from(stream)),
                queued: Default::default(),
            };
            client.send(request, None);
            client.receive()
        })
        .join()
        .expect("nobody's request");
        match answer {
            Message::CtlVmResult {
                error: Some(error), ..
            } => {
                assert_eq!(error.errno_code(), Some(libc::EPERM), "{error:?}");
                assert_eq!(
                    error.describe(),
                    format!("the template tpl does not allow changing {what}")
                );
            }
            other => panic!("an instance with {what}: {other:?}\n{}", vmd.log()),
        }
    }
    // Nothing of it is left: no instance listed.
    assert_eq!(root.vm("inst"), None);
}
