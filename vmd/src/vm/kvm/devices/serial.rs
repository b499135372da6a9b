//! The 8250 UART on 0x3f8, IRQ 4: the guest's console (`console=ttyS0`).
//! vm-superio's state machine, with:
//! - output written to the guest's end of the VM process's serial
//!   socketpair, the same console relay QEMU's serial port feeds
//!   (vm/console.rs: the pty and the console log). The socket is
//!   non-blocking; when it is full the vCPU waits for room a bounded time
//!   ([`OUTPUT_WAIT_MS`]) and then drops the byte, so a stalled reader
//!   can never hold a vCPU (and the device lock) forever;
//! - input given by the monitor thread ([`Serial::enqueue`]) from that
//!   socket, as much as the 64-byte FIFO takes; when the guest has read
//!   the FIFO empty, [`SerialEvents::in_buffer_empty`] wakes the monitor
//!   (an eventfd) to give more;
//! - the interrupt through an irqfd (an eventfd the kernel turns into
//!   IRQ 4 of the in-kernel IOAPIC).

use crate::vm::kvm::bus::BusDevice;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_BASE: u64 = 0x3f8;
pub const SERIAL_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// How long a vCPU waits for room in the console socket before it drops
/// a byte of output.
pub const OUTPUT_WAIT_MS: u16 = 100;

/// An interrupt line: an eventfd registered as an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes the monitor thread when the guest has drained the input FIFO.
pub struct InputRoom(pub EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The guest's output: the guest's end of the console socketpair.
pub struct Output {
    fd: OwnedFd,
}

impl Output {
    /// `fd` must be non-blocking.
    pub fn new(fd: OwnedFd) -> Output {
        Output { fd }
    }
}

impl Write for Output {
    /// Writes `buf` or drops it once the socket stayed full for
    /// [`OUTPUT_WAIT_MS`]: never an error (the guest's UART has no way
    /// to hear of one).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut waited = false;
        loop {
            match nix::unistd::write(self.fd.as_fd(), buf) {
                Ok(n) => return Ok(n.max(1).min(buf.len())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) if !waited => {
                    waited = true;
                    let mut pfd = [nix::poll::PollFd::new(
                        self.fd.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    let _ = nix::poll::poll(&mut pfd, OUTPUT_WAIT_MS);
                }
                Err(_) => return Ok(buf.len()),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Output {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

pub struct Serial {
    uart: vm_superio::Serial<IrqLine, InputRoom, Output>,
}

impl Serial {
    pub fn new(irq: EventFd, room: EventFd, output: Output) -> Serial {
        Serial {
            uart: vm_superio::Serial::with_events(IrqLine(irq), InputRoom(room), output),
        }
    }

    /// Gives the guest what fits of `input` in the FIFO; how much it took.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// The descriptors a vCPU writes to through this device (for its
    /// filter): the output, the interrupt and the wake-up.
    pub fn write_fds(&self) -> Vec<std::os::fd::RawFd> {
        vec![
            self.uart.writer().as_raw_fd(),
            self.uart.interrupt_evt().0.as_raw_fd(),
            self.uart.events().0.as_raw_fd(),
        ]
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // An error is a lost interrupt or byte: the guest's driver
            // copes as with real hardware.
            let _ = self.uart.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::set_nonblocking;
    use crate::vm::sock_pair;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn serial() -> (Serial, OwnedFd, EventFd, EventFd) {
        let (ours, guest) = sock_pair("test").expect("socketpair");
        set_nonblocking(guest.as_raw_fd()).expect("nonblocking");
        set_nonblocking(ours.as_raw_fd()).expect("nonblocking");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let room = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let dev = Serial::new(
            irq.try_clone().expect("clone"),
            room.try_clone().expect("clone"),
            Output::new(guest),
        );
        (dev, ours, irq, room)
    }

    #[test]
    fn output_reaches_the_socket_and_input_the_guest_with_interrupts() {
        let (mut dev, ours, irq, room) = serial();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        let mut buf = [0u8; 16];
        let n = nix::unistd::read(ours.as_raw_fd(), &mut buf).expect("read");
        assert_eq!(&buf[..n], b"hi\n");

        // Received-data interrupts on (IER bit 0): input raises IRQ 4.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue(b"ab"), 2);
        assert_eq!(irq.read().expect("irq"), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'a');
        assert!(room.read().is_err(), "not empty yet");
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'b');
        assert_eq!(room.read().expect("room"), 1);
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0);
        // The FIFO holds 64 bytes; more waits.
        assert_eq!(dev.enqueue(&[b'x'; 100]), 64);
        assert_eq!(dev.enqueue(b"y"), 0);
        // Odd accesses from a guest are harmless.
        dev.write(7, &[]);
        dev.read(200, &mut [0u8; 4]);
    }

    #[test]
    fn a_full_socket_drops_output_after_a_bounded_wait() {
        let (ours, guest) = sock_pair("test").expect("socketpair");
        set_nonblocking(guest.as_raw_fd()).expect("nonblocking");
        // Fill the socket: nobody reads `ours`.
        while nix::unistd::write(guest.as_fd(), &[b'z'; 4096]).is_ok() {}
        let mut out = Output::new(guest);
        let start = std::time::Instant::now();
        assert_eq!(out.write(b"lost").expect("write"), 4);
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(OUTPUT_WAIT_MS as u64 / 2));
        assert!(waited < std::time::Duration::from_secs(30));
        drop(ours);
    }
}
