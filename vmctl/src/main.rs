//! vmctl(8): control the virtual machine daemon.

mod create;

use common::getopt::{Getopt, Opt};
use std::process::ExitCode;

const USAGE: &str = "usage:\tvmctl [-v] command [arg ...]";

/// Global options that apply to every command.
pub struct Global {
    pub verbose: u8,
}

struct Command {
    name: &'static str,
    usage: &'static str,
    run: fn(&Global, &[String]) -> ExitCode,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "console",
        usage: "id",
        run: not_built,
    },
    Command {
        name: "create",
        usage: create::USAGE,
        run: create::run,
    },
    Command {
        name: "load",
        usage: "filename",
        run: not_built,
    },
    Command {
        name: "log",
        usage: "[brief | verbose]",
        run: not_built,
    },
    Command {
        name: "pause",
        usage: "id",
        run: not_built,
    },
    Command {
        name: "receive",
        usage: "name",
        run: not_built,
    },
    Command {
        name: "reload",
        usage: "",
        run: not_built,
    },
    Command {
        name: "reset",
        usage: "[all | switches | vms]",
        run: not_built,
    },
    Command {
        name: "send",
        usage: "id",
        run: not_built,
    },
    Command {
        name: "show",
        usage: "[-r] [id]",
        run: not_built,
    },
    Command {
        name: "start",
        usage: "id | name [-cL] [-B device] [-b path] [-d disk] [-i count]\n\
                \t\t[-m size] [-n switch] [-r path] [-t name]",
        run: not_built,
    },
    Command {
        name: "status",
        usage: "[-r] [id]",
        run: not_built,
    },
    Command {
        name: "stop",
        usage: "[-fw] [id | -a]",
        run: not_built,
    },
    Command {
        name: "unpause",
        usage: "id",
        run: not_built,
    },
    Command {
        name: "wait",
        usage: "id",
        run: not_built,
    },
];

fn not_built(_: &Global, _: &[String]) -> ExitCode {
    eprintln!("vmctl: this command is not built yet");
    ExitCode::FAILURE
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::FAILURE
}

/// Prints a command's own usage line and fails.
pub fn command_usage(name: &str) -> ExitCode {
    let usage = COMMANDS
        .iter()
        .find(|c| c.name == name)
        .map_or("", |c| c.usage);
    eprintln!("usage:\tvmctl [-v] {name} {usage}");
    ExitCode::FAILURE
}

/// The command that `word` names or uniquely abbreviates.
fn find_command(word: &str) -> Result<&'static Command, String> {
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
    let mut global = Global { verbose: 0 };
    let mut getopt = Getopt::new(&args, "v", &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short('v', _)) => global.verbose = global.verbose.saturating_add(1),
            Ok(_) => return usage(),
            Err(e) => {
                eprintln!("vmctl: {e}");
                return usage();
            }
        }
    }
    let operands = getopt.operands();
    let Some((word, rest)) = operands.split_first() else {
        return usage();
    };
    match find_command(word) {
        Ok(command) => (command.run)(&global, rest),
        Err(message) => {
            eprintln!("{message}");
            usage()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matching() {
        assert_eq!(find_command("cr").map(|c| c.name), Ok("create"));
        assert_eq!(find_command("stop").map(|c| c.name), Ok("stop"));
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
