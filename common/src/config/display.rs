//! `vmd -n -v`: the effective configuration, written as vm.conf that
//! reads back to the same configuration.

use super::checks::format_lladdr;
use super::types::*;
use std::fmt;

/// A string in double quotes, as the lexer reads it back.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\\\""))
}

fn owner(o: &Owner) -> String {
    let user = match &o.user {
        Some(name) => name.clone(),
        None if o.gid.is_some() && o.uid == 0 => String::new(),
        None => o.uid.to_string(),
    };
    match &o.group {
        Some(group) => format!("{user}:{group}"),
        None => user,
    }
}

fn interface(iface: &Interface) -> String {
    let mut line = String::new();
    if iface.local {
        line.push_str("local ");
    }
    line.push_str("interface");
    if let Some(tap) = &iface.tap {
        line.push_str(&format!(" {}", quote(tap)));
    }
    let mut opts = Vec::new();
    if let Some(sw) = &iface.switch {
        opts.push(format!("switch {}", quote(sw)));
    }
    if let Some(group) = &iface.group {
        opts.push(format!("group {}", quote(group)));
    }
    match (iface.locked, &iface.lladdr) {
        (true, Some(mac)) => opts.push(format!("locked lladdr {}", format_lladdr(mac))),
        (true, None) => opts.push("locked lladdr".to_string()),
        (false, Some(mac)) => opts.push(format!("lladdr {}", format_lladdr(mac))),
        (false, None) => {}
    }
    if let Some(rdomain) = iface.rdomain {
        opts.push(format!("rdomain {rdomain}"));
    }
    opts.push(if iface.up { "up" } else { "down" }.to_string());
    format!("{line} {{ {} }}", opts.join(", "))
}

fn allow_instance(allow: &AllowInstance) -> String {
    let mut flags: Vec<String> = [
        (allow.boot, "boot"),
        (allow.cdrom, "cdrom"),
        (allow.disk, "disk"),
        (allow.instance, "instance"),
        (allow.interface, "interface"),
        (allow.memory, "memory"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_string())
    .collect();
    if let Some(o) = &allow.owner {
        flags.push(format!("owner {}", owner(o)));
    }
    format!("allow instance {{ {} }}", flags.join(", "))
}

/// A limit block's keys: `{ vms 4 memory 8192M vcpus 8 }`.
fn limits(l: &Limits) -> String {
    let mut keys = Vec::new();
    if let Some(vms) = l.vms {
        keys.push(format!("vms {vms}"));
    }
    if let Some(memory) = l.memory {
        keys.push(format!("memory {}M", memory >> 20));
    }
    if let Some(vcpus) = l.vcpus {
        keys.push(format!("vcpus {vcpus}"));
    }
    format!("{{ {} }}", keys.join(" "))
}

fn staggered(globals: &Globals) -> StaggeredStart {
    globals.staggered_start.unwrap_or_else(|| StaggeredStart {
        parallel: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        delay: DEFAULT_STAGGERED_DELAY,
    })
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let g = &self.globals;
        writeln!(
            f,
            "local prefix {}/{}",
            g.local_prefix.addr, g.local_prefix.len
        )?;
        match (g.local_inet6, &g.local_prefix6) {
            (true, Some(p)) => writeln!(f, "local inet6 prefix {}/{}", p.addr, p.len)?,
            (true, None) => writeln!(f, "local inet6")?,
            (false, _) => {}
        }
        let mut socket = g.socket_owner.clone();
        if socket.gid.is_none() {
            socket.gid = Some(0);
            socket.group = Some("root".to_string());
        }
        if socket.user.is_none() && socket.uid == 0 {
            socket.user = Some("root".to_string());
        }
        writeln!(f, "socket owner {}", owner(&socket))?;
        let stagger = staggered(g);
        writeln!(
            f,
            "staggered start parallel {} delay {}",
            stagger.parallel, stagger.delay
        )?;
        writeln!(f, "accel {}", g.accel.keyword())?;
        writeln!(
            f,
            "console log {} size {}",
            quote(&g.console_log_dir),
            exact_size(g.console_log_size)
        )?;
        if g.console_log_keep {
            writeln!(f, "console log keep")?;
        }
        writeln!(f, "shutdown timeout {}", g.shutdown_timeout)?;
        writeln!(f, "uid range {}-{}", g.uid_range.first, g.uid_range.last)?;
        let users = Limits {
            vms: g.user_limits.vms.or(Some(DEFAULT_USER_VMS)),
            memory: g.user_limits.memory.or(Some(DEFAULT_USER_MEMORY)),
            vcpus: g.user_limits.vcpus.or(Some(DEFAULT_USER_VCPUS)),
        };
        writeln!(f, "limit users {}", limits(&users))?;
        for l in &g.limits {
            let user = if l.user.bytes().all(|b| b.is_ascii_digit()) {
                l.user.clone()
            } else {
                quote(&l.user)
            };
            writeln!(f, "limit user {user} {}", limits(&l.limits))?;
        }

        for sw in &self.switches {
            writeln!(f, "\nswitch {} {{", quote(&sw.name))?;
            writeln!(f, "\t{}", if sw.enabled { "enable" } else { "disable" })?;
            writeln!(f, "\tinterface {}", quote(&sw.interface))?;
            if let Some(group) = &sw.group {
                writeln!(f, "\tgroup {}", quote(group))?;
            }
            if sw.locked_lladdr {
                writeln!(f, "\tlocked lladdr")?;
            }
            if let Some(rdomain) = sw.rdomain {
                writeln!(f, "\trdomain {rdomain}")?;
            }
            writeln!(f, "\t{}", if sw.up { "up" } else { "down" })?;
            writeln!(f, "}}")?;
        }

        for vm in &self.vms {
            let vm = &self.resolved_vm(vm);
            match &vm.instance_of {
                Some(parent) => {
                    writeln!(f, "\nvm {} instance {} {{", quote(parent), quote(&vm.name))?
                }
                None => writeln!(f, "\nvm {} {{", quote(&vm.name))?,
            }
            writeln!(f, "\t{}", if vm.enabled { "enable" } else { "disable" })?;
            if vm.owner != Owner::default() {
                writeln!(f, "\towner {}", owner(&vm.owner))?;
            }
            writeln!(f, "\tmemory {}M", vm.memory_bytes() >> 20)?;
            writeln!(f, "\tvcpu {}", vm.vcpu_count())?;
            writeln!(f, "\tbackend {}", vm.backend().keyword())?;
            writeln!(f, "\taccel {}", vm.accel_or(g).keyword())?;
            writeln!(f, "\tshutdown timeout {}", vm.shutdown_timeout_or(g))?;
            if let Some(boot) = &vm.boot {
                writeln!(f, "\tboot {}", quote(boot))?;
            }
            if let Some(device) = vm.boot_device {
                writeln!(f, "\tboot device {}", device.keyword())?;
            }
            if let Some(initrd) = &vm.initrd {
                writeln!(f, "\tinitrd {}", quote(initrd))?;
            }
            if let Some(cmdline) = &vm.cmdline {
                writeln!(f, "\tcmdline {}", quote(cmdline))?;
            }
            if let Some(cdrom) = &vm.cdrom {
                writeln!(f, "\tcdrom {}", quote(cdrom))?;
            }
            for disk in &vm.disks {
                writeln!(f, "\tdisk {} format {}", quote(&disk.path), disk.format)?;
            }
            if let Some(count) = vm.interface_count {
                writeln!(f, "\tinterfaces {count}")?;
            }
            for iface in &vm.interfaces {
                writeln!(f, "\t{}", interface(iface))?;
            }
            if !vm.allow_instance.is_empty() {
                writeln!(f, "\t{}", allow_instance(&vm.allow_instance))?;
            }
            writeln!(f, "}}")?;
        }
        Ok(())
    }
}

/// A size as `1.0M` when that reads back as the same number, else in bytes.
fn exact_size(bytes: u64) -> String {
    let scaled = crate::size::format(bytes);
    if crate::size::parse(&scaled) == Ok(bytes) {
        scaled
    } else {
        bytes.to_string()
    }
}
