//! AF_PACKET sockets for the DHCP server of local interfaces: the parent
//! opens them (parent/dhcp.rs), the switch process reads and writes them
//! (switch.rs). Every system call on them is here, one per unsafe block.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Classic BPF: accept IPv4 UDP to port 67 (first fragments only: the
/// port is in the first), drop the rest in the kernel. Offsets are in the
/// Ethernet frame; a jump skips that many instructions.
fn dhcp_filter() -> [libc::sock_filter; 11] {
    const fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET,
    };
    [
        /* 0 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 12), // ethertype
        /* 1 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 8, 0x0800), // IPv4, else 10
        /* 2 */ op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 23), // IP protocol
        /* 3 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 6, 17), // UDP, else 10
        /* 4 */ op(BPF_LD | BPF_H | BPF_ABS, 0, 0, 20), // fragment offset
        /* 5 */ op(BPF_JMP | BPF_JSET | BPF_K, 4, 0, 0x1fff), // not first: 10
        /* 6 */ op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 14), // X = IP header length
        /* 7 */ op(BPF_LD | BPF_H | BPF_IND, 0, 0, 16), // UDP destination port
        /* 8 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 67), // port 67, else 10
        /* 9 */ op(BPF_RET | BPF_K, 0, 0, 0x0004_0000), // accept (256 KiB)
        /* 10 */ op(BPF_RET | BPF_K, 0, 0, 0), // drop
    ]
}

/// Opens the packet socket: no protocol until the filter is attached, so
/// no frame gets in unfiltered; then bound to IPv4 on `ifindex`.
pub fn open_dhcp(ifindex: u32) -> Result<OwnedFd, (&'static str, io::Error)> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(("socket", io::Error::last_os_error()));
    }
    // SAFETY: raw is a descriptor we just opened and own alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut program = dhcp_filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
        .map_err(|e| ("SO_ATTACH_FILTER", e))?;
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)
        .map_err(|e| ("PACKET_AUXDATA", e))?;
    // SAFETY: plain-data structure, all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: binds our socket to an address structure of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(("bind", io::Error::last_os_error()));
    }
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: passes a live value of its own size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The address a packet socket is bound to, as the kernel has it now.
fn name(fd: &OwnedFd) -> io::Result<libc::sockaddr_ll> {
    // SAFETY: plain-data structure, all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: getsockname writes at most `len` bytes into addr.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(addr)
}

/// The MAC of the interface a packet socket is bound to (what replies
/// come from).
pub fn mac(fd: &OwnedFd) -> io::Result<[u8; 6]> {
    let addr = name(fd)?;
    if addr.sll_halen != 6 {
        return Err(io::Error::other(format!(
            "not an Ethernet interface (address length {})",
            addr.sll_halen
        )));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&addr.sll_addr[..6]);
    Ok(mac)
}

/// After a read said ENETDOWN: whether the interface is gone (the kernel
/// unbinds the socket, ifindex -1), not merely down (it binds it again
/// when the interface comes up).
pub fn interface_gone(fd: &OwnedFd) -> bool {
    name(fd).map_or(true, |addr| addr.sll_ifindex <= 0)
}

/// One received frame: its length (beyond the buffer when truncated),
/// whether its checksum was left to offload, whether we sent it.
pub struct Received {
    pub len: usize,
    pub csum_not_ready: bool,
    pub outgoing: bool,
}

/// Reads one frame with its PACKET_AUXDATA; None when none is queued.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    // SAFETY: plain-data structures, all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    // u64 for cmsghdr's alignment; room for one tpacket_auxdata.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes it gives, for the
    // duration of the call.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut csum_not_ready = false;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen; the auxdata is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_PACKET
                && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                && (*cmsg).cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<libc::tpacket_auxdata>() as u32) as usize
            {
                let aux: libc::tpacket_auxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                csum_not_ready = aux.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Some(Received {
        len: n as usize,
        csum_not_ready,
        outgoing: addr.sll_pkttype == libc::PACKET_OUTGOING,
    }))
}

/// Sends one reply frame on the socket's interface.
pub fn send(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: sends from a live buffer of its length; the socket is bound,
    // so no address is needed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
