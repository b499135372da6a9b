//! The configuration vm.conf(5) describes, as the daemon uses it.
//!
//! Optional fields are `None` when the file does not set them, so that an
//! instance can tell what it changes from what it inherits; the accessor
//! methods return the effective value with vmd's default.

use crate::disk::DiskFormat;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// At most this many disks per VM (VM_MAX_DISKS_PER_VM).
pub const MAX_DISKS: usize = 4;
/// At most this many network interfaces per VM (VM_MAX_NICS_PER_VM).
pub const MAX_INTERFACES: usize = 4;
/// Boot, initrd, cdrom and disk paths are shorter than this many bytes.
pub const MAX_PATH: usize = 128;
/// The longest path a request from vmctl may name (a start's files, the
/// file of `load`), in bytes: PATH_MAX less its NUL. Longer ones are
/// refused by [`check_request_path`], in vmd and in vmctl alike.
pub const MAX_REQUEST_PATH: usize = libc::PATH_MAX as usize - 1;

/// vmd's check of a path a request names; vmctl makes the same check,
/// with the same words, before it sends one.
pub fn check_request_path(path: impl AsRef<std::ffi::OsStr>) -> Result<(), String> {
    let path = path.as_ref();
    if path.is_empty() {
        return Err("empty path".to_string());
    }
    if path.len() > MAX_REQUEST_PATH {
        return Err(format!(
            "path too long: {} bytes, at most {MAX_REQUEST_PATH}",
            path.len()
        ));
    }
    Ok(())
}
/// Interface, bridge and group names are shorter than this (IFNAMSIZ).
pub const IF_NAMESIZE: usize = 16;
/// Highest routing domain number (RT_TABLEID_MAX).
pub const RDOMAIN_MAX: i64 = 255;
/// vCPUs per VM: 1 to this many.
pub const MAX_VCPUS: u32 = 64;
/// Longest kernel command line, NUL included (x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE: usize = 2048;
/// Memory of a VM that does not say (VM_DEFAULT_MEMORY).
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// The largest memory size vm.conf accepts.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Seconds a graceful stop waits before the VM is forced off.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u32 = 30;
/// Longest `shutdown timeout` accepted, in seconds (one day).
pub const MAX_SHUTDOWN_TIMEOUT: i64 = 86400;
/// Where each VM's console output is also written.
pub const DEFAULT_CONSOLE_LOG_DIR: &str = "/var/log/vmd";
/// The size at which a console log is rotated unless configured.
pub const DEFAULT_CONSOLE_LOG_SIZE: u64 = 1 << 20;
/// The range `console log DIR size SIZE` accepts.
pub const MIN_CONSOLE_LOG_SIZE: u64 = 1 << 10;
pub const MAX_CONSOLE_LOG_SIZE: u64 = 1 << 30;
/// Seconds between staggered start batches unless configured.
pub const DEFAULT_STAGGERED_DELAY: u32 = 30;
/// The uids vmd gives VM processes unless configured: 2048 uids from
/// 0x70000000, just above systemd's container range (0x00080000-0x6fffffff).
pub const DEFAULT_UID_RANGE: UidRange = UidRange {
    first: 0x7000_0000,
    last: 0x7000_0000 + 2047,
};

/// What a user other than root may run at once unless `limit users` or
/// `limit user` says otherwise: VMs, memory and vCPUs in all (vm.conf(5)
/// LIMITS). Root has no limit but the host's memory.
pub const DEFAULT_USER_VMS: u32 = 4;
pub const DEFAULT_USER_MEMORY: u64 = 8 << 30;
pub const DEFAULT_USER_VCPUS: u32 = 8;
/// The most `vms` and `vcpus` of a `limit` block accept.
pub const MAX_LIMIT_COUNT: i64 = 65535;

/// Everything one vm.conf (with its includes) configures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub globals: Globals,
    /// In file order; instances follow their parent.
    pub vms: Vec<VmConfig>,
    pub switches: Vec<SwitchConfig>,
}

impl Config {
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    pub fn switch(&self, name: &str) -> Option<&SwitchConfig> {
        self.switches.iter().find(|sw| sw.name == name)
    }

    /// A VM's effective settings: an instance's merged with its parent's
    /// (itself resolved first); other VMs as configured.
    pub fn resolved_vm(&self, vm: &VmConfig) -> VmConfig {
        let parent = vm.instance_of.as_deref().and_then(|name| self.vm(name));
        match parent {
            // The parser only accepts a parent defined before its instance,
            // so this recursion ends.
            Some(parent) if parent.name != vm.name => vm.inherit_from(&self.resolved_vm(parent)),
            _ => vm.clone(),
        }
    }
}

/// The global settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Globals {
    /// `local prefix`: where local interface subnets come from.
    pub local_prefix: Ipv4Prefix,
    /// `local inet6`: IPv6 on local interfaces.
    pub local_inet6: bool,
    /// `local inet6 prefix`; `None` lets vmd pick a random fd00::/8 prefix.
    pub local_prefix6: Option<Ipv6Prefix>,
    /// `socket owner`: owner and group of the control socket.
    pub socket_owner: Owner,
    /// `staggered start`; `None` means the defaults (number of CPUs, 30 s).
    pub staggered_start: Option<StaggeredStart>,
    /// `accel` (Linux extension).
    pub accel: Accel,
    /// `console log` directory (Linux extension).
    pub console_log_dir: String,
    /// `console log DIR size SIZE`: a log this large is rotated (one old
    /// copy kept).
    pub console_log_size: u64,
    /// `console log DIR keep`: the logs of VMs started by vmctl stay
    /// when they end (by default they are removed).
    pub console_log_keep: bool,
    /// `shutdown timeout` in seconds (Linux extension).
    pub shutdown_timeout: u32,
    /// `uid range` for VM processes (Linux extension).
    pub uid_range: UidRange,
    /// `limit users { ... }`: the limits of users other than root (each
    /// `None`: the default). Linux extension.
    pub user_limits: Limits,
    /// `limit user NAME { ... }`, in file order, one per user.
    pub limits: Vec<UserLimit>,
}

/// What one user may run at once, in all: `None` where a block does not
/// say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub vms: Option<u32>,
    pub memory: Option<u64>,
    pub vcpus: Option<u32>,
}

/// `limit user NAME { ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimit {
    pub uid: u32,
    /// The user as the file named it (a name, or a uid's digits).
    pub user: String,
    pub limits: Limits,
    /// FILE:LINE of the block.
    pub source: String,
}

/// One limit that holds for a user, and the statement it comes from
/// (`limit user "joe"`, `limit users`, or the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit<T> {
    pub value: T,
    pub from: String,
}

/// The limits that hold for one user; `None`: no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveLimits {
    /// How the refusals name the user: `joe`, or `uid 1000`.
    pub user: String,
    pub vms: Option<Limit<u32>>,
    pub memory: Option<Limit<u64>>,
    pub vcpus: Option<Limit<u32>>,
}

impl Globals {
    /// The limits that hold for `uid`: its `limit user` block's keys, then
    /// (for users other than root) those of `limit users`, then the
    /// defaults. Root has no limit that no `limit user` block sets.
    pub fn limits_for(&self, uid: u32) -> EffectiveLimits {
        let own = self.limits.iter().find(|l| l.uid == uid);
        let named = |value: Option<u64>| {
            let entry = own?;
            value.map(|value| Limit {
                value,
                from: format!("vm.conf: limit user \"{}\"", entry.user),
            })
        };
        let others = |value: Option<u64>, default: u64| {
            if uid == 0 {
                return None;
            }
            Some(match value {
                Some(value) => Limit {
                    value,
                    from: "vm.conf: limit users".to_string(),
                },
                None => Limit {
                    value: default,
                    from: "the default for users; see vm.conf(5) LIMITS".to_string(),
                },
            })
        };
        let pick = |mine: Option<u64>, users: Option<u64>, default: u64| {
            named(mine).or_else(|| others(users, default))
        };
        let own_limits = own.map(|l| l.limits).unwrap_or_default();
        let users = self.user_limits;
        let count = |l: Option<Limit<u64>>| {
            l.map(|l| Limit {
                value: u32::try_from(l.value).unwrap_or(u32::MAX),
                from: l.from,
            })
        };
        EffectiveLimits {
            user: own.map_or_else(|| format!("uid {uid}"), |l| l.user.clone()),
            vms: count(pick(
                own_limits.vms.map(u64::from),
                users.vms.map(u64::from),
                DEFAULT_USER_VMS.into(),
            )),
            memory: pick(own_limits.memory, users.memory, DEFAULT_USER_MEMORY),
            vcpus: count(pick(
                own_limits.vcpus.map(u64::from),
                users.vcpus.map(u64::from),
                DEFAULT_USER_VCPUS.into(),
            )),
        }
    }
}

impl Default for Globals {
    fn default() -> Self {
        Globals {
            local_prefix: Ipv4Prefix {
                addr: Ipv4Addr::new(100, 64, 0, 0),
                len: 10,
            },
            local_inet6: false,
            local_prefix6: None,
            socket_owner: Owner::default(),
            staggered_start: None,
            accel: Accel::Auto,
            console_log_dir: DEFAULT_CONSOLE_LOG_DIR.to_string(),
            console_log_size: DEFAULT_CONSOLE_LOG_SIZE,
            console_log_keep: false,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            uid_range: DEFAULT_UID_RANGE,
            user_limits: Limits::default(),
            limits: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Prefix {
    pub addr: Ipv6Addr,
    pub len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaggeredStart {
    pub parallel: u32,
    pub delay: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

/// A user and optional group, as `owner user[:group]` names them. uid 0
/// with a group is the `owner :group` form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    /// The user name, when the file gave one (or `None` for a bare uid).
    pub user: Option<String>,
    pub gid: Option<u32>,
    pub group: Option<String>,
}

/// What `accel` selects: KVM, QEMU's TCG emulation, or KVM when usable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn from_keyword(word: &str) -> Option<Accel> {
        match word {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Which VMM runs a VM: QEMU, or vmd's own on /dev/kvm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    #[default]
    Qemu,
    Kvm,
}

impl Backend {
    pub fn from_keyword(word: &str) -> Option<Backend> {
        match word {
            "qemu" => Some(Backend::Qemu),
            "kvm" => Some(Backend::Kvm),
            _ => None,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Kvm => "kvm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootDevice {
    Cdrom,
    Disk,
    Net,
}

impl BootDevice {
    pub fn keyword(self) -> &'static str {
        match self {
            BootDevice::Cdrom => "cdrom",
            BootDevice::Disk => "disk",
            BootDevice::Net => "net",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: String,
    pub format: DiskFormat,
}

/// One `[local] interface` of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// `local interface`: vmd assigns addresses and answers DHCP.
    pub local: bool,
    /// The host-side tap name; `None` (or `tap`) lets vmd pick one.
    pub tap: Option<String>,
    pub group: Option<String>,
    /// The guest's MAC address; `None` lets vmd generate one.
    pub lladdr: Option<[u8; 6]>,
    pub locked: bool,
    pub rdomain: Option<u32>,
    pub switch: Option<String>,
    pub up: bool,
}

impl Default for Interface {
    fn default() -> Self {
        Interface {
            local: false,
            tap: None,
            group: None,
            lladdr: None,
            locked: false,
            rdomain: None,
            switch: None,
            up: true,
        }
    }
}

/// `allow instance { ... }`: what instances of this VM may change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowInstance {
    pub boot: bool,
    pub cdrom: bool,
    pub disk: bool,
    pub instance: bool,
    pub interface: bool,
    pub memory: bool,
    /// Who may create instances.
    pub owner: Option<Owner>,
}

impl AllowInstance {
    pub fn is_empty(&self) -> bool {
        *self == AllowInstance::default()
    }
}

/// One `vm` or `vm PARENT instance NAME` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    /// The parent of an instance.
    pub instance_of: Option<String>,
    /// `enable` (default) or `disable`: started by vmd at startup.
    pub enabled: bool,
    /// `boot`: kernel or BIOS image.
    pub boot: Option<String>,
    pub boot_device: Option<BootDevice>,
    pub cdrom: Option<String>,
    pub disks: Vec<Disk>,
    pub interfaces: Vec<Interface>,
    /// `interfaces N`: the minimum number of interfaces.
    pub interface_count: Option<usize>,
    /// Bytes, a whole number of megabytes.
    pub memory: Option<u64>,
    pub owner: Owner,
    pub allow_instance: AllowInstance,
    /// Linux extensions.
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u32>,
    pub backend: Option<Backend>,
    pub accel: Option<Accel>,
    pub shutdown_timeout: Option<u32>,
    /// `FILE:LINE` of the block, for log messages.
    pub source: String,
}

impl VmConfig {
    /// A disk path named more than once (one image cannot be two disks).
    pub fn repeated_disk(&self) -> Option<&str> {
        self.disks
            .iter()
            .enumerate()
            .find(|(i, d)| self.disks[..*i].iter().any(|e| e.path == d.path))
            .map(|(_, d)| d.path.as_str())
    }

    /// The limits the parser enforces, checked again where a VmConfig
    /// arrives from elsewhere (a start request from vmctl): the first
    /// value out of range, in words.
    pub fn check_limits(&self) -> Result<(), String> {
        let paths = self
            .boot
            .iter()
            .chain(&self.initrd)
            .chain(&self.cdrom)
            .chain(self.disks.iter().map(|d| &d.path));
        for path in paths {
            check_request_path(path)?;
        }
        if self
            .memory
            .is_some_and(|m| !(1 << 20..=MAX_MEMORY).contains(&m))
        {
            return Err(format!(
                "memory size out of range: {} (from 1M to {})",
                crate::size::format(self.memory_bytes()),
                crate::size::format(MAX_MEMORY)
            ));
        }
        if self.vcpus.is_some_and(|n| !(1..=MAX_VCPUS).contains(&n)) {
            return Err(format!("vcpu count out of range: {}", self.vcpu_count()));
        }
        if self.disks.len() > MAX_DISKS {
            return Err("too many disks".to_string());
        }
        if let Some(path) = self.repeated_disk() {
            return Err(format!("disk {path} is given twice"));
        }
        if self.interfaces.len().max(self.interface_count.unwrap_or(0)) > MAX_INTERFACES {
            return Err("too many network interfaces".to_string());
        }
        if self
            .cmdline
            .as_ref()
            .is_some_and(|c| c.len() >= MAX_CMDLINE)
        {
            return Err("kernel command line too long".to_string());
        }
        if self
            .shutdown_timeout
            .is_some_and(|t| t == 0 || i64::from(t) > MAX_SHUTDOWN_TIMEOUT)
        {
            return Err("shutdown timeout out of range".to_string());
        }
        Ok(())
    }

    pub fn new(name: &str) -> VmConfig {
        VmConfig {
            name: name.to_string(),
            instance_of: None,
            enabled: true,
            boot: None,
            boot_device: None,
            cdrom: None,
            disks: Vec::new(),
            interfaces: Vec::new(),
            interface_count: None,
            memory: None,
            owner: Owner::default(),
            allow_instance: AllowInstance::default(),
            initrd: None,
            cmdline: None,
            vcpus: None,
            backend: None,
            accel: None,
            shutdown_timeout: None,
            source: String::new(),
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.unwrap_or(DEFAULT_MEMORY)
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.unwrap_or(1)
    }

    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or_default()
    }

    /// How many interfaces the VM gets: the configured ones, padded with
    /// default ones up to `interfaces N`.
    pub fn interface_total(&self) -> usize {
        self.interfaces.len().max(self.interface_count.unwrap_or(0))
    }

    /// The configured interfaces followed by the default ones that
    /// `interfaces N` adds.
    pub fn effective_interfaces(&self) -> Vec<Interface> {
        let mut all = self.interfaces.clone();
        all.resize(self.interface_total(), Interface::default());
        all
    }

    /// An instance's settings with what it leaves unset taken from its
    /// parent: disks are never inherited, interfaces beyond the
    /// instance's own come from the parent without their exclusive
    /// settings (lladdr, tap name), and instance permissions pass on only
    /// if the parent allows instances of instances.
    pub fn inherit_from(&self, parent: &VmConfig) -> VmConfig {
        let mut vm = self.clone();
        vm.boot = vm.boot.or_else(|| parent.boot.clone());
        vm.boot_device = vm.boot_device.or(parent.boot_device);
        vm.cdrom = vm.cdrom.or_else(|| parent.cdrom.clone());
        vm.memory = vm.memory.or(parent.memory);
        vm.interface_count = vm.interface_count.or(parent.interface_count);
        if vm.interfaces.len() < parent.interfaces.len() {
            let inherited = parent.interfaces[vm.interfaces.len()..]
                .iter()
                .map(|i| Interface {
                    lladdr: None,
                    tap: None,
                    ..i.clone()
                });
            vm.interfaces.extend(inherited);
        }
        if vm.owner.uid == 0 && vm.owner.user.is_none() {
            vm.owner.uid = parent.owner.uid;
            vm.owner.user = parent.owner.user.clone();
        }
        if vm.owner.gid.is_none() {
            vm.owner.gid = parent.owner.gid;
            vm.owner.group = parent.owner.group.clone();
        }
        vm.allow_instance = if parent.allow_instance.instance {
            parent.allow_instance.clone()
        } else {
            AllowInstance::default()
        };
        vm.initrd = vm.initrd.or_else(|| parent.initrd.clone());
        vm.cmdline = vm.cmdline.or_else(|| parent.cmdline.clone());
        vm.vcpus = vm.vcpus.or(parent.vcpus);
        vm.backend = vm.backend.or(parent.backend);
        vm.accel = vm.accel.or(parent.accel);
        vm.shutdown_timeout = vm.shutdown_timeout.or(parent.shutdown_timeout);
        vm
    }

    /// What an instance would share with its parent that only one VM may
    /// have (a disk, an lladdr, a tap name), described, if anything.
    pub fn reuses_exclusive(&self, parent: &VmConfig) -> Option<String> {
        if let Some(disk) = self
            .disks
            .iter()
            .find(|d| parent.disks.iter().any(|p| p.path == d.path))
        {
            return Some(format!("disk {}", disk.path));
        }
        for nic in &self.interfaces {
            if let Some(mac) = nic
                .lladdr
                .filter(|mac| parent.interfaces.iter().any(|p| p.lladdr == Some(*mac)))
            {
                return Some(format!("lladdr {}", super::checks::format_lladdr(&mac)));
            }
            if let Some(tap) = nic
                .tap
                .as_ref()
                .filter(|t| parent.interfaces.iter().any(|p| p.tap.as_ref() == Some(*t)))
            {
                return Some(format!("interface {tap}"));
            }
        }
        None
    }

    pub fn accel_or(&self, globals: &Globals) -> Accel {
        self.accel.unwrap_or(globals.accel)
    }

    pub fn shutdown_timeout_or(&self, globals: &Globals) -> u32 {
        self.shutdown_timeout.unwrap_or(globals.shutdown_timeout)
    }
}

/// One `switch` block: an existing Linux bridge VMs' taps are added to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchConfig {
    pub name: String,
    pub enabled: bool,
    pub group: Option<String>,
    /// The bridge interface.
    pub interface: String,
    pub locked_lladdr: bool,
    pub rdomain: Option<u32>,
    pub up: bool,
    pub source: String,
}
