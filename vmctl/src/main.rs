//! vmctl(8): control the virtual machine daemon.

/// `eprintln!` that never panics: a message vmctl cannot write (stderr a
/// closed pipe or a full disk) is dropped, and the exit status still says
/// what happened.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see [`errln`]).
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod client;
mod console;
mod create;
mod json;
mod remote;
mod send;
mod vms;
mod watch;

use common::getopt::{Getopt, Opt};
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:\tvmctl [-jv] [-H [user@]host] [-s socket] command [arg ...]";

/// Global options that apply to every command.
pub struct Global {
    pub verbose: u8,
    /// `-j`: status, stats and events print JSON, one object a line.
    pub json: bool,
    /// vmd's control socket: `-s PATH`, `$VMD_SOCKET` or the default.
    pub socket: PathBuf,
    /// `-H [user@]host`: vmd on that host, through ssh.
    pub remote: Option<String>,
    /// `-s PATH` with `-H`: the remote host's socket (else its default).
    pub remote_socket: Option<String>,
}

struct Command {
    name: &'static str,
    usage: &'static str,
    run: fn(&Global, &[String]) -> ExitCode,
    /// With `-H`, run as a whole on the remote host (it names files, a
    /// terminal or a stream there) rather than through the proxy.
    remote_whole: bool,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "console",
        usage: "id",
        run: vms::console,
        remote_whole: true,
    },
    Command {
        name: "create",
        usage: create::USAGE,
        run: create::run,
        remote_whole: true,
    },
    Command {
        name: "events",
        usage: "[-1] [id]",
        run: watch::events,
        remote_whole: false,
    },
    Command {
        name: "load",
        usage: "filename",
        run: vms::load,
        remote_whole: true,
    },
    Command {
        name: "log",
        usage: "brief | verbose",
        run: vms::log,
        remote_whole: false,
    },
    Command {
        name: "pause",
        usage: "id",
        run: vms::pause,
        remote_whole: false,
    },
    Command {
        name: "receive",
        usage: "name",
        run: send::receive,
        remote_whole: true,
    },
    Command {
        name: "reload",
        usage: "",
        run: vms::reload,
        remote_whole: false,
    },
    Command {
        name: "reset",
        usage: "[all | switches | vms]",
        run: vms::reset,
        remote_whole: false,
    },
    Command {
        name: "send",
        usage: "id",
        run: send::send,
        remote_whole: true,
    },
    Command {
        name: "show",
        usage: "[-r] [id]",
        run: vms::status,
        remote_whole: false,
    },
    Command {
        name: "start",
        usage: "id | name [-cL] [-B device] [-b path] [-d disk] [-i count]\n\
                \t\t[-m size] [-n switch] [-r path] [-t name]\n\
                \t\t[--initrd path] [--cmdline string]",
        run: vms::start,
        remote_whole: true,
    },
    Command {
        name: "stats",
        usage: "[-w seconds] [id]",
        run: watch::stats,
        remote_whole: false,
    },
    Command {
        name: "status",
        usage: "[-r] [id]",
        run: vms::status,
        remote_whole: false,
    },
    Command {
        name: "stop",
        usage: "[id | -a] [-fw]",
        run: vms::stop,
        remote_whole: false,
    },
    Command {
        name: "unpause",
        usage: "id",
        run: vms::unpause,
        remote_whole: false,
    },
    Command {
        name: "wait",
        usage: "id",
        run: vms::wait,
        remote_whole: false,
    },
];

/// The general usage line and every command's, as OpenBSD's vmctl prints
/// them.
fn usage_text() -> String {
    let mut text = format!("{USAGE}\n");
    for c in COMMANDS {
        text += &format!("\tvmctl {}\n", command_line(c.name, c.usage));
    }
    text
}

/// A command's own usage line.
fn command_usage_text(name: &str) -> String {
    let usage = COMMANDS
        .iter()
        .find(|c| c.name == name)
        .map_or("", |c| c.usage);
    format!("usage:\tvmctl [-v] {}\n", command_line(name, usage))
}

/// The usage after a mistake: on stderr, and vmctl fails.
fn usage() -> ExitCode {
    err!("{}", usage_text());
    ExitCode::FAILURE
}

/// Prints a command's own usage line and fails.
pub fn command_usage(name: &str) -> ExitCode {
    err!("{}", command_usage_text(name));
    ExitCode::FAILURE
}

/// Whether `word` asks for help (`-h`, `--help`).
fn asks_help(word: &str) -> bool {
    word == "-h" || word == "--help"
}

/// Whether the global options (before the command) ask for help:
/// `vmctl --help`, `vmctl -s SOCK -h`.
fn global_help(args: &[String]) -> bool {
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if asks_help(word) {
            return true;
        }
        if word == "--" || !word.starts_with('-') || word == "-" {
            return false;
        }
        // -s and -H take the next word unless their value is attached.
        if word.ends_with('s') || word.ends_with('H') {
            words.next();
        }
    }
    false
}

/// `name usage`, without a trailing blank for commands that take nothing.
fn command_line(name: &str, usage: &str) -> String {
    if usage.is_empty() {
        name.to_string()
    } else {
        format!("{name} {usage}")
    }
}

/// Writes `text` to standard output, all of it (print! would panic on a
/// write error). A reader that went away (`vmctl status | head`) ends
/// vmctl quietly; any other failure says what it was (`vmctl: stdout: No
/// space left on device`). Either way the exit status is 1.
pub fn write_stdout(text: &str) -> Result<(), ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(ExitCode::FAILURE),
        Err(e) => {
            let why = e.raw_os_error().map_or(e.to_string(), |n| {
                nix::errno::Errno::from_raw(n).desc().to_string()
            });
            errln!("vmctl: stdout: {why}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Abbreviations that a later command made ambiguous and that keep
/// meaning what they meant before it (`stat`: `status`, not `stats`).
const KEPT_ABBREVIATIONS: &[(&str, &str)] = &[("stat", "status")];

/// The command that `word` names or uniquely abbreviates.
fn find_command(word: &str) -> Result<&'static Command, String> {
    let kept = KEPT_ABBREVIATIONS.iter().find(|(short, _)| *short == word);
    if let Some(command) = kept.and_then(|(_, name)| COMMANDS.iter().find(|c| c.name == *name)) {
        return Ok(command);
    }
    let mut matches = COMMANDS.iter().filter(|c| c.name.starts_with(word));
    match (matches.next(), matches.next()) {
        _ if word.is_empty() => Err(format!("unknown argument: {word}")),
        (Some(command), None) => Ok(command),
        (Some(_), Some(_)) => match COMMANDS.iter().find(|c| c.name == word) {
            Some(exact) => Ok(exact),
            None => Err(format!("ambiguous argument: {word}")),
        },
        (None, _) => Err(format!("unknown argument: {word}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Help asked for is no mistake: the usage on stdout, and success.
    if global_help(&args) {
        print!("{}", usage_text());
        return ExitCode::SUCCESS;
    }
    let mut verbose = 0u8;
    let mut json = false;
    let mut socket = None;
    let mut remote = None;
    let mut getopt = Getopt::new(&args, "jvH:s:", &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short('j', _)) => json = true,
            Ok(Opt::Short('v', _)) => verbose = verbose.saturating_add(1),
            Ok(Opt::Short('s', Some(path))) => socket = Some(path),
            Ok(Opt::Short('H', Some(host))) => remote = Some(host),
            Ok(_) => return usage(),
            Err(e) => {
                errln!("vmctl: {e}");
                return usage();
            }
        }
    }
    let global = Global {
        verbose,
        json,
        socket: client::socket_path(socket.as_deref()),
        remote_socket: remote.is_some().then_some(socket).flatten(),
        remote,
    };
    let operands = getopt.operands();
    let Some((word, rest)) = operands.split_first() else {
        return usage();
    };
    // Hidden: what `-H` runs on the other host.
    if word == "proxy" && global.remote.is_none() {
        return match rest {
            [] => remote::proxy(&global.socket),
            _ => usage(),
        };
    }
    match find_command(word) {
        Ok(command) if rest.first().is_some_and(|a| asks_help(a)) => {
            print!("{}", command_usage_text(command.name));
            ExitCode::SUCCESS
        }
        Ok(command) => match &global.remote {
            Some(host) if command.remote_whole => {
                remote::run_whole(&global, host, command.name, rest)
            }
            _ => (command.run)(&global, rest),
        },
        Err(message) => {
            errln!("{message}");
            usage()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_words() {
        let words = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(global_help(&words(&["--help"])));
        assert!(global_help(&words(&["-s", "/s", "-h"])));
        assert!(global_help(&words(&["-vs", "/s", "--help"])));
        assert!(!global_help(&words(&["-s", "-h"])));
        assert!(global_help(&words(&["-H", "host", "-h"])));
        assert!(!global_help(&words(&["-H", "-h"])));
        assert!(!global_help(&words(&["status", "-h"])));
        assert!(!global_help(&words(&[])));
    }

    #[test]
    fn prefix_matching() {
        assert_eq!(find_command("cr").map(|c| c.name), Ok("create"));
        assert_eq!(find_command("stop").map(|c| c.name), Ok("stop"));
        assert_eq!(find_command("stat").map(|c| c.name), Ok("status"));
        assert_eq!(find_command("stats").map(|c| c.name), Ok("stats"));
        assert_eq!(find_command("ev").map(|c| c.name), Ok("events"));
        assert_eq!(
            find_command("sta").err(),
            Some("ambiguous argument: sta".into())
        );
        assert_eq!(
            find_command("re").err(),
            Some("ambiguous argument: re".into())
        );
        assert_eq!(find_command("x").err(), Some("unknown argument: x".into()));
    }
}
