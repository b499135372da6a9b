//! vmd(8): the virtual machine daemon.

use common::config;
use common::getopt::{Getopt, Opt};
use std::path::PathBuf;
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
            eprintln!("configuration OK");
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
    let _ = (opts.foreground, &opts.socket);
    eprintln!("vmd: running the daemon is not built yet; only -n works");
    ExitCode::FAILURE
}
