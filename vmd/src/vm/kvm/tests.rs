//! Tiny guests on this machine's /dev/kvm: hand-written x86-64 code,
//! assembled by the test with `as`, entered in 64-bit mode exactly as a
//! Linux kernel is (the boot GDT, page tables and vCPU setup), run by the
//! monitor's vCPU loop under the vCPU thread's own seccomp filter, with
//! the serial port, the i8042 and the ACPI registers on the port bus. On
//! kvm_pvm (a software hypervisor) they are slow but real.

use super::boot::{self, HIMEM_START, MEMORY_MIN};
use super::bus::lock;
use super::devices::serial::Serial;
use super::devices::{ExitKind, GuestExit};
use super::pause::{self, Pause};
use super::vcpu::{setup_vcpu, vcpu_filter, vcpu_run, vcpu_run_pausable, VcpuEnd};
use super::Machine;
use crate::vm::{set_nonblocking, sock_pair};
use kvm_ioctls::Kvm;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Generous: kvm_pvm and a loaded machine are slow; the tests wait for
/// events and only fail when nothing comes in this long.
const PATIENCE: Duration = Duration::from_secs(120);

/// Assembles `source` (AT&T syntax, 64-bit) into a flat binary.
fn assemble(name: &str, source: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("vmd-tiny-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("guest.S");
    let obj = dir.join("guest.o");
    let bin = dir.join("guest.bin");
    std::fs::write(&src, format!(".code64\n.text\n{source}\n")).expect("write source");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run the assembler (binutils)");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));
    let code = std::fs::read(&bin).expect("read the binary");
    let _ = std::fs::remove_dir_all(&dir);
    code
}

/// A tiny guest, its console's other end and its vCPU thread.
struct Tiny {
    console: OwnedFd,
    serial: Arc<Mutex<Serial>>,
    vcpu: std::thread::JoinHandle<VcpuEnd>,
    output: Vec<u8>,
    /// The vCPU's pause, its thread's id, and what it says when it
    /// parks (true) or goes on (false).
    pause: Arc<Pause>,
    exit: Arc<GuestExit>,
    tid: std::sync::mpsc::Receiver<libc::pid_t>,
    parked: std::sync::mpsc::Receiver<bool>,
}

impl Tiny {
    /// Boots `code` at 1 MiB in 64-bit mode; the vCPU runs in a thread
    /// under the vCPU filter.
    fn start(name: &str, source: &str) -> Tiny {
        Tiny::start_with(name, source, false)
    }

    /// [`Tiny::start`]; `apics`: the top GiB (IOAPIC, local APIC) mapped
    /// too, uncached, by a second page directory at 0x5000.
    fn start_with(name: &str, source: &str, apics: bool) -> Tiny {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: the tiny guests need KVM (kvm_pvm will do)"
        );
        let code = assemble(name, source);
        let (console, guest) = sock_pair("console").expect("socketpair");
        set_nonblocking(guest.as_raw_fd()).expect("non-blocking");
        set_nonblocking(console.as_raw_fd()).expect("non-blocking");
        let kvm = Kvm::new().expect("open /dev/kvm");
        let machine = Machine::new(kvm, MEMORY_MIN, guest).expect("machine");
        boot::write_boot_tables(&machine.mem).expect("boot tables");
        if apics {
            let pd = 0x5000u64;
            machine
                .mem
                .write_obj(pd | 3, GuestAddress(boot::PDPTE_ADDR + 3 * 8))
                .expect("pdpte");
            for i in 0..512u64 {
                // Present, writable, cache disabled, 2 MiB.
                let entry = ((3u64 << 30) + (i << 21)) | 0x93;
                machine
                    .mem
                    .write_obj(entry, GuestAddress(pd + i * 8))
                    .expect("pde");
            }
        }
        machine
            .mem
            .write_slice(&code, GuestAddress(HIMEM_START))
            .expect("load the code");
        setup_vcpu(&machine.kvm, &machine.vcpu, 0, GuestAddress(HIMEM_START)).expect("vcpu");
        let filter = vcpu_filter(machine.vcpu.as_raw_fd(), &machine.write_fds).expect("filter");
        let serial = machine.serial.clone();
        pause::install_kick_handler().expect("the kick's handler");
        let pause = Arc::new(Pause::default());
        let (tid_tx, tid) = std::sync::mpsc::channel();
        let (parked_tx, parked) = std::sync::mpsc::channel();
        let vcpu_pause = pause.clone();
        let guest_exit = machine.exit.clone();
        let vcpu = std::thread::spawn(move || {
            let Machine {
                mut vcpu,
                pio,
                mmio,
                exit,
                vm,
                mem,
                ..
            } = machine;
            let _ = tid_tx.send(pause::thread_id());
            seccompiler::apply_filter(&filter).expect("the vCPU filter");
            let report = |on: bool| {
                let _ = parked_tx.send(on);
            };
            let end = pause::with_immediate_exit(&mut vcpu, |vcpu| {
                let pause: (&Pause, &dyn Fn(bool)) = (&vcpu_pause, &report);
                vcpu_run_pausable(vcpu, &pio, &mmio, &exit, Some(pause))
            });
            drop((vm, mem));
            end
        });
        Tiny {
            console,
            serial,
            vcpu,
            output: Vec::new(),
            pause,
            exit: guest_exit,
            tid,
            parked,
        }
    }

    /// Reads what the console holds now, without waiting.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = nix::unistd::read(self.console.as_raw_fd(), &mut buf) {
            if n == 0 {
                break;
            }
            self.output.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads the console until it holds `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&self.output).contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} from the guest; it wrote {:?}",
                String::from_utf8_lossy(&self.output)
            );
            let mut pfd = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&self.console),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut pfd, 100u16);
            if let Ok(n) = nix::unistd::read(self.console.as_raw_fd(), &mut buf) {
                self.output.extend_from_slice(&buf[..n]);
            }
        }
    }

    /// How the vCPU's run ended.
    fn end(self) -> VcpuEnd {
        let deadline = Instant::now() + PATIENCE;
        while !self.vcpu.is_finished() {
            assert!(Instant::now() < deadline, "the vCPU did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.vcpu.join().expect("the vCPU thread panicked")
    }
}

/// Prints the NUL-terminated string at label `\label` (the macro `PUTS`).
const PUTS: &str = r#"
.macro PUTS label
    lea \label(%rip), %rsi
    call puts
.endm
"#;

/// The subroutines: `puts` writes the string at %rsi to COM1.
const LIB: &str = r#"
puts:
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, (%dx)
    jmp 1b
2:  ret
"#;

#[test]
fn a_tiny_guest_counts_on_its_console_and_powers_off() {
    let source = format!(
        r#"{PUTS}
    mov $0x8ff0, %rsp
    PUTS hello
    mov $'0', %bl
count:
    mov $20000, %rcx
spin:
    dec %rcx
    jnz spin
    mov %bl, %al
    mov $0x3f8, %dx
    out %al, (%dx)
    inc %bl
    cmp $'9', %bl
    jbe count
    PUTS done
    # ACPI S5: SLP_TYP 5, SLP_EN, on the sleep control register.
    mov $0x600, %dx
    mov $0x34, %al
    out %al, (%dx)
stuck:
    jmp stuck
{LIB}
hello: .asciz "tiny guest up\n"
done: .asciz "\ncounted\n"
"#
    );
    let mut tiny = Tiny::start("count", &source);
    tiny.wait_for("tiny guest up\n0123456789\ncounted\n");
    assert_eq!(tiny.end(), VcpuEnd::PowerOff);
}

#[test]
fn a_tiny_guest_pauses_and_goes_on_where_it_was() {
    // Counts 0 to 9 over and over, each digit after a busy loop: with
    // no exit but its output, only the kick can take it out of KVM_RUN.
    let source = r#"
    mov $0x3f8, %dx
    mov $'0', %bl
count:
    mov $200000, %rcx
spin:
    dec %rcx
    jnz spin
    mov %bl, %al
    out %al, (%dx)
    inc %bl
    cmp $'9', %bl
    jbe count
    mov $'0', %bl
    jmp count
"#;
    let mut tiny = Tiny::start("pause", source);
    tiny.wait_for("0123");
    let tid = tiny
        .tid
        .recv_timeout(PATIENCE)
        .expect("the vCPU's thread id");
    tiny.pause.ask(true);
    pause::kick(std::process::id() as libc::pid_t, tid).expect("kick");
    assert_eq!(tiny.parked.recv_timeout(PATIENCE), Ok(true), "parked");
    // Parked: nothing more comes, however long we look.
    tiny.drain();
    let at_pause = tiny.output.len();
    std::thread::sleep(Duration::from_millis(500));
    tiny.drain();
    assert_eq!(tiny.output.len(), at_pause, "output while paused");
    tiny.pause.ask(false);
    assert_eq!(tiny.parked.recv_timeout(PATIENCE), Ok(false), "went on");
    // It goes on where it was: the next digit follows the last one.
    let last = *tiny.output.last().expect("some output");
    let next = if last == b'9' { b'0' } else { last + 1 };
    let mut want = String::from_utf8_lossy(&tiny.output).to_string();
    want.push(next as char);
    tiny.wait_for(&want);
    // Twice more, the second kick while it may sit in an exit.
    for _ in 0..2 {
        tiny.pause.ask(true);
        pause::kick(std::process::id() as libc::pid_t, tid).expect("kick");
        assert_eq!(tiny.parked.recv_timeout(PATIENCE), Ok(true));
        tiny.pause.ask(false);
        assert_eq!(tiny.parked.recv_timeout(PATIENCE), Ok(false));
    }
    tiny.drain();
    let mut more = String::from_utf8_lossy(&tiny.output).to_string();
    more.push_str("0123456789");
    let more = more.split_off(more.len() - 10);
    tiny.wait_for(&more);
    // Ended from outside, as a power-off: asked, then kicked.
    tiny.exit.request(ExitKind::PowerOff);
    pause::kick(std::process::id() as libc::pid_t, tid).expect("kick");
    assert_eq!(tiny.end(), VcpuEnd::PowerOff);
}

#[test]
fn a_tiny_guest_echoes_serial_input_and_resets_through_the_i8042() {
    let source = format!(
        r#"{PUTS}
    mov $0x8ff0, %rsp
    PUTS ready
next:
    # Wait for data ready (LSR bit 0), read it, echo it.
    mov $0x3fd, %dx
wait:
    in (%dx), %al
    test $1, %al
    jz wait
    mov $0x3f8, %dx
    in (%dx), %al
    mov %al, %bl
    inc %al
    out %al, (%dx)
    cmp $'\n', %bl
    jne next
    PUTS bye
    # Pulse the CPU reset line through the keyboard controller.
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, (%dx)
stuck:
    jmp stuck
{LIB}
ready: .asciz "ready\n"
bye: .asciz "bye\n"
"#
    );
    let mut tiny = Tiny::start("echo", &source);
    tiny.wait_for("ready\n");
    // More than the 64-byte FIFO, in pieces as the guest drains it.
    let input: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).chain([b'\n']).collect();
    let mut given = 0;
    let deadline = Instant::now() + PATIENCE;
    while given < input.len() {
        assert!(Instant::now() < deadline, "the guest stopped reading input");
        given += lock(&tiny.serial).enqueue(&input[given..]);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Each byte comes back one higher ('\n' as 0x0b).
    let echoed: String = input[..100].iter().map(|b| (b + 1) as char).collect();
    tiny.wait_for(&format!("{echoed}\x0bbye\n"));
    assert_eq!(tiny.end(), VcpuEnd::Reset);
}

#[test]
fn a_tiny_guest_resets_through_the_acpi_reset_register_and_a_triple_fault() {
    let reg = format!(
        r#"{PUTS}
    mov $0x8ff0, %rsp
    PUTS hi
    mov $0x602, %dx
    mov $1, %al
    out %al, (%dx)
stuck:
    jmp stuck
{LIB}
hi: .asciz "acpi reset\n"
"#
    );
    let mut tiny = Tiny::start("acpireset", &reg);
    tiny.wait_for("acpi reset\n");
    assert_eq!(tiny.end(), VcpuEnd::Reset);

    // An empty IDT and an exception: a triple fault, which resets a PC.
    let fault = format!(
        r#"{PUTS}
    mov $0x8ff0, %rsp
    PUTS hi
    lidt empty(%rip)
    ud2
{LIB}
hi: .asciz "faulting\n"
empty: .word 0
    .quad 0
"#
    );
    let mut tiny = Tiny::start("triple", &fault);
    tiny.wait_for("faulting\n");
    assert_eq!(tiny.end(), VcpuEnd::Reset);
}

/// IOAPIC pin 4 programmed as Linux does, the UART's THR-empty interrupt
/// through the irqfd, woken from HLT: vector 0x24 and nothing else (an
/// unmasked LINT0 with KVM's unprogrammed 8259 behind it delivered a
/// stray ExtINT first, which stalled Linux's console).
#[test]
fn a_tiny_guest_gets_the_serial_interrupt_through_the_in_kernel_ioapic() {
    let source = format!(
        r#"{PUTS}
    mov $0x8ff0, %rsp
    # Every vector to `other`, then 0x24 to `handler`: an IDT at 0x3000.
    mov $0x3000, %rbx
    mov $256, %rcx
fill:
    lea other(%rip), %rax
    mov %ax, (%rbx)
    movw $8, 2(%rbx)
    movw $0x8e00, 4(%rbx)
    shr $16, %rax
    mov %ax, 6(%rbx)
    shr $16, %rax
    mov %eax, 8(%rbx)
    movl $0, 12(%rbx)
    add $16, %rbx
    dec %rcx
    jnz fill
    lea handler(%rip), %rax
    mov $0x3240, %rbx
    mov %ax, (%rbx)
    movw $8, 2(%rbx)
    movw $0x8e00, 4(%rbx)
    shr $16, %rax
    mov %ax, 6(%rbx)
    shr $16, %rax
    mov %eax, 8(%rbx)
    movl $0, 12(%rbx)
    lidt idtr(%rip)
    # The local APIC on (spurious vector 0xff), IOAPIC pin 4 to vector
    # 0x24 on APIC 0, edge, active high: ISA IRQ 4 as Linux sets it.
    mov $0xfee000f0, %rdi
    movl $0x1ff, (%rdi)
    mov $0xfec00000, %rdi
    movl $0x18, (%rdi)
    movl $0x24, 0x10(%rdi)
    movl $0x19, (%rdi)
    movl $0, 0x10(%rdi)
    PUTS ready
    # THR empty interrupts on: the UART raises IRQ 4 at once.
    mov $0x3f9, %dx
    mov $2, %al
    out %al, (%dx)
    sti
wait:
    hlt
    jmp wait
other:
    PUTS wrong
1:  jmp 1b
handler:
    PUTS got
    # End of interrupt, then ACPI S5.
    mov $0xfee000b0, %rdi
    movl $0, (%rdi)
    mov $0x600, %dx
    mov $0x34, %al
    out %al, (%dx)
    iretq
{LIB}
ready: .asciz "ready\n"
got: .asciz "irq 4\n"
wrong: .asciz "another vector\n"
idtr: .word 0xfff
    .quad 0x3000
"#
    );
    let mut tiny = Tiny::start_with("irq", &source, true);
    tiny.wait_for("ready\nirq 4\n");
    assert_eq!(tiny.end(), VcpuEnd::PowerOff);
}

/// Linux's last resort on a hardware-reduced platform without EFI is a
/// jump to the BIOS's reset vector in real mode: vmd's stub there resets
/// through the ACPI reset register.
#[test]
fn a_vcpu_at_the_real_mode_reset_vector_resets() {
    use super::devices::power::{RESET_REGISTER, RESET_VALUE};
    assert_eq!(
        u16::from_le_bytes([boot::RESET_STUB[1], boot::RESET_STUB[2]]) as u64,
        RESET_REGISTER
    );
    assert_eq!(boot::RESET_STUB[4], RESET_VALUE);
    let (_console, guest) = sock_pair("console").expect("socketpair");
    set_nonblocking(guest.as_raw_fd()).expect("non-blocking");
    let machine =
        Machine::new(Kvm::new().expect("open /dev/kvm"), MEMORY_MIN, guest).expect("machine");
    boot::write_boot_tables(&machine.mem).expect("boot tables");
    let mut sregs = machine.vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0xf0000;
    sregs.cs.selector = 0xf000;
    machine.vcpu.set_sregs(&sregs).expect("sregs");
    let mut regs = machine.vcpu.get_regs().expect("regs");
    regs.rip = 0xfff0;
    machine.vcpu.set_regs(&regs).expect("regs");
    let Machine {
        mut vcpu,
        pio,
        mmio,
        exit,
        vm,
        mem,
        ..
    } = machine;
    assert_eq!(vcpu_run(&mut vcpu, &pio, &mmio, &exit), VcpuEnd::Reset);
    drop((vm, mem));
}
