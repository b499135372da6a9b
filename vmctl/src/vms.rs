//! The commands vmctl sends to vmd: status, start, stop, wait, pause,
//! unpause, load, reload, reset and log, with OpenBSD vmctl's messages;
//! console finds the VM's tty here and attaches in console.rs. send and
//! receive are in send.rs.

use crate::client::Client;
use crate::console::{self, Ended};
use crate::{command_usage, Global};
use common::config::{
    check_request_path, BootDevice, ConfigFileError, Disk, Interface, VmConfig, MAX_CMDLINE,
    MAX_DISKS, MAX_INTERFACES,
};
use common::ctl::{CtlError, CtlRequest, ResetWhat, StartRequest, VmTarget};
use common::disk::DiskFormat;
use common::getopt::{Getopt, Opt};
use common::imsg::Message;
use common::name::{check_vm_name, NameError, VM_NAME_MAX};
use common::status::{self, VmInfo};
use nix::errno::Errno;
use std::path::Path;
use std::process::ExitCode;

const MEGABYTE: u64 = 1 << 20;

/// Prints `vmctl: MESSAGE` and fails.
pub(crate) fn fail(message: &str) -> ExitCode {
    errln!("vmctl: {message}");
    ExitCode::FAILURE
}

fn strerror(errno: i32) -> &'static str {
    Errno::from_raw(errno).desc()
}

/// Connects and sends one request.
pub(crate) fn request(global: &Global, req: CtlRequest) -> Result<Client, ExitCode> {
    let mut client = Client::connect(global).map_err(|e| fail(&e))?;
    client.send(req).map_err(|e| fail(&e))?;
    Ok(client)
}

/// The next answer; a connection error or a `CtlFail` ends vmctl.
pub(crate) fn answer(client: &mut Client) -> Result<Message, ExitCode> {
    match client.receive().map_err(|e| fail(&e))? {
        Message::CtlFail { errno, lines } => {
            for line in lines {
                errln!("{line}");
            }
            Err(if errno != 0 {
                fail(&format!("command failed: {}", strerror(errno)))
            } else {
                fail("command failed")
            })
        }
        message => Ok(message),
    }
}

pub(crate) fn unexpected() -> ExitCode {
    fail("unexpected response received from vmd")
}

/// parse_vmid: a number is an id, anything else a name; a word starting
/// with '-' is no id at all. The error is the one line vmctl prints.
pub(crate) fn parse_vmid(word: &str) -> Result<VmTarget, String> {
    if word.starts_with('-') {
        return Err(format!("invalid id: {word}"));
    }
    let target = VmTarget::parse(word);
    if let VmTarget::Name(name) = &target {
        if name.len() >= VM_NAME_MAX {
            return Err(NameError::TooLong.to_string());
        }
    }
    Ok(target)
}

/// The single `id` argument of console, pause, unpause, wait and send.
pub(crate) fn one_vmid(name: &str, args: &[String]) -> Result<VmTarget, ExitCode> {
    match args {
        [word] => parse_vmid(word).map_err(|e| fail(&e)),
        _ => Err(command_usage(name)),
    }
}

/// Sends a command answered by `CtlOk` (load, reload, reset, log).
fn simple(global: &Global, req: CtlRequest) -> ExitCode {
    let mut client = match request(global, req) {
        Ok(client) => client,
        Err(code) => return code,
    };
    match answer(&mut client) {
        Ok(Message::CtlOk { lines }) => {
            for line in lines {
                errln!("vmctl: {line}");
            }
            ExitCode::SUCCESS
        }
        Ok(_) => unexpected(),
        Err(code) => code,
    }
}

// --- status ---

/// Every VM vmd knows.
fn vm_list(global: &Global) -> Result<Vec<VmInfo>, ExitCode> {
    let mut client = request(global, CtlRequest::Status)?;
    let mut vms = Vec::new();
    loop {
        match answer(&mut client)? {
            Message::CtlVm(info) => vms.push(info),
            Message::CtlVmEnd => return Ok(vms),
            _ => return Err(unexpected()),
        }
    }
}

/// `status [-r] [id]` (and `show`): the table, or with `-j` one JSON
/// object per VM; exit 1 when it has no rows.
pub fn status(global: &Global, args: &[String]) -> ExitCode {
    let mut running_only = false;
    let mut getopt = Getopt::new(args, "r", &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short('r', _)) => running_only = true,
            _ => return command_usage("status"),
        }
    }
    let target = match getopt.operands() {
        [] => None,
        [word] => match parse_vmid(word) {
            Ok(target) => Some(target),
            Err(e) => return fail(&e),
        },
        _ => return command_usage("status"),
    };
    let vms = match vm_list(global) {
        Ok(vms) => vms,
        Err(code) => return code,
    };
    // A VM named that vmd does not know: no empty table, but the reason.
    if let Some(target) = &target {
        if !vms.iter().any(|vm| target.matches(vm.id, &vm.name)) {
            return fail("vm not found");
        }
    }
    let shown: Vec<VmInfo> = vms
        .into_iter()
        .filter(|vm| !running_only || vm.state.is_active())
        .filter(|vm| target.as_ref().is_none_or(|t| t.matches(vm.id, &vm.name)))
        .collect();
    let text = match global.json {
        true => shown
            .iter()
            .map(|vm| format!("{}\n", crate::json::status(vm)))
            .collect(),
        false => status::format_table(&shown),
    };
    if let Err(code) = crate::write_stdout(&text) {
        return code;
    }
    if shown.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// --- start ---

/// A path made absolute and checked to exist (realpath), as vmctl sends
/// every path, and no longer than vmd takes (its own words if not);
/// `what` names it in the error.
fn real_path(path: &str, what: &str) -> Result<String, ExitCode> {
    let invalid = |why: &str| fail(&format!("invalid {what} path: {why}"));
    check_request_path(path).map_err(|e| invalid(&e))?;
    let real = std::fs::canonicalize(path).map_err(|e| {
        let why = e
            .raw_os_error()
            .map_or(e.to_string(), |n| strerror(n).to_string());
        invalid(&why)
    })?;
    check_request_path(&real).map_err(|e| invalid(&e))?;
    real.into_os_string()
        .into_string()
        .map_err(|_| invalid("not valid UTF-8"))
}

/// Parses `-m SIZE` (parse_size): at least a megabyte, rounded down.
fn memory_size(word: &str) -> Result<u64, ExitCode> {
    let bytes = match common::size::parse(word) {
        Ok(bytes) => bytes,
        Err(e) => return Err(fail(&format!("invalid memory size: {word}: {e}"))),
    };
    if bytes < MEGABYTE {
        return Err(fail(&format!(
            "invalid memory size: {word}: must be at least one megabyte"
        )));
    }
    let rounded = bytes / MEGABYTE * MEGABYTE;
    if rounded != bytes {
        errln!("vmctl: size rounded to {} megabytes", bytes / MEGABYTE);
    }
    Ok(rounded)
}

const START_LONG: &[(&str, bool)] = &[("initrd", true), ("cmdline", true)];

/// `start id | name [-cL] [-B device] [-b path] [-d disk] [-i count]
/// [-m size] [-n switch] [-r path] [-t name] [--initrd path] [--cmdline
/// string]`.
fn start_parse(args: &[String]) -> Result<(StartRequest, bool), ExitCode> {
    let Some((word, rest)) = args.split_first() else {
        return Err(command_usage("start"));
    };
    let target = parse_vmid(word).map_err(|e| fail(&e))?;
    let mut vm = VmConfig::new(match &target {
        VmTarget::Name(name) => name,
        VmTarget::Id(_) => "",
    });
    let mut autoconnect = false;
    let mut count: Option<usize> = None;
    for opt in Getopt::new(rest, "b:B:cd:i:Lm:n:r:t:", START_LONG) {
        match opt {
            Ok(Opt::Short('b', Some(path))) => {
                if vm.boot.is_some() {
                    return Err(fail("boot image specified multiple times"));
                }
                vm.boot = Some(real_path(&path, "boot image")?);
            }
            Ok(Opt::Short('B', Some(dev))) => {
                if vm.boot_device.is_some() {
                    return Err(fail("boot device specified multiple times"));
                }
                vm.boot_device = Some(match dev.as_str() {
                    "disk" => BootDevice::Disk,
                    "cdrom" => BootDevice::Cdrom,
                    "net" => BootDevice::Net,
                    _ => return Err(fail(&format!("unknown boot device {dev}"))),
                });
            }
            Ok(Opt::Short('r', Some(path))) => {
                if vm.cdrom.is_some() {
                    return Err(fail("iso image specified multiple times"));
                }
                vm.cdrom = Some(real_path(&path, "iso image")?);
            }
            Ok(Opt::Short('c', _)) => autoconnect = true,
            Ok(Opt::Short('L', _)) => vm.interfaces.push(Interface {
                local: true,
                ..Interface::default()
            }),
            Ok(Opt::Short('m', Some(size))) => {
                if vm.memory.is_some() {
                    return Err(fail("memory specified multiple times"));
                }
                vm.memory = Some(memory_size(&size)?);
            }
            Ok(Opt::Short('n', Some(switch))) => vm.interfaces.push(Interface {
                switch: Some(switch),
                ..Interface::default()
            }),
            Ok(Opt::Short('d', Some(arg))) => {
                let (format, path) = DiskFormat::split_prefixed(&arg);
                let path = real_path(path, "disk")?;
                vm.disks.push(Disk { path, format });
                if let Some(path) = vm.repeated_disk() {
                    return Err(fail(&format!("disk {path} is given twice")));
                }
            }
            Ok(Opt::Short('i', Some(n))) => {
                if count.is_some() {
                    return Err(fail("interfaces specified multiple times"));
                }
                match n.parse::<usize>() {
                    Ok(n) if n <= i32::MAX as usize => count = Some(n),
                    _ => {
                        let why = if n.parse::<i64>().is_ok() {
                            "too large"
                        } else {
                            "invalid"
                        };
                        return Err(fail(&format!("invalid interface count: {n}: {why}")));
                    }
                }
            }
            Ok(Opt::Short('t', Some(name))) => {
                if name.len() >= VM_NAME_MAX {
                    return Err(fail("instance vm name too long"));
                }
                vm.instance_of = Some(name);
            }
            Ok(Opt::Long("initrd", Some(path))) => vm.initrd = Some(real_path(&path, "initrd")?),
            Ok(Opt::Long("cmdline", Some(line))) => {
                if line.len() >= MAX_CMDLINE {
                    return Err(fail("kernel command line too long"));
                }
                vm.cmdline = Some(line);
            }
            Ok(_) => return Err(command_usage("start")),
            Err(e) => {
                errln!("vmctl: {e}");
                return Err(command_usage("start"));
            }
        }
    }
    vm.interface_count = count;
    // Local interfaces come first (vio0, eth0 in the guest), then those
    // on switches, in the order given; `-i` adds default ones after.
    vm.interfaces.sort_by_key(|i| !i.local);
    start_check(&vm, &target)?;
    Ok((StartRequest { target, vm }, autoconnect))
}

/// vm_start's checks of a new VM's settings, before anything is sent.
fn start_check(vm: &VmConfig, target: &VmTarget) -> Result<(), ExitCode> {
    let nics = vm.interface_total();
    let sets_something = vm.memory.is_some()
        || nics > 0
        || !vm.disks.is_empty()
        || vm.boot.is_some()
        || vm.cdrom.is_some();
    if vm.instance_of.is_none() && sets_something {
        if vm.disks.len() > MAX_DISKS {
            return Err(fail("too many disks"));
        }
        if nics > MAX_INTERFACES {
            return Err(fail("too many network interfaces"));
        }
        // Without a kernel, disk or CD-ROM, vmd decides (a configured VM
        // refuses the options, a new one needs one of them): no warnings
        // about a VM that may not be new.
        let boots = vm.boot.is_some() || !vm.disks.is_empty() || vm.cdrom.is_some();
        if boots && vm.boot.is_none() && vm.disks.is_empty() {
            errln!("vmctl: starting without disks");
        }
        if boots && vm.boot.is_none() && nics == 0 {
            errln!("vmctl: starting without network interfaces");
        }
    }
    if let VmTarget::Name(name) = target {
        check_vm_name(name).map_err(|e| fail(&e.to_string()))?;
    }
    Ok(())
}

pub fn start(global: &Global, args: &[String]) -> ExitCode {
    let (req, autoconnect) = match start_parse(args) {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let mut client = match request(global, CtlRequest::Start(Box::new(req))) {
        Ok(client) => client,
        Err(code) => return code,
    };
    match answer(&mut client) {
        Ok(Message::CtlVmResult {
            error: Some(error), ..
        }) => match error {
            CtlError::Errno(_)
            | CtlError::Explained { .. }
            | CtlError::Text(_)
            | CtlError::StopInvalid => {
                fail(&format!("start vm command failed: {}", error.describe()))
            }
            other => fail(&other.describe()),
        },
        Ok(Message::CtlVmResult { vmid, tty, .. }) => {
            let tty = tty.unwrap_or_default();
            errln!("vmctl: started vm {vmid} successfully, tty {tty}");
            if autoconnect {
                // vmd's answer is in: nothing more comes on this socket.
                drop(client);
                return console_run(&tty);
            }
            ExitCode::SUCCESS
        }
        Ok(_) => unexpected(),
        Err(code) => code,
    }
}

// --- stop and wait ---

/// What vmctl asked: `stop` (with its -f and -w) or `wait` for a VM.
enum Asked<'a> {
    Stop { force: bool, wait: bool },
    Wait(&'a VmTarget),
}

/// Reads the answers to a stop or wait (terminate_vm_complete): the
/// request's result and, when waiting, the VM's end. The caller has
/// printed `stopping vm NAME: ` or `waiting for vm NAME: `.
fn stop_complete(client: &mut Client, asked: Asked) -> ExitCode {
    let (force, wait) = match asked {
        Asked::Stop { force, wait } => (force, wait),
        Asked::Wait(_) => (false, true),
    };
    let message = match answer(client) {
        Ok(message) => message,
        Err(code) => return code,
    };
    match message {
        Message::CtlVmResult {
            vmid, error: None, ..
        } => {
            if force && !wait {
                errln!("forced to terminate vm {vmid}");
            } else {
                errln!("requested to shutdown vm {vmid}");
            }
            ExitCode::SUCCESS
        }
        Message::CtlVmResult {
            error: Some(error), ..
        } => {
            match (error, asked) {
                // Unlike OpenBSD's EINVAL: what `wait` waits for holds.
                (CtlError::StopInvalid, Asked::Wait(target)) => {
                    let vm = match target {
                        VmTarget::Name(name) => name.clone(),
                        VmTarget::Id(id) => id.to_string(),
                    };
                    errln!("vm {vm} is not running");
                    return ExitCode::SUCCESS;
                }
                (CtlError::StopInvalid, _) => errln!("cannot stop vm that is not running"),
                (CtlError::Errno(libc::ENOENT), _) => errln!("vm not found"),
                (CtlError::Errno(libc::EINTR), _) => errln!("interrupted call"),
                (CtlError::Explained { why, .. }, _) => errln!("{why}"),
                (other, _) => errln!("failed: {}", other.describe()),
            }
            ExitCode::FAILURE
        }
        Message::CtlTerminated { vmid, timed_out } => {
            if timed_out {
                errln!("forced to terminate vm {vmid} after the shutdown timeout");
            } else if wait {
                errln!("terminated vm {vmid}");
            } else if force {
                errln!("forced to terminate vm {vmid}");
            }
            ExitCode::SUCCESS
        }
        _ => {
            errln!("unexpected response received from vmd");
            ExitCode::FAILURE
        }
    }
}

fn stop_one(client: &mut Client, target: VmTarget, force: bool, wait: bool) -> ExitCode {
    match &target {
        VmTarget::Name(name) => err!("stopping vm {name}: "),
        VmTarget::Id(_) => err!("stopping vm: "),
    }
    if let Err(e) = client.send(CtlRequest::Stop {
        target,
        force,
        wait,
    }) {
        return fail(&e);
    }
    stop_complete(client, Asked::Stop { force, wait })
}

/// `stop [id | -a] [-fw]` (the id may also follow the flags).
pub fn stop(global: &Global, args: &[String]) -> ExitCode {
    let Some(first) = args.first() else {
        return command_usage("stop");
    };
    let mut target = if first.starts_with('-') {
        None
    } else {
        match parse_vmid(first) {
            Ok(target) => Some(target),
            Err(e) => return fail(&e),
        }
    };
    let rest = if target.is_some() { &args[1..] } else { args };
    let (mut force, mut wait, mut all) = (false, false, false);
    let mut getopt = Getopt::new(rest, "afw", &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short('f', _)) => force = true,
            Ok(Opt::Short('w', _)) => wait = true,
            Ok(Opt::Short('a', _)) => all = true,
            _ => return command_usage("stop"),
        }
    }
    match getopt.operands() {
        [] => {}
        [word] if target.is_none() && !all => match parse_vmid(word) {
            Ok(parsed) => target = Some(parsed),
            Err(e) => return fail(&e),
        },
        _ => return command_usage("stop"),
    }
    if all == target.is_some() {
        return fail(&format!("invalid id: {first}"));
    }
    let Some(target) = target else {
        // Which VMs are the user's is the remote user's question.
        if let Some(host) = &global.remote {
            return crate::remote::run_whole(global, host, "stop", args);
        }
        return stop_all(global, force, wait);
    };
    let mut client = match Client::connect(global) {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    stop_one(&mut client, target, force, wait)
}

/// Whether this user may stop a running VM as `status` lists it (the
/// user who started it, or its owner group); vmd checks again.
fn may_stop(vm: &VmInfo) -> bool {
    let uid = nix::unistd::getuid().as_raw();
    let in_group = |gid: u32| {
        nix::unistd::getgid().as_raw() == gid
            || nix::unistd::getgroups()
                .unwrap_or_default()
                .iter()
                .any(|g| g.as_raw() == gid)
    };
    uid == 0 || vm.owner_uid == uid || vm.owner_gid.is_some_and(in_group)
}

/// `stop -a`: every running VM the user may stop, by name.
fn stop_all(global: &Global, force: bool, wait: bool) -> ExitCode {
    let vms = match vm_list(global) {
        Ok(vms) => vms,
        Err(code) => return code,
    };
    let mut client = match Client::connect(global) {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let mut code = ExitCode::SUCCESS;
    for vm in vms
        .into_iter()
        .filter(|vm| vm.state.is_active() && may_stop(vm))
    {
        if stop_one(&mut client, VmTarget::Name(vm.name), force, wait) != ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    code
}

/// `wait id`: until the VM ends.
pub fn wait(global: &Global, args: &[String]) -> ExitCode {
    let target = match one_vmid("wait", args) {
        Ok(target) => target,
        Err(code) => return code,
    };
    match &target {
        VmTarget::Name(name) => err!("waiting for vm {name}: "),
        VmTarget::Id(_) => err!("waiting for vm: "),
    }
    let request_target = target.clone();
    let mut client = match request(global, CtlRequest::Wait { target }) {
        Ok(client) => client,
        Err(code) => return code,
    };
    stop_complete(&mut client, Asked::Wait(&request_target))
}

// --- pause and unpause ---

fn pause_or_unpause(global: &Global, args: &[String], pause: bool) -> ExitCode {
    let name = if pause { "pause" } else { "unpause" };
    let target = match one_vmid(name, args) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let req = if pause {
        CtlRequest::Pause { target }
    } else {
        CtlRequest::Unpause { target }
    };
    let mut client = match request(global, req) {
        Ok(client) => client,
        Err(code) => return code,
    };
    match answer(&mut client) {
        Ok(Message::CtlVmResult {
            error: Some(error), ..
        }) => fail(&format!("{name} vm command failed: {}", error.describe())),
        Ok(Message::CtlVmResult { vmid, .. }) => {
            errln!("vmctl: {name}d vm {vmid} successfully");
            ExitCode::SUCCESS
        }
        Ok(_) => unexpected(),
        Err(code) => code,
    }
}

pub fn pause(global: &Global, args: &[String]) -> ExitCode {
    pause_or_unpause(global, args, true)
}

pub fn unpause(global: &Global, args: &[String]) -> ExitCode {
    pause_or_unpause(global, args, false)
}

// --- console ---

/// `console id`: the VM's tty from a status request (vm_console), then
/// the relay; `console not found` when the VM does not exist or has no
/// tty (it is not running).
pub fn console(global: &Global, args: &[String]) -> ExitCode {
    let target = match one_vmid("console", args) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let vms = match vm_list(global) {
        Ok(vms) => vms,
        Err(code) => return code,
    };
    let tty = vms
        .into_iter()
        .filter(|vm| target.matches(vm.id, &vm.name) && vm.state.is_active())
        .find_map(|vm| vm.tty.filter(|tty| !tty.is_empty()));
    match tty {
        Some(tty) => console_run(&tty),
        None => fail("console not found"),
    }
}

/// Attaches to `tty` and says how the session ended.
fn console_run(tty: &str) -> ExitCode {
    match console::console_attach(tty) {
        Ok(Ended::Left) => ExitCode::SUCCESS,
        Ok(Ended::VmStopped) => {
            errln!("\r\nvmctl: the console closed: the vm stopped");
            ExitCode::SUCCESS
        }
        Ok(Ended::Signal(sig)) => fail(&format!("console left on {}", sig.as_str())),
        Err(e) => fail(&e.to_string()),
    }
}

// --- configuration ---

/// `load filename`: sent as an absolute path (vmd runs in /).
pub fn load(global: &Global, args: &[String]) -> ExitCode {
    let [file] = args else {
        return command_usage("load");
    };
    let path = match std::path::absolute(Path::new(file)) {
        Ok(path) => path.display().to_string(),
        Err(e) => return fail(&format!("{file}: {e}")),
    };
    // vmd would refuse it with these words.
    if let Err(why) = check_request_path(&path) {
        return fail(&ConfigFileError::Path(why).line(Path::new(&path)));
    }
    simple(global, CtlRequest::Load { path })
}

pub fn reload(global: &Global, args: &[String]) -> ExitCode {
    if !args.is_empty() {
        return command_usage("reload");
    }
    simple(global, CtlRequest::Reload)
}

/// `reset [all | switches | vms]`.
pub fn reset(global: &Global, args: &[String]) -> ExitCode {
    let what = match args {
        [] => ResetWhat::All,
        [word] => match word.to_ascii_lowercase().as_str() {
            "all" => ResetWhat::All,
            "vms" => ResetWhat::Vms,
            "switches" => ResetWhat::Switches,
            _ => return command_usage("reset"),
        },
        _ => return command_usage("reset"),
    };
    simple(global, CtlRequest::Reset { what })
}

/// `log brief | verbose` (either may be abbreviated).
pub fn log(global: &Global, args: &[String]) -> ExitCode {
    let [word] = args else {
        return command_usage("log");
    };
    let word = word.to_ascii_lowercase();
    let level = if "brief".starts_with(&word) {
        0
    } else if "verbose".starts_with(&word) {
        2
    } else {
        return command_usage("log");
    };
    simple(global, CtlRequest::Verbose { level })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn start_options() {
        let dir = std::env::temp_dir();
        let disk = dir.join(format!("vmctl-start-{}.qcow2", std::process::id()));
        std::fs::write(&disk, b"").unwrap();
        let d = disk.display().to_string();
        let (req, c) = start_parse(&args(&[
            "web",
            "-c",
            "-m",
            "1G",
            "-L",
            "-n",
            "sw0",
            "-i",
            "3",
            "-d",
            &d,
            "--cmdline",
            "console=ttyS0",
            "-B",
            "net",
        ]))
        .unwrap();
        std::fs::remove_file(&disk).unwrap();
        assert!(c);
        assert_eq!(req.target, VmTarget::Name("web".into()));
        assert_eq!(req.vm.memory, Some(1 << 30));
        assert_eq!(req.vm.interfaces.len(), 2);
        assert!(req.vm.interfaces[0].local);
        assert_eq!(req.vm.interfaces[1].switch.as_deref(), Some("sw0"));
        assert_eq!(req.vm.interface_total(), 3);
        assert_eq!(req.vm.disks[0].format, DiskFormat::Qcow2);
        assert!(req.vm.disks[0].path.starts_with('/'));
        assert_eq!(req.vm.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(req.vm.boot_device, Some(BootDevice::Net));
        let (req, _) = start_parse(&args(&["7"])).unwrap();
        assert_eq!(req.target, VmTarget::Id(7));
        assert!(start_parse(&args(&["x", "-m", "1K"])).is_err());
        assert!(start_parse(&args(&["x", "-d", "/nonexistent/disk"])).is_err());
        let long = format!("/{}", "a".repeat(common::config::MAX_REQUEST_PATH));
        assert!(start_parse(&args(&["x", "-d", &long])).is_err());
        assert!(start_parse(&args(&["-x"])).is_err());
        assert!(start_parse(&args(&["x", "-m", "1G", "-m", "2G"])).is_err());
    }
}
