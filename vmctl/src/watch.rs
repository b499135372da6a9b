//! `vmctl stats [-w seconds] [id]` and `vmctl events [-1] [id]`: live
//! figures and lifecycle events, for people (a block per VM, a line per
//! event) and, with `-j`, for programs (JSON lines, json.rs).

use crate::client::Client;
use crate::vms::{answer, fail, parse_vmid, request, unexpected};
use crate::{command_usage, json, write_stdout, Global};
use common::ctl::{CtlRequest, VmTarget};
use common::event::Event;
use common::getopt::{Getopt, Opt};
use common::imsg::Message;
use common::size;
use common::stats::VmStats;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `-w`'s largest interval: a day.
const MAX_INTERVAL: u64 = 86_400;

/// The options given (letter, value) and the optional `id`.
type Parsed = (Vec<(char, Option<String>)>, Option<VmTarget>);

/// The options and the optional `id` of stats and events.
fn parse(name: &str, args: &[String], flags: &'static str) -> Result<Parsed, ExitCode> {
    let mut opts = Vec::new();
    let mut getopt = Getopt::new(args, flags, &[]);
    for opt in getopt.by_ref() {
        match opt {
            Ok(Opt::Short(c, value)) => opts.push((c, value)),
            _ => return Err(command_usage(name)),
        }
    }
    let target = match getopt.operands() {
        [] => None,
        [word] => Some(parse_vmid(word).map_err(|e| fail(&e))?),
        _ => return Err(command_usage(name)),
    };
    Ok((opts, target))
}

// --- stats ---

/// `stats [-w seconds] [id]`: once, or every `seconds` until interrupted.
pub fn stats(global: &Global, args: &[String]) -> ExitCode {
    let (opts, target) = match parse("stats", args, "w:") {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let mut interval = None;
    for (_, value) in opts {
        match value.as_deref().map(str::parse::<u64>) {
            Some(Ok(secs)) if (1..=MAX_INTERVAL).contains(&secs) => {
                interval = Some(Duration::from_secs(secs))
            }
            _ => {
                return fail(&format!(
                    "invalid interval: {}: 1 to {MAX_INTERVAL} seconds",
                    value.unwrap_or_default()
                ))
            }
        }
    }
    let clear = interval.is_some() && !global.json && std::io::stdout().is_terminal();
    let mut last: Vec<(u32, u64, Instant)> = Vec::new();
    loop {
        let vms = match stats_list(global, target.clone()) {
            Ok(vms) => vms,
            Err(code) => return code,
        };
        let now = Instant::now();
        if target.is_some() && vms.is_empty() {
            return fail("vm not found");
        }
        let mut text = String::new();
        if clear {
            // As top(1): from the top of a cleared screen.
            text.push_str("\x1b[H\x1b[2J");
        }
        for vm in &vms {
            let use_ = cpu_use(vm, last.iter().find(|(id, _, _)| *id == vm.id), now);
            if global.json {
                text += &json::stats(vm, use_).to_string();
                text.push('\n');
            } else {
                text += &stats_block(vm, use_);
            }
        }
        if let Err(code) = write_stdout(&text) {
            return code;
        }
        let Some(interval) = interval else {
            return ExitCode::SUCCESS;
        };
        last = vms
            .iter()
            .filter_map(|vm| Some((vm.id, vm.cpu_time_ms?, now)))
            .collect();
        std::thread::sleep(interval);
    }
}

/// One `stats` request's answer.
fn stats_list(global: &Global, target: Option<VmTarget>) -> Result<Vec<VmStats>, ExitCode> {
    let mut client = request(global, CtlRequest::Stats { target })?;
    let mut vms = Vec::new();
    loop {
        match answer(&mut client)? {
            Message::CtlStats(vm) => vms.push(*vm),
            Message::CtlVmEnd => return Ok(vms),
            _ => return Err(unexpected()),
        }
    }
}

/// Percent of one CPU the VM used: since the last sample (`-w`), else
/// since it started.
fn cpu_use(vm: &VmStats, last: Option<&(u32, u64, Instant)>, now: Instant) -> Option<f64> {
    let cpu = vm.cpu_time_ms?;
    let (used, over) = match last {
        Some(&(_, before, at)) if cpu >= before => {
            (cpu - before, now.duration_since(at).as_millis() as u64)
        }
        _ => (cpu, vm.uptime_ms?),
    };
    (over > 0).then(|| used as f64 * 100.0 / over as f64)
}

/// `1d02:03:04`, `0:01:05`.
fn duration_text(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match days {
        0 => format!("{h}:{m:02}:{s:02}"),
        d => format!("{d}d{h:02}:{m:02}:{s:02}"),
    }
}

/// A VM's figures for people.
fn stats_block(vm: &VmStats, cpu_use: Option<f64>) -> String {
    let mut text = format!("vm {} {}: {}", vm.id, vm.name, vm.state.as_str());
    if let Some(up) = vm.uptime_ms {
        text += &format!(", up {}", duration_text(up));
    }
    text.push('\n');
    if let Some(cpu) = vm.cpu_time_ms {
        text += &format!("  cpu      {:.2}s", cpu as f64 / 1000.0);
        if let Some(p) = cpu_use {
            text += &format!(", {p:.1}%");
        }
        text.push('\n');
    }
    if let Some(memory) = vm.memory {
        text += &format!("  memory   {}\n", size::format(memory));
    }
    if let Some(backend) = &vm.backend {
        for (i, d) in backend.disks.iter().enumerate() {
            text += &format!(
                "  disk {i}   read {} ({} ops), written {} ({} ops)\n",
                size::format(d.read_bytes),
                d.read_ops,
                size::format(d.written_bytes),
                d.write_ops
            );
        }
    }
    for (i, n) in vm.nics.iter().enumerate() {
        text += &format!(
            "  net {i}    {}: in {} ({} packets, {} dropped), out {} ({} packets, {} dropped)\n",
            n.tap,
            size::format(n.rx_bytes),
            n.rx_packets,
            n.rx_dropped,
            size::format(n.tx_bytes),
            n.tx_packets,
            n.tx_dropped
        );
    }
    if let Some(backend) = &vm.backend {
        text += &format!("  console  {}\n", size::format(backend.console_log_size));
    }
    text
}

// --- events ---

/// `events [-1] [id]`: every event as it comes, until interrupted or,
/// with `-1`, the first one.
pub fn events(global: &Global, args: &[String]) -> ExitCode {
    let (opts, target) = match parse("events", args, "1") {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let once = !opts.is_empty();
    let mut client = match request(global, CtlRequest::Events { target }) {
        Ok(client) => client,
        Err(code) => return code,
    };
    loop {
        let (line, is_event) = match events_next(&mut client, global.json) {
            Ok(next) => next,
            Err(code) => return code,
        };
        if let Err(code) = write_stdout(&line) {
            return code;
        }
        if once && is_event {
            return ExitCode::SUCCESS;
        }
    }
}

/// The next event (true) or dropped-events notice (false) as a line.
fn events_next(client: &mut Client, json: bool) -> Result<(String, bool), ExitCode> {
    match answer(client)? {
        Message::CtlEvent(event) if json => Ok((format!("{}\n", json::event(&event)), true)),
        Message::CtlEvent(event) => Ok((event_line(&event), true)),
        Message::CtlEventsDropped { count } => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let line = match json {
                true => format!("{}\n", json::dropped(now, count)),
                false => format!("{} 0 - dropped {count}\n", time_text(now)),
            };
            Ok((line, false))
        }
        _ => Err(unexpected()),
    }
}

/// `TIME ID NAME EVENT [DETAIL]`; `-` for the configuration's name.
fn event_line(event: &Event) -> String {
    let name = if event.name.is_empty() {
        "-"
    } else {
        &event.name
    };
    let mut line = format!(
        "{} {} {name} {}",
        time_text(event.time_ms),
        event.vmid,
        event.kind.as_str()
    );
    if let Some(detail) = event.kind.detail() {
        line.push(' ');
        line.push_str(&detail);
    }
    line.push('\n');
    line
}

/// ISO 8601 in UTC with milliseconds: `2026-11-28T15:30:01.250Z`.
fn time_text(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::event::{EndReason, EventKind};
    use common::status::VmState;

    #[test]
    fn times_and_lines() {
        assert_eq!(time_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time_text(951_782_400_250), "2000-02-29T00:00:00.250Z");
        assert_eq!(time_text(1_795_872_601_007), "2026-11-28T13:30:01.007Z");
        let event = Event {
            time_ms: 0,
            vmid: 3,
            name: "web".into(),
            kind: EventKind::Stopped {
                why: EndReason::PoweredOff,
            },
        };
        assert_eq!(
            event_line(&event),
            "1970-01-01T00:00:00.000Z 3 web stopped powered-off\n"
        );
        assert_eq!(duration_text(3_723_000), "1:02:03");
        assert_eq!(duration_text(90_061_000), "1d01:01:01");
    }

    #[test]
    fn cpu_use_over_the_interval_or_since_the_start() {
        let vm = VmStats {
            id: 1,
            name: "a".into(),
            state: VmState::Running,
            uptime_ms: Some(10_000),
            cpu_time_ms: Some(5_000),
            memory: None,
            backend: None,
            nics: Vec::new(),
        };
        let now = Instant::now();
        assert_eq!(cpu_use(&vm, None, now), Some(50.0));
        let before = now - Duration::from_secs(2);
        assert_eq!(cpu_use(&vm, Some(&(1, 3_000, before)), now), Some(100.0));
    }
}
