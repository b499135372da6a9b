use super::*;
use crate::parent::net::netlink::tests::ask;
use crate::parent::net::netlink::{Netlink, Reply, Request};
use crate::parent::net::tap::{tap_open, Tap, TAP_TEMPLATE};
use crate::parent::net::testns::in_new_netns;
use mio::{Events, Poll};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

const GOOD: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0x00, 0x01];
const BAD: [u8; 6] = [0xfe, 0xe1, 0xba, 0xd0, 0x00, 0x66];
/// The local experimental EtherType: nothing else sends it.
const ETHERTYPE: u16 = 0x88b5;

/// Plays the parent's loop for `nft` until a transaction finishes: its
/// helper's socket, its deadline, and reaping its pid (only its own: the
/// test process has other tests' children).
fn wait_done(nft: &mut Nft, poll: &mut Poll) -> Result<NftDone, String> {
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(done) = nft.take_done().into_iter().next() {
            return Ok(done);
        }
        if Instant::now() > deadline {
            return Err("no transaction finished within 60s".into());
        }
        let Some(pid) = nft.pid() else {
            return Err("nothing runs and nothing finished".into());
        };
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| format!("poll: {e}"))?;
        if events.iter().any(|e| e.token() == nft.token()) {
            nft.handle_event();
        }
        nft.tick();
        if nft.pid() == Some(pid) {
            if let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                if status != WaitStatus::StillAlive {
                    nft.reaped(pid);
                }
            }
        } else {
            // Finished (and killed): reap it here, as the loop would.
            let _ = waitpid(pid, None);
        }
    }
}

fn new_nft(poll: &Poll, tag: &str) -> Result<Nft, String> {
    let registry = poll
        .registry()
        .try_clone()
        .map_err(|e| format!("registry: {e}"))?;
    let state = PathBuf::from(format!(
        "/run/vmd/test-nft-{tag}-{}.state",
        std::process::id()
    ));
    Ok(Nft::new(
        registry,
        Token(1),
        &state,
        Path::new("/var/run/vmd-test.sock"),
    ))
}

fn apply(nft: &mut Nft, poll: &mut Poll, ops: Vec<NftOp>) -> Result<(), String> {
    let ticket = nft.submit(ops);
    let done = wait_done(nft, poll)?;
    assert_eq!(done.ticket, ticket);
    done.result
}

/// `nft -j list chain`: Ok(packets counted) or Err(nft's complaint).
fn counted(table: &str, tap: &str) -> Result<u64, String> {
    let out = Command::new(NFT_PROGRAM)
        .args(["-j", "list", "chain", "netdev", table, &nft_chain_name(tap)])
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let listed: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let items = listed["nftables"].as_array().ok_or("no nftables array")?;
    let counters: Vec<u64> = items
        .iter()
        .filter_map(|i| i["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .collect();
    match counters[..] {
        [n] => Ok(n),
        _ => Err(format!("not one counter in {listed}")),
    }
}

fn table_listed(table: &str) -> bool {
    Command::new(NFT_PROGRAM)
        .args(["list", "table", "netdev", table])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Writes a broadcast frame from `src` into the tap, as its guest would
/// (behind the virtio-net header the tap was opened with).
fn guest_sends(tap: &Tap, src: [u8; 6], marker: &[u8]) -> Result<(), String> {
    let mut frame = vec![0u8; 10];
    frame.extend([0xff; 6]);
    frame.extend(src);
    frame.extend(ETHERTYPE.to_be_bytes());
    frame.extend(marker);
    frame.resize(10 + 60, 0);
    nix::unistd::write(&tap.fd, &frame).map_err(|e| format!("writing to the tap: {e}"))?;
    Ok(())
}

/// An AF_PACKET socket that sees every frame on link `index`.
pub(crate) fn packet_socket(index: u32) -> Result<OwnedFd, String> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket() with integer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", nix::errno::Errno::last()));
    }
    // SAFETY: socket just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads the sockaddr_ll we own, of the size given.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(format!("binding AF_PACKET: {}", nix::errno::Errno::last()));
    }
    Ok(fd)
}

/// The markers of our frames that reach the socket, until `last` has.
fn markers_until(sock: &OwnedFd, last: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match nix::unistd::read(sock.as_raw_fd(), &mut buf) {
            Ok(n) if n >= 14 + last.len() && buf[12..14] == ETHERTYPE.to_be_bytes() => {
                let marker = buf[14..14 + last.len()].to_vec();
                let done = marker == last;
                seen.push(marker);
                if done {
                    return Ok(seen);
                }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let fd = sock.as_fd();
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            }
            Err(e) => return Err(format!("reading AF_PACKET: {e}")),
        }
    }
    Err(format!(
        "frame {:?} never reached the bridge",
        String::from_utf8_lossy(last)
    ))
}

/// A tap, up, on a bridge, up: (tap, bridge's index).
fn tap_on_bridge(nl: &mut Netlink) -> Result<(Tap, u32), String> {
    assert_eq!(ask(nl, &Request::NewBridge("br0".into()))?, Reply::Ack);
    let Reply::Link(bridge) = ask(nl, &Request::LinkByName("br0".into()))? else {
        return Err("no bridge".into());
    };
    let up = |index, master| Request::SetLink {
        index,
        alias: None,
        up: Some(true),
        master,
    };
    assert_eq!(ask(nl, &up(bridge.index, None))?, Reply::Ack);
    let tap = tap_open(TAP_TEMPLATE)?;
    assert_eq!(ask(nl, &up(tap.ifindex, Some(bridge.index)))?, Reply::Ack);
    Ok((tap, bridge.index))
}

#[test]
fn rulesets_are_nft_json() {
    let ops = [
        NftOp::Lock {
            tap: "tap3".into(),
            mac: GOOD,
        },
        NftOp::Unlock { tap: "tap4".into() },
        NftOp::DropTable,
    ];
    let set = nft_ruleset("vmd_x", "vmd test", &ops);
    let cmds = set["nftables"].as_array().expect("a list");
    assert_eq!(cmds[0]["add"]["table"]["family"], "netdev");
    assert_eq!(cmds[0]["add"]["table"]["name"], "vmd_x");
    let chain = &cmds[1]["add"]["chain"];
    assert_eq!(chain["name"], "lock-tap3");
    assert_eq!(chain["hook"], "ingress");
    assert_eq!(chain["dev"], "tap3");
    assert_eq!(chain["prio"], -500);
    assert_eq!(cmds[2]["flush"]["chain"]["name"], "lock-tap3");
    let expr = &cmds[3]["add"]["rule"]["expr"];
    assert_eq!(expr[0]["match"]["op"], "!=");
    assert_eq!(expr[0]["match"]["left"]["payload"]["field"], "saddr");
    assert_eq!(expr[0]["match"]["right"], "fe:e1:ba:d0:00:01");
    assert!(expr[1].get("counter").is_some());
    assert!(expr[2].get("drop").is_some());
    // An unlock adds, flushes, deletes: never ENOENT.
    assert_eq!(cmds[4]["add"]["chain"]["name"], "lock-tap4");
    assert!(cmds[4]["add"]["chain"].get("hook").is_none());
    assert_eq!(cmds[5]["flush"]["chain"]["name"], "lock-tap4");
    assert_eq!(cmds[6]["delete"]["chain"]["name"], "lock-tap4");
    assert_eq!(cmds[7]["delete"]["table"]["name"], "vmd_x");
    // One table per daemon, stable across runs.
    let a = nft_table_name(Path::new("/run/vmd/var-run-vmd.sock.state"));
    let b = nft_table_name(Path::new("/run/vmd/tmp-t1-vmd.sock.state"));
    assert_ne!(a, b);
    assert_eq!(
        a,
        nft_table_name(Path::new("/run/vmd/var-run-vmd.sock.state"))
    );
    assert!(a.starts_with("vmd_") && a.len() == 20);
}

#[test]
fn a_locked_tap_drops_and_counts_foreign_frames() {
    in_new_netns(|| {
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut nft = new_nft(&poll, "lock")?;
        let table = nft.table().to_string();
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let (tap, bridge) = tap_on_bridge(&mut nl)?;
        let sock = packet_socket(bridge)?;
        let lock = NftOp::Lock {
            tap: tap.name.clone(),
            mac: GOOD,
        };
        apply(&mut nft, &mut poll, vec![lock.clone()])?;
        assert_eq!(counted(&table, &tap.name)?, 0);

        // A foreign source is dropped and counted; the tap's own passes.
        guest_sends(&tap, BAD, b"bad-1")?;
        guest_sends(&tap, GOOD, b"good1")?;
        assert_eq!(markers_until(&sock, b"good1")?, vec![b"good1".to_vec()]);
        assert_eq!(counted(&table, &tap.name)?, 1);
        // Locking again replaces the rule, not adds one.
        apply(&mut nft, &mut poll, vec![lock])?;
        assert_eq!(counted(&table, &tap.name)?, 0);

        // Unlocked (twice: the second finds nothing, and that is fine):
        // the chain is gone and foreign frames pass.
        let unlock = NftOp::Unlock {
            tap: tap.name.clone(),
        };
        apply(&mut nft, &mut poll, vec![unlock.clone()])?;
        apply(&mut nft, &mut poll, vec![unlock])?;
        let gone = counted(&table, &tap.name).expect_err("the chain is still listed");
        assert!(gone.contains("No such file"), "{gone}");
        guest_sends(&tap, BAD, b"bad-2")?;
        assert_eq!(markers_until(&sock, b"bad-2")?, vec![b"bad-2".to_vec()]);

        // The table goes whole, and twice is fine too.
        apply(&mut nft, &mut poll, vec![NftOp::DropTable])?;
        assert!(!table_listed(&table));
        apply(&mut nft, &mut poll, vec![NftOp::DropTable])?;
        assert!(nft.is_idle());
        Ok(())
    });
}

/// The running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uts = nix::sys::utsname::uname().expect("uname");
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

#[test]
fn a_chain_outlives_its_tap_until_deleted() {
    in_new_netns(|| {
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut nft = new_nft(&poll, "outlive")?;
        let table = nft.table().to_string();
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let tap = tap_open(TAP_TEMPLATE)?;
        let name = tap.name.clone();
        let lock = NftOp::Lock {
            tap: name.clone(),
            mac: GOOD,
        };
        apply(&mut nft, &mut poll, vec![lock])?;
        drop(tap);
        // Gone with its last descriptor; the chain may stay (Linux >=
        // 6.16 keeps it, bound to the name): the deletion removes it.
        let gone = ask(&mut nl, &Request::LinkByName(name.clone()))?;
        assert_eq!(gone, Reply::Failed(nix::errno::Errno::ENODEV));
        if kernel_at_least(6, 16) {
            assert_eq!(counted(&table, &name)?, 0, "the chain went with its tap");
        }
        apply(
            &mut nft,
            &mut poll,
            vec![NftOp::Unlock { tap: name.clone() }],
        )?;
        assert!(counted(&table, &name).is_err());
        // A new tap of that name is not cut off.
        let again = tap_open(&name)?;
        assert_eq!(again.name, name);
        apply(&mut nft, &mut poll, vec![NftOp::DropTable])?;
        Ok(())
    });
}

#[test]
fn transactions_run_in_order_and_fail_whole() {
    in_new_netns(|| {
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut nft = new_nft(&poll, "order")?;
        let table = nft.table().to_string();
        // Real taps: a kernel before 6.16 has no chain for a missing device.
        let (tap0, tap1) = (tap_open(TAP_TEMPLATE)?, tap_open(TAP_TEMPLATE)?);
        let first = nft.submit(vec![NftOp::Lock {
            tap: tap0.name.clone(),
            mac: GOOD,
        }]);
        // A chain name longer than nft allows: refused, and nothing of
        // the transaction is applied.
        let second = nft.submit(vec![
            NftOp::Lock {
                tap: tap1.name.clone(),
                mac: GOOD,
            },
            NftOp::Lock {
                tap: "x".repeat(300),
                mac: GOOD,
            },
        ]);
        assert!(first < second);
        let a = wait_done(&mut nft, &mut poll)?;
        assert_eq!(
            a,
            NftDone {
                ticket: first,
                result: Ok(())
            }
        );
        let b = wait_done(&mut nft, &mut poll)?;
        assert_eq!(b.ticket, second);
        let why = b.result.expect_err("a 300-byte chain name was accepted");
        assert!(
            why.starts_with(&format!("nftables table {table}: /usr/sbin/nft failed")),
            "{why}"
        );
        assert!(why.len() < NFT_STDERR_MAX + 200, "{why}");
        assert_eq!(counted(&table, &tap0.name)?, 0);
        assert!(counted(&table, &tap1.name).is_err());
        apply(&mut nft, &mut poll, vec![NftOp::DropTable])?;
        Ok(())
    });
}

/// A script in a directory of its own, removed on drop.
struct Script(PathBuf);

impl Script {
    fn new(tag: &str, body: &str) -> Script {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmd-nft-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("nft");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Script(dir)
    }

    fn path(&self) -> PathBuf {
        self.0.join("nft")
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn nft_missing_failing_or_hung_is_a_clear_error() {
    let mut poll = Poll::new().expect("poll");
    let missing = Path::new("/nonexistent/nft");
    let mut nft = new_nft(&poll, "missing")
        .expect("nft")
        .with_program(missing, NFT_TIMEOUT);
    let why = apply(&mut nft, &mut poll, vec![NftOp::DropTable]).expect_err("ran");
    assert!(why.contains("cannot run /nonexistent/nft"), "{why}");
    assert!(why.contains("nftables package"), "{why}");

    // Its error output, bounded: the first lines are kept.
    let noisy = Script::new(
        "noisy",
        "cat >/dev/null; echo 'Error: first line' >&2; yes 'more noise' | head -c 1000000 >&2; exit 1",
    );
    let mut nft = new_nft(&poll, "noisy")
        .expect("nft")
        .with_program(&noisy.path(), NFT_TIMEOUT);
    let why = apply(&mut nft, &mut poll, vec![NftOp::DropTable]).expect_err("succeeded");
    assert!(
        why.contains("failed (exit status: 1): Error: first line"),
        "{why}"
    );
    assert!(why.len() < NFT_STDERR_MAX + 200, "{} bytes", why.len());

    // One that never ends is killed at its deadline.
    let hung = Script::new("hung", "exec sleep 600");
    let mut nft = new_nft(&poll, "hung")
        .expect("nft")
        .with_program(&hung.path(), Duration::from_secs(1));
    let why = apply(&mut nft, &mut poll, vec![NftOp::DropTable]).expect_err("succeeded");
    assert!(why.ends_with("did not finish within 1s"), "{why}");
}
