//! The virtio devices of a machine: where they sit (an MMIO window from
//! [`VIRTIO_MMIO_BASE`] and a GSI from [`VIRTIO_GSI_BASE`] each, in the
//! order given: disks first, then interfaces), their DSDT entries
//! ([`dsdt_entries`]), their KVM wiring (an ioeventfd per queue on
//! QueueNotify, the interrupt's irqfd), and the I/O thread that runs
//! their queues ([`IoThread`]), never the vCPU thread.

use super::block::Block;
use super::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use super::net::Net;
use super::{Mem, VirtioDevice};
use crate::seccomp::{self, Allowed, ArgRule, MatchRule};
use crate::vm::kvm::bus::{lock, Bus, BusDevice};
use crate::vm::kvm::vcpu::THREAD_SYSCALLS;
use crate::vm::kvm::KvmError;
use crate::vm::qemu::DiskLayer;
use acpi_tables::{aml, Aml};
use common::image::Layer;
use kvm_ioctls::{IoEventAddress, VmFd};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The first virtio device's window, in the hole below 4 GiB; the next
/// ones follow, [`MMIO_WINDOW`] apart.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The first virtio device's GSI (IOAPIC pin); the next ones follow.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// How many virtio devices a machine has at most (GSIs 5 to 8).
pub const MAX_VIRTIO_DEVICES: usize = 4;

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// Where device `index` sits: its window's base and its GSI.
pub fn slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW,
        VIRTIO_GSI_BASE + index as u32,
    )
}

/// The DSDT's description of `count` virtio-mmio devices: `LNRO0005`
/// devices with their window and edge-triggered, active-high interrupt
/// (Debian's kernel ignores `virtio_mmio.device=`).
pub fn dsdt_entries(count: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for index in 0..count {
        let (base, gsi) = slot(index);
        let window = aml::Memory32Fixed::new(true, base as u32, MMIO_WINDOW as u32);
        let irq = aml::Interrupt::new(true, true, false, false, gsi);
        let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_value = index as u8;
        let uid = aml::Name::new("_UID".into(), &uid_value);
        let crs = aml::Name::new("_CRS".into(), &resources);
        let path = format!("_SB_.VR{index:02X}");
        aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    }
    bytes
}

/// The disks' block devices, from the layers the parent opened (each
/// disk's top first, its backing files read-only below it).
pub fn block_devices(mut layers: Vec<DiskLayer>) -> Result<Vec<Block>, KvmError> {
    layers.sort_by_key(|l| (l.disk, l.layer));
    let mut disks: Vec<(u8, Vec<Layer>, bool)> = Vec::new();
    for l in layers {
        let layer = Layer {
            path: PathBuf::from(format!("disk {} layer {}", l.disk, l.layer)),
            format: l.format,
            file: File::from(l.fd),
        };
        match disks.last_mut() {
            Some((disk, chain, _)) if *disk == l.disk => chain.push(layer),
            _ => disks.push((l.disk, vec![layer], !l.writable)),
        }
    }
    disks
        .into_iter()
        .map(|(disk, chain, read_only)| {
            Block::new(chain, read_only, &format!("vmd-disk{disk}"))
                .map_err(|e| KvmError::Config(format!("disk {disk}: {e}")))
        })
        .collect()
}

/// The interfaces' net devices, on the taps the parent made (with
/// IFF_VNET_HDR), in interface order, each with its MAC from `macs`.
pub fn net_devices(mut taps: Vec<(u8, OwnedFd)>, macs: &[[u8; 6]]) -> Result<Vec<Net>, KvmError> {
    taps.sort_by_key(|(index, _)| *index);
    taps.into_iter()
        .map(|(index, tap)| {
            let mac = macs
                .get(usize::from(index))
                .copied()
                .ok_or_else(|| KvmError::Config(format!("interface {index}: no MAC address")))?;
            Net::new(tap, mac).map_err(|e| KvmError::Config(format!("interface {index}: {e}")))
        })
        .collect()
}

/// One queue's notification, as the I/O thread waits for it.
struct QueueEvent {
    event: EventFd,
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue: usize,
}

/// Puts `devices` on `mmio` at their slots and wires them into `vm`;
/// returns the I/O thread's work and the descriptors the vCPU thread
/// writes to (queue EventFds on DRIVER_OK, interrupts).
pub fn attach(
    vm: &VmFd,
    mem: &Mem,
    mmio: &mut Bus,
    blocks: Vec<Block>,
    nets: Vec<Net>,
) -> Result<(IoWork, Vec<RawFd>), KvmError> {
    let mut taps = Vec::new();
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    for block in blocks {
        devices.push(Arc::new(Mutex::new(block)));
    }
    for net in nets {
        let tap = net.tap().as_raw_fd();
        let net = Arc::new(Mutex::new(net));
        taps.push(TapEvent {
            tap,
            net: net.clone(),
        });
        devices.push(net);
    }
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(KvmError::Config(format!(
            "backend kvm has room for {MAX_VIRTIO_DEVICES} disks and interfaces together"
        )));
    }
    let io = |what: &'static str| move |e: std::io::Error| KvmError::Config(format!("{what}: {e}"));
    let mut work = IoWork {
        queues: Vec::new(),
        taps,
        keep: Vec::new(),
    };
    let mut write_fds = Vec::new();
    for (index, device) in devices.into_iter().enumerate() {
        let (base, gsi) = slot(index);
        let transport =
            MmioTransport::new(mem.clone(), device.clone()).map_err(io("a virtio transport"))?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                event,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
                queue as u32,
            )
            .map_err(KvmError::os("KVM_IOEVENTFD"))?;
            write_fds.push(event.as_raw_fd());
            work.queues.push(QueueEvent {
                event: event.try_clone().map_err(io("duplicating an eventfd"))?,
                device: device.clone(),
                queue,
            });
        }
        let interrupt = transport.interrupt().clone();
        vm.register_irqfd(interrupt.event(), gsi)
            .map_err(KvmError::os("KVM_IRQFD"))?;
        write_fds.push(interrupt.event().as_raw_fd());
        work.keep.push(interrupt);
        mmio.insert(base, MMIO_WINDOW, Arc::new(Mutex::new(transport)))
            .map_err(|e| KvmError::Config(e.to_string()))?;
    }
    Ok((work, write_fds))
}

/// A net device's tap, as the I/O thread watches it (edge-triggered).
struct TapEvent {
    tap: RawFd,
    net: Arc<Mutex<Net>>,
}

/// Epoll data of the taps: this plus the tap's index (queues: their index).
const TAP_EVENT: u64 = 1 << 32;

/// What the I/O thread serves: each queue's EventFd and its device, and
/// the net devices' taps.
pub struct IoWork {
    queues: Vec<QueueEvent>,
    taps: Vec<TapEvent>,
    /// The interrupts stay alive with their irqfds.
    keep: Vec<Arc<super::Interrupt>>,
}

/// What the I/O thread calls with any arguments beyond
/// [`THREAD_SYSCALLS`], and why.
pub const IO_SYSCALLS: &[Allowed] = &[
    (libc::SYS_epoll_wait, "wait for queue notifications"),
    (
        libc::SYS_epoll_pwait,
        "wait for queue notifications (newer libc)",
    ),
    (
        libc::SYS_read,
        "consume a queue's EventFd; receive frames from a tap",
    ),
    (
        libc::SYS_write,
        "raise a device's interrupt; send frames to a tap; log a failure",
    ),
    (libc::SYS_pread64, "read a disk image"),
    (libc::SYS_pwrite64, "write a disk image"),
    (libc::SYS_fdatasync, "a guest's flush"),
    (libc::SYS_fsync, "a guest's flush"),
    (libc::SYS_fallocate, "a guest's discard on a raw image"),
    (libc::SYS_ftruncate, "a qcow2 image grows its tables"),
    (
        libc::SYS_mprotect,
        "memory allocator: the thread's arena grows",
    ),
];

/// What the I/O thread calls only with these arguments.
pub const IO_ARG_RULES: &[ArgRule] = &[ArgRule {
    nr: libc::SYS_ioctl,
    arg: 1,
    values: &[libc::TUNSETOFFLOAD],
    why: "a tap's offloads follow what the guest's driver accepted",
}];

/// The I/O thread's filter: [`IO_SYSCALLS`], [`IO_ARG_RULES`], sendmsg
/// only to the parent (the SIGSYS handler's report).
pub fn io_filter() -> Result<seccompiler::BpfProgram, String> {
    let rules = vec![MatchRule {
        nr: libc::SYS_sendmsg,
        args: vec![(0, crate::proc::CHILD_FD as u64)],
        why: "the SIGSYS handler reports a refused call to the parent",
    }];
    seccomp::compile_matching(&[THREAD_SYSCALLS, IO_SYSCALLS], &[IO_ARG_RULES], &rules)
        .map_err(|e| e.to_string())
}

/// The I/O thread: started as root before the drop, it waits for the
/// monitor's go (or gives up when the sender goes), installs its filter
/// and serves the queues for the VM process's life.
pub struct IoThread {
    go: Option<mpsc::Sender<()>>,
}

impl IoThread {
    pub fn spawn(work: IoWork) -> Result<IoThread, KvmError> {
        let filter = io_filter().map_err(|e| KvmError::Config(format!("the I/O filter: {e}")))?;
        let epoll = Epoll::new().map_err(|e| KvmError::Config(format!("epoll: {e}")))?;
        for (i, q) in work.queues.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    q.event.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(|e| KvmError::Config(format!("epoll: {e}")))?;
        }
        for (i, t) in work.taps.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    t.tap,
                    EpollEvent::new(
                        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                        TAP_EVENT + i as u64,
                    ),
                )
                .map_err(|e| KvmError::Config(format!("epoll: {e}")))?;
        }
        let (go, wait) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("virtio-io".into())
            .spawn(move || {
                if wait.recv().is_err() {
                    return;
                }
                if let Err(e) = seccompiler::apply_filter(&filter) {
                    crate::log::log_warn!("virtio: installing the I/O filter: {e}; no disk I/O");
                    return;
                }
                serve(&epoll, &work);
            })
            .map_err(|e| KvmError::Config(format!("starting the I/O thread: {e}")))?;
        Ok(IoThread { go: Some(go) })
    }

    /// Lets the thread install its filter and serve.
    pub fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
    }
}

fn serve(epoll: &Epoll, work: &IoWork) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::log::log_warn!("virtio: epoll_wait: {e}; no more device I/O");
                return;
            }
        };
        for event in &events[..n] {
            let data = event.data();
            if data >= TAP_EVENT {
                let Some(t) = work.taps.get((data - TAP_EVENT) as usize) else {
                    continue;
                };
                let set = event.event_set();
                let mut net = lock(&t.net);
                if set.contains(EventSet::OUT) {
                    net.on_tap_writable();
                }
                if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    net.on_tap_readable();
                }
                continue;
            }
            let Some(q) = work.queues.get(data as usize) else {
                continue;
            };
            let _ = q.event.read();
            lock(&q.device).process_queue(q.queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::kvm::boot::MEMORY_MIN;
    use crate::vm::kvm::virtio::mmio::{DEVICE_ID, MAGIC};
    use crate::vm::kvm::virtio::testdriver::{qcow2_overlay, run, TempDir};
    use crate::vm::kvm::Machine;
    use crate::vm::sock_pair;
    use common::disk::DiskFormat;
    use std::os::fd::OwnedFd;

    fn layer(
        path: &std::path::Path,
        disk: u8,
        layer: u8,
        format: DiskFormat,
        writable: bool,
    ) -> DiskLayer {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .expect("open a layer");
        DiskLayer {
            disk,
            layer,
            format,
            writable,
            fd: OwnedFd::from(file),
        }
    }

    /// The parent's layers, in any order, become one block device per
    /// disk, in disk order, each qcow2 over its backing file; the disks
    /// sit on the MMIO bus from 0xd0000000, one window each.
    #[test]
    fn virtio_attach_puts_the_parents_disks_on_the_mmio_bus() {
        let dir = TempDir::new("attach");
        let raw = dir.join("raw.img");
        std::fs::write(&raw, vec![0x5au8; 1 << 20]).expect("raw image");
        let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"]);
        qcow2_overlay(t);
        let layers = vec![
            layer(&base, 1, 1, DiskFormat::Qcow2, false),
            layer(&raw, 0, 0, DiskFormat::Raw, true),
            layer(&top, 1, 0, DiskFormat::Qcow2, true),
        ];
        let blocks = block_devices(layers).expect("block devices");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].image().format(), DiskFormat::Raw);
        assert_eq!(blocks[0].image().size(), 1 << 20);
        assert_eq!(blocks[1].image().format(), DiskFormat::Qcow2);
        assert_eq!(blocks[1].image().size(), 4 << 20);
        assert!(blocks[1].image().backing().is_some());

        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: the test needs KVM (kvm_pvm will do)"
        );
        let (_console, guest) = sock_pair("console").expect("socketpair");
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let mut machine = Machine::new(kvm, MEMORY_MIN, guest).expect("machine");
        let before = machine.write_fds.len();
        let io = machine
            .attach_virtio_devices(blocks, Vec::new())
            .expect("attach");
        assert!(io.is_some());
        assert_eq!(machine.virtio_devices, 2);
        // Each disk's one queue EventFd and its interrupt.
        assert_eq!(machine.write_fds.len(), before + 4);
        for (index, want) in [(0, super::super::TYPE_BLOCK), (1, super::super::TYPE_BLOCK)] {
            let (base, _) = slot(index);
            let mut data = [0u8; 4];
            assert!(machine.mmio.read(base, &mut data));
            assert_eq!(u32::from_le_bytes(data), MAGIC);
            assert!(machine.mmio.read(base + DEVICE_ID, &mut data));
            assert_eq!(u32::from_le_bytes(data), want);
        }
        let mut data = [0u8; 4];
        assert!(!machine.mmio.read(slot(2).0, &mut data));
    }

    #[test]
    fn virtio_attach_layout_and_the_io_filter() {
        assert_eq!(slot(0), (0xd000_0000, 5));
        assert_eq!(slot(MAX_VIRTIO_DEVICES - 1), (0xd000_3000, 8));
        assert!(io_filter().is_ok());
        assert!(IO_SYSCALLS.iter().all(|(_, why)| !why.is_empty()));
        assert!(dsdt_entries(0).is_empty());
        let two = dsdt_entries(2);
        assert_eq!(two.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
    }
}
