//! Parser tests: the grammar, each error path, macros, includes.

use super::*;
use crate::disk::DiskFormat;
use std::path::PathBuf;

fn ok(text: &str) -> Loaded {
    match parse_str("t.conf", text, &[]) {
        Ok(loaded) => loaded,
        Err(lines) => panic!("unexpected errors: {lines:#?}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match parse_str("t.conf", text, &[]) {
        Ok(loaded) => panic!("accepted: {:#?}", loaded.config),
        Err(lines) => lines,
    }
}

fn one_error(text: &str) -> String {
    let lines = errors(text);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    lines[0].clone()
}

/// A scratch directory removed when dropped, even if a test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vmconf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn empty_file_is_the_default_configuration() {
    let loaded = ok("# nothing\n\n");
    assert_eq!(loaded.config, Config::default());
    assert!(loaded.warnings.is_empty());
}

#[test]
fn a_full_vm() {
    let config = ok(r#"
switch "sw" { interface br0 }
vm "a" {
	boot "/bsd.rd"
	boot device cdrom
	cdrom "/cd.iso"
	disable
	disk "/a.img"
	disk "/b.qcow2"
	disk "/c" format "QCOW2"
	local interface tap3 { switch "sw", locked lladdr fe:e1:ba:d0:00:01 }
	interface { group default
		rdomain 7
		down }
	interfaces 3
	memory 1.5G
	owner root:root
	initrd "/initrd"
	cmdline "console=ttyS0"
	vcpu 2
	backend kvm
	accel tcg
	shutdown timeout 5
}
"#)
    .config;
    let vm = config.vm("a").expect("vm a");
    assert!(!vm.enabled);
    assert_eq!(vm.boot.as_deref(), Some("/bsd.rd"));
    assert_eq!(vm.boot_device, Some(BootDevice::Cdrom));
    assert_eq!(vm.cdrom.as_deref(), Some("/cd.iso"));
    let formats: Vec<DiskFormat> = vm.disks.iter().map(|d| d.format).collect();
    assert_eq!(
        formats,
        vec![DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Qcow2]
    );
    assert_eq!(vm.interfaces.len(), 2);
    let first = &vm.interfaces[0];
    assert!(first.local && first.locked && first.up);
    assert_eq!(first.tap.as_deref(), Some("tap3"));
    assert_eq!(first.switch.as_deref(), Some("sw"));
    assert_eq!(first.lladdr, Some([0xfe, 0xe1, 0xba, 0xd0, 0, 1]));
    let second = &vm.interfaces[1];
    assert_eq!(
        (second.group.as_deref(), second.rdomain, second.up),
        (Some("default"), Some(7), false)
    );
    assert_eq!(vm.interface_total(), 3);
    assert_eq!(vm.effective_interfaces()[2], Interface::default());
    assert_eq!(vm.memory, Some(1536 << 20));
    assert_eq!((vm.owner.uid, vm.owner.gid), (0, Some(0)));
    assert_eq!(vm.initrd.as_deref(), Some("/initrd"));
    assert_eq!(vm.cmdline.as_deref(), Some("console=ttyS0"));
    assert_eq!(
        (vm.vcpus, vm.backend, vm.accel, vm.shutdown_timeout),
        (Some(2), Some(Backend::Kvm), Some(Accel::Tcg), Some(5))
    );
    assert_eq!(vm.source, "t.conf:3");
}

#[test]
fn defaults_of_a_vm() {
    let config = ok("vm \"a\" {\n}\n").config;
    let vm = config.vm("a").expect("vm a");
    assert!(vm.enabled);
    assert_eq!(vm.memory_bytes(), DEFAULT_MEMORY);
    assert_eq!(vm.vcpu_count(), 1);
    assert_eq!(vm.backend(), Backend::Qemu);
    assert_eq!(vm.accel_or(&config.globals), Accel::Auto);
    assert_eq!(
        vm.shutdown_timeout_or(&config.globals),
        DEFAULT_SHUTDOWN_TIMEOUT
    );
}

#[test]
fn globals() {
    let g = ok(r#"local prefix 10.0.0.0/12
local inet6 prefix fd00:2::/56
socket owner :root
staggered start parallel 4 delay 5
accel kvm
console log "/tmp/consoles" size 64K
shutdown timeout 90
"#)
    .config
    .globals;
    assert_eq!(g.local_prefix.len, 12);
    assert!(g.local_inet6);
    assert_eq!(g.local_prefix6.map(|p| p.len), Some(56));
    assert_eq!((g.socket_owner.uid, g.socket_owner.gid), (0, Some(0)));
    assert_eq!(
        g.staggered_start,
        Some(StaggeredStart {
            parallel: 4,
            delay: 5
        })
    );
    assert_eq!(g.accel, Accel::Kvm);
    assert_eq!(g.console_log_dir, "/tmp/consoles");
    assert_eq!(g.console_log_size, 64 << 10);
    assert!(!g.console_log_keep);
    let kept = ok("console log \"/c\" size 2K\nconsole log keep\n")
        .config
        .globals;
    assert_eq!(
        (kept.console_log_size, kept.console_log_keep),
        (2 << 10, true)
    );
    // A directory named keep is a path like any, quoted.
    assert_eq!(
        one_error("console log \"keep\"\n"),
        "t.conf:1: console log directory must be an absolute path: keep"
    );
    assert_eq!(g.shutdown_timeout, 90);
    assert_eq!(g.uid_range, DEFAULT_UID_RANGE);
}

#[test]
fn switch_options() {
    let config = ok("switch \"s\" {\n\tinterface br0\n\tgroup default\n\tlocked lladdr\n\trdomain 3\n\tdown\n\tdisable\n}\n").config;
    let sw = config.switch("s").expect("switch s");
    assert_eq!(sw.interface, "br0");
    assert_eq!(sw.group.as_deref(), Some("default"));
    assert!(sw.locked_lladdr && !sw.up && !sw.enabled);
    assert_eq!(sw.rdomain, Some(3));
}

#[test]
fn allow_instance_forms() {
    let config = ok(
        "vm \"a\" {\n\tallow instance boot\n\tallow instance { memory, disk\n\t\towner root }\n}\n",
    )
    .config;
    let allow = &config.vm("a").expect("vm a").allow_instance;
    assert!(allow.boot && allow.memory && allow.disk && !allow.cdrom);
    assert_eq!(allow.owner.as_ref().map(|o| o.uid), Some(0));
}

#[test]
fn instances_inherit_from_their_parent() {
    let config = ok(r#"vm "p" {
	boot "/k"
	memory 2G
	disk "/p.img"
	interface { switch "sw" }
	owner root
}
vm "p" instance "i" {
	vcpu 2
}
"#)
    .config;
    let instance = config.vm("i").expect("instance");
    assert_eq!(instance.instance_of.as_deref(), Some("p"));
    let effective = config.resolved_vm(instance);
    assert_eq!(effective.boot.as_deref(), Some("/k"));
    assert_eq!(effective.memory, Some(2 << 30));
    assert!(effective.disks.is_empty());
    assert_eq!(effective.interfaces.len(), 1);
    assert_eq!(effective.vcpus, Some(2));
}

#[test]
fn lexer_errors_are_reported_once() {
    assert_eq!(
        one_error("vm \"x\" {\n\tmemory $m\n}\n"),
        "t.conf:2: macro 'm' not defined"
    );
    assert_eq!(
        one_error("vm \"x\" {\n\tboot \"/a\0b\"\n}\n"),
        "t.conf:2: syntax error"
    );
}

#[test]
fn syntax_errors_and_recovery() {
    assert_eq!(one_error("kernel \"/bsd\"\n"), "t.conf:1: syntax error");
    assert_eq!(
        one_error("vm \"x\" {\n\tmemory 1G disable\n}\n"),
        "t.conf:2: syntax error"
    );
    assert_eq!(
        errors("vm \"x\" {\n\tfoo\n\tmemory 1\n}\nvm \"y\" { bar }\nvm \"z\" {\n\tbaz\n}\n"),
        vec![
            "t.conf:2: syntax error",
            "memory size must be at least 1MB",
            "t.conf:3: failed to parse size: 1",
            "t.conf:5: syntax error",
            "t.conf:7: syntax error",
        ]
    );
    assert_eq!(
        one_error("vm \"x\" {\n\tmemory 1G\n"),
        "t.conf:2: syntax error"
    );
    assert_eq!(one_error("}\n"), "t.conf:1: syntax error");
}

#[test]
fn each_vm_error() {
    let cases = [
        (
            "boot \"/a\"\n\tboot \"/b\"",
            "t.conf:3: kernel specified more than once",
        ),
        (
            "cdrom \"/a\"\n\tcdrom \"/b\"",
            "t.conf:3: cdrom specified more than once",
        ),
        (
            "initrd \"/a\"\n\tinitrd \"/b\"",
            "t.conf:3: initrd specified more than once",
        ),
        (
            "interfaces 1\n\tinterfaces 1",
            "t.conf:3: interfaces specified more than once",
        ),
        ("interfaces 5", "t.conf:2: too many interfaces: 5"),
        (
            "memory 1G\n\tmemory 1G",
            "t.conf:3: memory specified more than once",
        ),
        (
            "disk \"a\" format vmdk",
            "t.conf:2: unrecognized disk format vmdk",
        ),
        ("interface \"x y\"", "t.conf:2: invalid interface: x y"),
        (
            "interface tap0123456789abcd",
            "t.conf:2: interface name too long: tap0123456789abcd",
        ),
        (
            "interface { lladdr 1:2:3 }",
            "t.conf:2: invalid address: 1:2:3",
        ),
        ("interface { group g1 }", "t.conf:2: invalid group name: g1"),
        (
            "interface { rdomain 300 }",
            "t.conf:2: invalid rdomain: 300",
        ),
        (
            "owner nosuchuser_z",
            "t.conf:2: failed to get user: nosuchuser_z",
        ),
        (
            "owner root:nosuchgroup_z",
            "t.conf:2: failed to get group: nosuchgroup_z",
        ),
        ("vcpu 65", "t.conf:2: invalid vcpu count: 65"),
        (
            "vcpu 1\n\tvcpu 1",
            "t.conf:3: vcpu specified more than once",
        ),
        ("backend xen", "t.conf:2: invalid backend: xen"),
        ("accel hvf", "t.conf:2: invalid accel: hvf"),
        (
            "shutdown timeout 0",
            "t.conf:2: invalid shutdown timeout: 0",
        ),
        (
            "cmdline \"a\"\n\tcmdline \"b\"",
            "t.conf:3: cmdline specified more than once",
        ),
    ];
    for (option, expected) in cases {
        let text = format!("vm \"x\" {{\n\t{option}\n}}\n");
        assert_eq!(one_error(&text), expected, "{option}");
    }
    let long = format!(
        "vm \"x\" {{\n\tcmdline \"{}\"\n}}\n",
        "c".repeat(MAX_CMDLINE)
    );
    assert_eq!(one_error(&long), "t.conf:2: cmdline too long");
}

#[test]
fn disk_errors_explain_first() {
    let text =
        "vm \"x\" {\n\tdisk \"1\"\n\tdisk \"2\"\n\tdisk \"3\"\n\tdisk \"4\"\n\tdisk \"5\"\n}\n";
    assert_eq!(
        errors(text),
        vec!["too many disks", "t.conf:6: failed to parse disks: 5"]
    );
    let long = "d".repeat(MAX_PATH);
    assert_eq!(
        errors(&format!("vm \"x\" {{\n\tdisk \"{long}\"\n}}\n")),
        vec![
            "disk path too long".to_string(),
            format!("t.conf:2: failed to parse disks: {long}")
        ]
    );
}

#[test]
fn vm_and_switch_names() {
    assert_eq!(
        one_error(&format!("vm \"{}\" {{\n}}\n", "n".repeat(64))),
        "t.conf:1: vm name too long"
    );
    assert_eq!(
        one_error("vm \"_x\" {\n}\n"),
        "t.conf:1: invalid VM name: _x"
    );
    assert_eq!(
        one_error("vm \"p\" instance \"i\" {\n}\n"),
        "t.conf:1: vm \"i\" failed: parent vm \"p\" not defined"
    );
    assert_eq!(
        one_error("vm \"a\" {\n}\nvm \"a\" {\n}\n"),
        "t.conf:3: vm \"a\" defined more than once"
    );
    assert_eq!(
        one_error("switch \"s\" {\n\tinterface br0\n}\nswitch \"s\" {\n\tinterface br1\n}\n"),
        "t.conf:4: switch \"s\" defined more than once"
    );
    assert_eq!(
        one_error("switch \"s\" {\n\tup\n}\n"),
        "t.conf:3: switch \"s\" is missing interface name"
    );
    assert_eq!(
        errors("switch \"s\" {\n\tinterface \"br 0\"\n}\n")[0],
        "t.conf:2: invalid switch interface: br 0"
    );
}

#[test]
fn global_errors() {
    assert_eq!(
        one_error("local prefix 10.0.0.0/17\n"),
        "t.conf:1: invalid local prefix: too large"
    );
    assert_eq!(
        one_error("local inet6 prefix ::1/64\n"),
        "t.conf:1: invalid local inet6 prefix: bad mask"
    );
    assert_eq!(
        one_error("socket owner nosuchuser_q\n"),
        "t.conf:1: failed to get user: nosuchuser_q"
    );
    assert_eq!(
        one_error("staggered start parallel 0 delay 1\n"),
        "t.conf:1: invalid parallel: 0"
    );
    assert_eq!(
        one_error("console log \"rel\"\n"),
        "t.conf:1: console log directory must be an absolute path: rel"
    );
    assert_eq!(
        one_error("console log \"/c\" size 100\n"),
        "t.conf:1: invalid console log size: must be 1.0K to 1.0G"
    );
    assert_eq!(
        one_error("uid range 5-1\n"),
        "t.conf:1: invalid uid range: 5-1"
    );
    assert_eq!(one_error("accel none\n"), "t.conf:1: invalid accel: none");
}

#[test]
fn macros_define_expand_and_warn() {
    let loaded = ok("k = \"/bsd\"\nunused = \"x\"\nvm \"a\" {\n\tboot $k\n}\n");
    assert_eq!(
        loaded
            .config
            .vm("a")
            .and_then(|vm| vm.boot.clone())
            .as_deref(),
        Some("/bsd")
    );
    assert_eq!(loaded.warnings, vec!["warning: macro 'unused' not used"]);

    let defines = vec![
        ("k".to_string(), "/other".to_string()),
        ("spare".to_string(), "1".to_string()),
    ];
    let loaded = parse_str(
        "t.conf",
        "k = \"/bsd\"\nvm \"a\" {\n\tboot $k\n}\n",
        &defines,
    )
    .expect("parses");
    assert_eq!(
        loaded
            .config
            .vm("a")
            .and_then(|vm| vm.boot.clone())
            .as_deref(),
        Some("/other")
    );
    assert_eq!(loaded.warnings, vec!["warning: macro 'spare' not used"]);

    assert_eq!(
        one_error("\"a b\" = \"x\"\n"),
        "t.conf:1: macro name cannot contain whitespace"
    );
    assert_eq!(one_error("x = 5\n"), "t.conf:1: syntax error");
    // Extension words are not reserved.
    let loaded = ok("console = \"/c.img\"\nvm uid {\n\tdisk $console\n}\n");
    assert!(loaded.config.vm("uid").is_some());
}

#[test]
fn warnings_come_in_order_with_errors() {
    let lines = errors("vm \"a\" {\n\tmemory 1048577\n\tvcpu 0\n}\n");
    assert_eq!(
        lines,
        vec![
            "memory size rounded to 1.0M",
            "t.conf:3: invalid vcpu count: 0"
        ]
    );
}

#[test]
fn includes_are_relative_and_loops_fail() {
    let dir = TempDir::new("include");
    let top = dir.write(
        "vm.conf",
        "include \"sub/a.inc\"\nvm \"x\" {\n\tboot $k\n}\n",
    );
    dir.write("sub/a.inc", "include \"b.inc\"\n");
    dir.write("sub/b.inc", "k = \"/bsd\"\n");
    let loaded = load(&top, &[], true).expect("loads");
    assert_eq!(
        loaded
            .config
            .vm("x")
            .and_then(|vm| vm.boot.clone())
            .as_deref(),
        Some("/bsd")
    );

    dir.write("sub/b.inc", "\ninclude \"a.inc\"\n");
    let lines = load(&top, &[], true).expect_err("loop");
    let b = dir.0.join("sub/b.inc");
    assert_eq!(
        lines,
        vec![
            format!(
                "{}:2: failed to include file a.inc: include loop",
                b.display()
            ),
            format!("{}:3: macro 'k' not defined", top.display()),
        ]
    );

    dir.write(
        "sub/a.inc",
        "include \"missing.inc\"\nvm \"y\" {\n\tvcpu 0\n}\n",
    );
    let lines = load(&top, &[], true).expect_err("missing");
    let a = dir.0.join("sub/a.inc");
    assert_eq!(
        lines,
        vec![
            format!("{}:1: failed to include file missing.inc", a.display()),
            format!("{}:3: invalid vcpu count: 0", a.display()),
            format!("{}:3: macro 'k' not defined", top.display()),
        ]
    );
}

#[test]
fn missing_files() {
    let dir = TempDir::new("missing");
    let path = dir.0.join("none.conf");
    let loaded = load(&path, &[], false).expect("optional");
    assert_eq!(loaded.config, Config::default());
    let lines = load(&path, &[], true).expect_err("required");
    assert_eq!(
        lines,
        vec![format!(
            "failed to open {}: No such file or directory",
            path.display()
        )]
    );
}

/// The parent reads these in its event loop: nothing may make it wait
/// (a FIFO without a writer) or read without end (/dev/zero).
#[test]
fn only_regular_files_up_to_the_cap_are_read() {
    let dir = TempDir::new("special");
    let fifo = dir.0.join("fifo.conf");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = dir.0.join("big.conf");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(MAX_CONFIG_FILE + 1).unwrap();
    let cap = dir.write("cap.conf", "");
    std::fs::File::options()
        .write(true)
        .open(&cap)
        .unwrap()
        .set_len(MAX_CONFIG_FILE)
        .unwrap();
    let zero = Path::new("/dev/zero");
    for (path, why) in [
        (fifo.as_path(), "a FIFO, not a regular file"),
        (zero, "a character device, not a regular file"),
        (dir.0.as_path(), "a directory, not a regular file"),
        (
            big.as_path(),
            "larger than 4 MiB, the most a configuration file may have",
        ),
    ] {
        for required in [true, false] {
            assert_eq!(
                load(path, &[], required).expect_err("refused"),
                vec![format!("failed to read {}: {why}", path.display())]
            );
        }
    }
    // /dev/null, by its device number: the empty configuration.
    assert_eq!(
        load(Path::new("/dev/null"), &[], true)
            .expect("empty")
            .config,
        Config::default()
    );
    // Exactly the cap is read (NUL bytes: a lexer error, not a refusal).
    assert_eq!(
        read_config_file(&cap).unwrap().len() as u64,
        MAX_CONFIG_FILE
    );

    let top = dir.write("top.conf", "include \"fifo.conf\"\ninclude \"/dev/zero\"\n");
    assert_eq!(
        load(&top, &[], true).expect_err("includes refused"),
        vec![
            format!(
                "{}:1: failed to include file fifo.conf: a FIFO, not a regular file",
                top.display()
            ),
            format!(
                "{}:2: failed to include file /dev/zero: a character device, not a regular file",
                top.display()
            ),
        ]
    );
}

/// Includes add up: 4 MiB and 1000 files in all, so files that include
/// each other twice over (2^25 reads) end at once.
#[test]
fn includes_are_capped_in_all() {
    let dir = TempDir::new("include-caps");
    let half = "#".repeat((MAX_CONFIG_FILE / 2) as usize - 1) + "\n";
    dir.write("h1.inc", &half);
    dir.write("h2.inc", &half);
    let top = dir.write("top.conf", "include \"h1.inc\"\ninclude \"h2.inc\"\n");
    assert_eq!(
        load(&top, &[], true).expect_err("over 4 MiB in all"),
        vec![format!(
            "{}:2: failed to include file h2.inc: more than 4 MiB in all",
            top.display()
        )]
    );
    for i in 0..25 {
        let next = i + 1;
        dir.write(
            &format!("f{i}.conf"),
            &format!("include \"f{next}.conf\"\ninclude \"f{next}.conf\"\n"),
        );
    }
    dir.write("f25.conf", "");
    let lines = load(&dir.0.join("f0.conf"), &[], true).expect_err("bomb");
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(": more than 1000 files in all")),
        "{lines:?}"
    );
}

#[test]
fn the_printed_configuration_reads_back_the_same() {
    let text = r#"local prefix 10.8.0.0/16
local inet6
socket owner root:root
staggered start parallel 2 delay 9
console log keep
uid range 1879048192-1879048200
limit users { vms 2 }
limit user "daemon" { memory 2G, vcpus 3 }
limit user 4242 {
	vms 0
}
switch "s w" {
	interface br0
	group default
	locked lladdr
	rdomain 2
}
vm "a" {
	boot "/k"
	boot device disk
	disk "/a \"quoted\".img"
	local interface tap1 { lladdr fe:e1:ba:d0:00:01, switch "s w" }
	interfaces 2
	memory 1536M
	allow instance { boot, owner :root }
	cmdline "root=/dev/vda"
}
vm "a" instance "b" {
	memory 2G
}
"#;
    let first = ok(text).config;
    let printed = first.to_string();
    let second = ok(&printed).config;
    assert_eq!(second.to_string(), printed);
    assert_eq!(
        second.vm("a").map(|vm| vm.disks[0].path.clone()).as_deref(),
        Some("/a \"quoted\".img")
    );
}

#[test]
fn limits_per_user_and_for_users() {
    let g = ok("limit users { vms 2 memory 4G }\nlimit user \"daemon\" { vcpus 16\n}\nlimit user root { vms 1 }\n")
        .config
        .globals;
    assert_eq!(
        g.user_limits,
        Limits {
            vms: Some(2),
            memory: Some(4 << 30),
            vcpus: None
        }
    );
    assert_eq!((g.limits[0].uid, g.limits[0].user.as_str()), (1, "daemon"));
    assert_eq!(g.limits[0].source, "t.conf:2");
    // daemon: its own vcpus, the others' vms and memory.
    let daemon = g.limits_for(1);
    assert_eq!(
        daemon.vcpus.map(|l| (l.value, l.from)),
        Some((16, "vm.conf: limit user \"daemon\"".to_string()))
    );
    assert_eq!(
        daemon.vms.map(|l| (l.value, l.from)),
        Some((2, "vm.conf: limit users".to_string()))
    );
    // Another user: limit users, then the default.
    let other = g.limits_for(4321);
    assert_eq!(other.user, "uid 4321");
    assert_eq!(other.memory.map(|l| l.value), Some(4 << 30));
    assert_eq!(
        other.vcpus.map(|l| (l.value, l.from)),
        Some((
            DEFAULT_USER_VCPUS,
            "the default for users; see vm.conf(5) LIMITS".to_string()
        ))
    );
    // Root: what its own block sets, nothing else.
    let root = g.limits_for(0);
    assert_eq!(root.vms.map(|l| l.value), Some(1));
    assert_eq!((root.memory, root.vcpus), (None, None));
    // Without any limit statement: the defaults for users, none for root.
    let defaults = Globals::default();
    assert_eq!(
        defaults.limits_for(1000).vms.map(|l| l.value),
        Some(DEFAULT_USER_VMS)
    );
    assert_eq!(
        defaults.limits_for(1000).memory.map(|l| l.value),
        Some(DEFAULT_USER_MEMORY)
    );
    assert!(defaults.limits_for(0).vms.is_none());
}

#[test]
fn limit_errors() {
    assert_eq!(
        one_error("limit user \"nosuchuser_q\" { vms 1 }\n"),
        "t.conf:1: failed to get user: nosuchuser_q"
    );
    assert_eq!(
        one_error("limit user daemon { vms 1 }\nlimit user daemon { vms 2 }\n"),
        "t.conf:2: limit user \"daemon\" defined more than once"
    );
    assert_eq!(
        one_error("limit users { vms 1 vms 2 }\n"),
        "t.conf:1: limit vms specified more than once"
    );
    assert_eq!(
        one_error("limit users { vcpus 70000 }\n"),
        "t.conf:1: invalid limit vcpus: 70000"
    );
    assert_eq!(
        one_error("limit users { disks 1 }\n"),
        "t.conf:1: syntax error"
    );
    assert_eq!(
        one_error("limit group { vms 1 }\n"),
        "t.conf:1: syntax error"
    );
    assert_eq!(
        errors("limit users { memory 0 }\n"),
        vec![
            "memory size must be at least 1MB".to_string(),
            "t.conf:1: failed to parse size: 0".to_string()
        ]
    );
    // `limit` stays usable as a macro name.
    assert!(ok("limit = \"4\"\n").warnings.len() <= 1);
}

#[test]
fn config_travels_through_bincode() {
    let config =
        ok("vm \"a\" {\n\tmemory 1G\n\tinterface { lladdr fe:e1:ba:d0:00:01 }\n}\n").config;
    let bytes =
        bincode::serde::encode_to_vec(&config, bincode::config::standard()).expect("encode");
    let (back, _): (Config, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decode");
    assert_eq!(back, config);
}

#[test]
fn limits_of_a_vm_from_elsewhere() {
    let mut vm = VmConfig::new("a");
    vm.boot = Some("/bsd".into());
    vm.memory = Some(512 << 20);
    vm.vcpus = Some(2);
    assert_eq!(vm.check_limits(), Ok(()));
    type Breaks = fn(&mut VmConfig);
    let broken: [(&str, Breaks); 9] = [
        ("/d is given twice", |vm| {
            vm.disks = vec![
                Disk {
                    path: "/d".into(),
                    format: DiskFormat::Raw
                };
                2
            ]
        }),
        ("memory", |vm| vm.memory = Some(1 << 19)),
        ("memory", |vm| vm.memory = Some(MAX_MEMORY + 1)),
        ("vcpu", |vm| vm.vcpus = Some(MAX_VCPUS + 1)),
        ("too many disks", |vm| {
            vm.disks = vec![
                Disk {
                    path: "/d".into(),
                    format: DiskFormat::Raw
                };
                MAX_DISKS + 1
            ]
        }),
        ("too many network", |vm| {
            vm.interface_count = Some(MAX_INTERFACES + 1)
        }),
        ("empty path", |vm| vm.boot = Some(String::new())),
        ("path too long: 4096 bytes, at most 4095", |vm| {
            vm.initrd = Some("/".repeat(MAX_REQUEST_PATH + 1))
        }),
        ("path too long", |vm| {
            vm.disks = vec![Disk {
                path: "/".repeat(MAX_REQUEST_PATH + 1),
                format: DiskFormat::Raw,
            }]
        }),
    ];
    for (what, breaks) in broken {
        let mut bad = vm.clone();
        breaks(&mut bad);
        let err = bad.check_limits().expect_err(what);
        assert!(err.contains(what), "{err} lacks {what}");
    }
    vm.disks = vec![Disk {
        path: "/".repeat(MAX_REQUEST_PATH),
        format: DiskFormat::Raw,
    }];
    assert_eq!(vm.check_limits(), Ok(()));
}
