//! vhost-net: the kernel moves a virtio-net interface's frames between
//! the tap and the guest's memory itself, without a trip through QEMU.
//! Worth it only with hardware KVM (under TCG the guest is the
//! bottleneck, and QEMU's own virtio-net is what TCG is tested with).
//! QEMU runs unprivileged and cannot open /dev/vhost-net itself: vmd
//! opens one descriptor per interface and QEMU gets `vhost=on,vhostfd=N`.
//! Where vhost-net cannot be used the VM runs without it, and
//! [`vhost_open`] says why (for a debug line).

// Not called by Net yet (issue 19's building blocks): goes when it is.
#![allow(dead_code)]

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// The vhost-net device (module vhost_net).
pub const VHOST_NET: &str = "/dev/vhost-net";

/// Opens `device` (O_RDWR, O_CLOEXEC) for one interface of a VM that
/// uses hardware KVM (`kvm`). Err: why vhost-net is not used, one line.
/// Opening a device can wait on its driver: call it where waiting is
/// allowed (the start's helper), not in the parent's loop.
pub fn vhost_open(kvm: bool, device: &Path) -> Result<OwnedFd, String> {
    if !kvm {
        return Err("no vhost-net: the VM runs under TCG, not hardware KVM".into());
    }
    match nix::fcntl::open(device, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()) {
        // SAFETY: open just returned this descriptor; nothing else owns it.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(nix::errno::Errno::ENOENT) => Err(format!(
            "no vhost-net: {} does not exist (modprobe vhost_net)",
            device.display()
        )),
        Err(e) => Err(format!(
            "no vhost-net: cannot open {}: {e}",
            device.display()
        )),
    }
}

/// One descriptor for each of a VM's `count` interfaces, or why none.
pub fn vhost_open_all(kvm: bool, device: &Path, count: usize) -> Result<Vec<OwnedFd>, String> {
    (0..count).map(|_| vhost_open(kvm, device)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// /dev/vhost-net's numbers: misc device 10, minor 238.
    fn vhost_rdev() -> u64 {
        nix::sys::stat::makedev(10, 238)
    }

    #[test]
    fn tcg_and_a_missing_device_say_why() {
        let why = vhost_open(false, Path::new(VHOST_NET)).expect_err("opened under TCG");
        assert_eq!(why, "no vhost-net: the VM runs under TCG, not hardware KVM");
        let missing = Path::new("/nonexistent/vhost-net");
        let why = vhost_open(true, missing).expect_err("opened a missing device");
        assert_eq!(
            why,
            "no vhost-net: /nonexistent/vhost-net does not exist (modprobe vhost_net)"
        );
        assert!(vhost_open_all(false, Path::new(VHOST_NET), 2).is_err());
    }

    /// With vhost-net (the nested host), one descriptor per interface;
    /// without (this machine), a node of its numbers cannot be opened
    /// and the reason says so.
    #[test]
    fn the_device_opens_or_says_why() {
        let real = Path::new(VHOST_NET);
        if real.exists() {
            let fds = vhost_open_all(true, real, 2).expect("vhost-net opens");
            assert_eq!(fds.len(), 2);
            for fd in &fds {
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat");
                assert_eq!(st.st_rdev, vhost_rdev());
                let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFD).expect("flags");
                assert_ne!(flags & libc::FD_CLOEXEC, 0);
            }
            return;
        }
        let dir = std::env::temp_dir().join(format!("vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let node = dir.join("vhost-net");
        let made = nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            vhost_rdev(),
        );
        let opened = made.map(|()| vhost_open(true, &node));
        let _ = std::fs::remove_dir_all(&dir);
        let why = opened
            .expect("mknod (run as root)")
            .expect_err("a vhost-net node opened without the driver");
        assert!(
            why.starts_with(&format!("no vhost-net: cannot open {}: ", node.display())),
            "{why}"
        );
    }
}
