//! vmd(8): the virtual machine daemon.
//!
//! `vmd [-dnv] [-D macro=value] [-f file] [-s socket]` runs the parent;
//! the parent re-executes this binary as `vmd -P ROLE ...` for each child
//! (see proc.rs).

mod control;
mod exec;
mod log;
mod packet;
mod parent;
mod proc;
mod seccomp;
mod socketlock;
mod switch;
#[cfg(target_arch = "x86_64")]
mod syscall_names;
#[cfg(feature = "test-triggers")]
mod trigger;
mod vm;

use common::config;
use common::getopt::{Getopt, Opt};
use common::imsg::Role;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: vmd [-dnv] [-D macro=value] [-f file] [-s socket]";
const DEFAULT_CONFIG: &str = "/etc/vm.conf";
const DEFAULT_SOCKET: &str = "/var/run/vmd.sock";

/// What the command line asks for.
struct Options {
    foreground: bool,
    check_only: bool,
    verbose: u8,
    defines: Vec<(String, String)>,
    config: Option<PathBuf>,
    socket: PathBuf,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        foreground: false,
        check_only: false,
        verbose: 0,
        defines: Vec::new(),
        config: None,
        socket: PathBuf::from(DEFAULT_SOCKET),
    };
    let mut getopt = Getopt::new(args, "dnvD:f:s:", &[]);
    for opt in getopt.by_ref() {
        match opt.map_err(|e| e.to_string())? {
            Opt::Short('d', _) => opts.foreground = true,
            Opt::Short('n', _) => opts.check_only = true,
            Opt::Short('v', _) => opts.verbose = opts.verbose.saturating_add(1),
            Opt::Short('D', Some(def)) => match def.split_once('=') {
                Some((name, value)) if !name.is_empty() => {
                    opts.defines.push((name.to_string(), value.to_string()))
                }
                _ => return Err(format!("could not parse macro definition {def}")),
            },
            Opt::Short('f', Some(path)) => opts.config = Some(PathBuf::from(path)),
            Opt::Short('s', Some(path)) => opts.socket = PathBuf::from(path),
            _ => return Err(USAGE.to_string()),
        }
    }
    if !getopt.operands().is_empty() {
        return Err(USAGE.to_string());
    }
    Ok(opts)
}

/// `vmd -n`: check the configuration file and report.
fn check_config(opts: &Options) -> ExitCode {
    let required = opts.config.is_some();
    let path = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match config::load(&path, &opts.defines, required) {
        Ok(loaded) => {
            for line in &loaded.warnings {
                eprintln!("{line}");
            }
            if opts.verbose > 0 {
                print!("{}", loaded.config);
            }
            // Valid, but vmd would refuse to start these (yet).
            let config = &loaded.config;
            let mut unstartable = 0;
            for vm in &config.vms {
                let resolved = config.resolved_vm(vm);
                let refused = parent::launch::launch_check_built(&resolved)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        parent::launch::launch_check_switches(&resolved, &config.switches)
                            .map_err(|(_, why)| why)
                    });
                if let Err(e) = refused {
                    eprintln!(
                        "{}: warning: vm \"{}\": {e}: vmd will not start it",
                        vm.source, vm.name
                    );
                    unstartable += 1;
                }
            }
            match unstartable {
                0 => eprintln!("configuration OK"),
                1 => eprintln!("configuration OK, but 1 vm cannot start"),
                n => eprintln!("configuration OK, but {n} vms cannot start"),
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for line in &errors {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "-P") {
        return child_main(&args);
    }
    let opts = match parse_options(&args) {
        Ok(opts) => opts,
        Err(message) => {
            if message != USAGE {
                eprintln!("vmd: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    if opts.check_only {
        return check_config(&opts);
    }
    run_daemon(opts)
}

/// `vmd -P ROLE [-v]... [-s socket]`: a child, started by the parent.
fn child_main(args: &[String]) -> ExitCode {
    let mut role = None;
    let mut verbosity = 0u8;
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    // -N NAME: a VM process's VM, there so the title `vmd: vm NAME` fits
    // in the argument space even where it must be rewritten in place.
    for opt in Getopt::new(args, "P:vs:N:", &[]) {
        match opt {
            Ok(Opt::Short('P', Some(name))) => role = Role::from_name(&name),
            Ok(Opt::Short('N', _)) => {}
            Ok(Opt::Short('v', _)) => verbosity = verbosity.saturating_add(1),
            Ok(Opt::Short('s', Some(path))) => socket = PathBuf::from(path),
            _ => role = None,
        }
    }
    match role {
        Some(Role::Control) => control::control_main(verbosity, &socket),
        Some(Role::Switch) => switch::switch_main(verbosity),
        Some(Role::Vm) => vm::vm_main(verbosity),
        None => {
            eprintln!("vmd: -P is for vmd's own children");
            ExitCode::FAILURE
        }
    }
}

/// Checks what the daemon needs, picks where logs go, detaches unless
/// -d, and runs the parent.
fn run_daemon(opts: Options) -> ExitCode {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("vmd: need root privileges: run vmd as root (vmd -n checks a configuration without them)");
        return ExitCode::FAILURE;
    }
    match nix::unistd::User::from_name(proc::VMD_USER) {
        Ok(Some(_)) => {}
        _ => {
            eprintln!(
                "vmd: user {user} does not exist; create it with \
                 `useradd --system --user-group --no-create-home --home-dir {home} --shell /usr/sbin/nologin {user}` \
                 (or `sh regress/setup --user-only` from the source tree)",
                user = proc::VMD_USER,
                home = proc::EMPTY_DIR,
            );
            return ExitCode::FAILURE;
        }
    }
    let required = opts.config.is_some();
    let path = opts
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = match config::load(&path, &opts.defines, required) {
        Ok(loaded) => {
            for line in &loaded.warnings {
                eprintln!("{line}");
            }
            loaded.config
        }
        Err(errors) => {
            for line in &errors {
                eprintln!("{line}");
            }
            return ExitCode::FAILURE;
        }
    };
    // reload reads the file again after the chdir to /.
    let path = std::path::absolute(&path).unwrap_or(path);
    // The parent and the children chdir to /: keep the socket's path valid.
    let socket = match std::path::absolute(&opts.socket) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("vmd: {}: {e}", opts.socket.display());
            return ExitCode::FAILURE;
        }
    };
    // Before anything starts: one vmd per socket.
    let mut lock = match socketlock::SocketLock::take(&socket) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("vmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = proc::open_self_exe() {
        eprintln!("vmd: {e}");
        return ExitCode::FAILURE;
    }
    log::set_verbosity(opts.verbose);
    if opts.foreground {
        log::init_stderr();
    } else {
        if Path::new(log::SYSLOG_SOCKET).exists() {
            log::init_syslog();
        } else {
            if let Err(e) = log::init_file(Path::new(log::LOG_FILE)) {
                eprintln!("vmd: {}: {e}", log::LOG_FILE);
                return ExitCode::FAILURE;
            }
            eprintln!(
                "vmd: {} not found: logging to {}",
                log::SYSLOG_SOCKET,
                log::LOG_FILE
            );
        }
        if let Err(e) = nix::unistd::daemon(false, false) {
            eprintln!("vmd: cannot daemonize: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = lock.record_pid() {
        log::log_warn!("{}: {e}", socketlock::lock_path(&socket).display());
    }
    // In the foreground too (daemon() did it otherwise): vmd runs in /,
    // holding no directory it was started from.
    if let Err(e) = nix::unistd::chdir("/") {
        eprintln!("vmd: cannot change directory to /: {e}");
        return ExitCode::FAILURE;
    }
    let code = parent::parent_main(parent::ParentOptions {
        socket,
        config_path: path,
        config_required: required,
        defines: opts.defines,
        config,
    });
    // Held until the parent is done with the socket.
    drop(lock);
    code
}
