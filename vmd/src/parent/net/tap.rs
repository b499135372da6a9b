//! Taps, made by the parent: /dev/net/tun and TUNSETIFF (taps cannot be
//! made over netlink). A tap is not persistent: it vanishes with the
//! last descriptor of it, so the parent holds one for the VM's whole life
//! and the tap goes when the VM ends, or when vmd, the VM process or
//! QEMU is killed. The kernel picks a free name for `tap%d` without a
//! race; a name from vm.conf must be free (IFF_TUN_EXCL), so vmd never
//! takes over an interface that existed before it.

use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The kernel's template: the next free `tapN`.
pub const TAP_TEMPLATE: &str = "tap%d";

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// A tap the parent made and holds.
#[derive(Debug)]
pub struct Tap {
    pub fd: OwnedFd,
    pub name: String,
    pub ifindex: u32,
}

/// Makes a tap named `name` (a template with `%d` lets the kernel pick
/// the number): IFF_TAP, no packet information, with the virtio-net
/// header (QEMU probes it and sets the offloads itself).
pub fn tap_open(name: &str) -> Result<Tap, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("invalid interface name {name:?}"));
    }
    let fd = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own, on our fd.
    if let Err(e) = unsafe { tun_set_iff(fd.as_raw_fd(), &req) } {
        return Err(match e {
            Errno::EBUSY | Errno::EEXIST => format!("interface {name} exists already"),
            e => format!("cannot create tap {name}: {e}"),
        });
    }
    let made: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let made = String::from_utf8_lossy(&made).into_owned();
    let ifindex = if_index(&made).ok_or_else(|| format!("tap {made}: no interface index"))?;
    Ok(Tap {
        fd,
        name: made,
        ifindex,
    })
}

/// The index of interface `name` in our network namespace, if it exists.
pub fn if_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads the NUL-terminated name we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parent::net::testns::in_new_netns;

    #[test]
    fn a_tap_lives_as_long_as_its_descriptor() {
        in_new_netns(|| {
            let tap = tap_open(TAP_TEMPLATE).map_err(|e| e.to_string())?;
            assert_eq!(tap.name, "tap0");
            assert_eq!(if_index("tap0"), Some(tap.ifindex));
            let second = tap_open(TAP_TEMPLATE)?;
            assert_eq!(second.name, "tap1");
            // A name that is taken is refused, not shared.
            let taken = tap_open("tap0").unwrap_err();
            assert_eq!(taken, "interface tap0 exists already");
            let named = tap_open("vmtap7")?;
            assert_eq!(named.name, "vmtap7");
            drop(tap);
            assert_eq!(if_index("tap0"), None);
            assert!(tap_open("x".repeat(16).as_str()).is_err());
            Ok(())
        });
    }
}
