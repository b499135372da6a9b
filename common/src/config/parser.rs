//! The vm.conf grammar: OpenBSD's parse.y (statements end at a newline;
//! `vm` and `switch` blocks hold one option per line; interface and
//! `allow instance` blocks also take commas) plus the Linux extensions.
//!
//! Extension keywords (`initrd`, `cmdline`, `vcpu`, `backend`, `accel`,
//! `console log`, `shutdown timeout`, `uid range`) are recognized only
//! where they start an option, so they stay usable as names and macros.
//!
//! After a syntax error the parser skips to the end of the line and goes
//! on in the same block, so one run reports every error of a file. A
//! value error (bad size, unknown user, ...) is reported and the option
//! dropped; the syntax is unaffected.

use super::checks::{self, MemoryError};
use super::lexer::{Kw, Lexer, Pos, Tok, Token};
use super::types::*;
use crate::disk::DiskFormat;
use crate::name::{check_vm_name, NameError, VM_NAME_MAX};
use crate::size;
use std::collections::VecDeque;
use std::path::Path;

/// A syntax error, already reported.
struct Syntax;

type PResult<T> = Result<T, Syntax>;

/// How options in a block are separated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sep {
    /// `vm` and `switch` blocks: newlines.
    Lines,
    /// Interface and `allow instance` blocks: newlines, commas or blanks.
    Loose,
}

/// A VM block being read.
struct VmBuild {
    vm: VmConfig,
    /// `interface` statements seen, the refused ones included.
    nics_seen: usize,
}

pub struct Parser {
    pub lex: Lexer,
    ahead: VecDeque<Token>,
    /// Where the last consumed token was.
    last: Pos,
    /// Closing braces that error recovery skipped and that the enclosing
    /// blocks still have to honour.
    pending_close: usize,
    /// A `limit users` statement was read.
    limit_users_seen: bool,
    pub config: Config,
}

impl Parser {
    pub fn new(lex: Lexer) -> Parser {
        Parser {
            lex,
            ahead: VecDeque::new(),
            last: Pos { file: 0, line: 1 },
            pending_close: 0,
            limit_users_seen: false,
            config: Config::default(),
        }
    }

    // -- token access

    fn peek_at(&mut self, n: usize) -> &Token {
        while self.ahead.len() <= n {
            let token = self.lex.next_token();
            self.ahead.push_back(token);
        }
        &self.ahead[n]
    }

    fn peek(&mut self) -> &Token {
        self.peek_at(0)
    }

    fn peek_tok(&mut self) -> Tok {
        self.peek().tok.clone()
    }

    fn bump(&mut self) -> Token {
        self.peek();
        let token = match self.ahead.pop_front() {
            Some(token) => token,
            None => Token {
                tok: Tok::Eof,
                pos: self.last,
            },
        };
        self.last = token.pos;
        token
    }

    fn error(&mut self, pos: Pos, message: &str) {
        self.lex.error_at(pos, message);
    }

    /// Reports `syntax error` at the next token (unless the lexer already
    /// reported one there).
    fn syntax_error(&mut self) -> Syntax {
        let token = self.peek().clone();
        if token.tok != Tok::Error {
            self.error(token.pos, "syntax error");
        }
        Syntax
    }

    /// Skips the rest of the line, noting closing braces of enclosing
    /// blocks on the way.
    fn recover(&mut self) {
        let mut depth = 0usize;
        loop {
            let token = self.bump();
            match token.tok {
                Tok::Newline | Tok::Error | Tok::Eof => break,
                Tok::Punct(b'{') => depth += 1,
                Tok::Punct(b'}') if depth == 0 => self.pending_close += 1,
                Tok::Punct(b'}') => depth -= 1,
                _ => {}
            }
        }
    }

    fn expect_kw(&mut self, kw: Kw) -> PResult<Pos> {
        if self.peek().tok == Tok::Kw(kw) {
            Ok(self.bump().pos)
        } else {
            Err(self.syntax_error())
        }
    }

    fn expect_punct(&mut self, c: u8) -> PResult<Pos> {
        if self.peek().tok == Tok::Punct(c) {
            Ok(self.bump().pos)
        } else {
            Err(self.syntax_error())
        }
    }

    /// An unquoted extension word such as `timeout` in `shutdown timeout`.
    fn expect_word(&mut self, word: &str) -> PResult<()> {
        if self.peek().word() == Some(word) {
            self.bump();
            Ok(())
        } else {
            Err(self.syntax_error())
        }
    }

    fn end_line(&mut self) -> PResult<()> {
        if self.peek().tok == Tok::Newline {
            self.bump();
            Ok(())
        } else {
            Err(self.syntax_error())
        }
    }

    /// One string token.
    fn single_string(&mut self) -> PResult<(String, Pos)> {
        let token = self.peek().clone();
        match token.tok {
            Tok::Str { text, .. } => {
                self.bump();
                Ok((text, token.pos))
            }
            _ => Err(self.syntax_error()),
        }
    }

    /// parse.y's `string`: one or more adjacent string tokens, joined.
    fn string(&mut self) -> PResult<(String, Pos)> {
        let (mut text, pos) = self.single_string()?;
        while let Tok::Str { text: more, .. } = self.peek_tok() {
            self.bump();
            text.push_str(&more);
        }
        Ok((text, pos))
    }

    fn number(&mut self) -> PResult<(i64, Pos)> {
        let token = self.peek().clone();
        match token.tok {
            Tok::Num(n) => {
                self.bump();
                Ok((n, token.pos))
            }
            _ => Err(self.syntax_error()),
        }
    }

    fn source(&self, pos: Pos) -> String {
        format!("{}:{}", self.lex.file_name(pos), pos.line)
    }

    /// Options up to the closing brace (the opening one is read). Returns
    /// where the block ended.
    fn block(&mut self, sep: Sep, mut item: impl FnMut(&mut Self) -> PResult<()>) -> PResult<Pos> {
        loop {
            loop {
                match self.peek().tok {
                    Tok::Newline => {}
                    Tok::Punct(b',') if sep == Sep::Loose => {}
                    _ => break,
                }
                self.bump();
            }
            if self.pending_close > 0 {
                // Recovery read this block's closing brace and the end of
                // its line; give the line end back to whoever reads on.
                self.pending_close -= 1;
                self.ahead.push_front(Token {
                    tok: Tok::Newline,
                    pos: self.last,
                });
                return Ok(self.last);
            }
            match self.peek().tok {
                Tok::Punct(b'}') => return Ok(self.bump().pos),
                Tok::Eof => return Err(self.syntax_error()),
                _ => {}
            }
            match item(self) {
                Ok(()) => {
                    let next = self.peek().tok.clone();
                    if sep == Sep::Lines && !matches!(next, Tok::Newline | Tok::Punct(b'}')) {
                        self.syntax_error();
                        self.recover();
                    }
                }
                Err(Syntax) => self.recover(),
            }
        }
    }

    // -- statements

    /// The whole input.
    pub fn parse(&mut self) {
        loop {
            match self.peek().tok {
                Tok::Eof => break,
                Tok::Newline => {
                    self.bump();
                    continue;
                }
                _ => {}
            }
            self.pending_close = 0;
            if self.statement().is_err() {
                self.recover();
            }
        }
    }

    fn statement(&mut self) -> PResult<()> {
        let token = self.peek().clone();
        match &token.tok {
            Tok::Kw(Kw::Include) => return self.include(),
            Tok::Kw(Kw::Local) => self.global_local()?,
            Tok::Kw(Kw::Socket) => {
                self.bump();
                self.expect_kw(Kw::Owner)?;
                if let Some(owner) = self.owner_id()? {
                    self.config.globals.socket_owner = owner;
                }
            }
            Tok::Kw(Kw::Staggered) => self.staggered_start()?,
            Tok::Kw(Kw::Switch) => self.switch()?,
            Tok::Kw(Kw::Vm) => self.vm()?,
            Tok::Str { .. } => {
                let is_macro = self.peek_at(1).tok == Tok::Punct(b'=');
                match token.word() {
                    Some("accel") if !is_macro => self.global_accel()?,
                    Some("console") if !is_macro => self.global_console_log()?,
                    Some("shutdown") if !is_macro => {
                        self.bump();
                        if let Some(seconds) = self.shutdown_timeout()? {
                            self.config.globals.shutdown_timeout = seconds;
                        }
                    }
                    Some("uid") if !is_macro => self.global_uid_range()?,
                    Some("limit") if !is_macro => self.global_limit()?,
                    _ => self.varset()?,
                }
            }
            _ => return Err(self.syntax_error()),
        }
        self.end_line()
    }

    fn include(&mut self) -> PResult<()> {
        self.bump();
        let (name, pos) = self.string()?;
        // The newline belongs to this file: read it before switching.
        self.end_line()?;
        let including = self.lex.file_name(pos).to_string();
        let path = match Path::new(&including).parent() {
            Some(dir) if !Path::new(&name).is_absolute() => dir.join(&name),
            _ => Path::new(&name).to_path_buf(),
        };
        let canonical = match std::fs::canonicalize(&path) {
            Ok(canonical) => canonical,
            Err(_) => {
                self.error(pos, &format!("failed to include file {name}"));
                return Ok(());
            }
        };
        if self.lex.open_paths().any(|open| *open == canonical) {
            self.error(pos, &format!("failed to include file {name}: include loop"));
            return Ok(());
        }
        if self.lex.files.len() >= super::MAX_CONFIG_FILES {
            let why = format!("more than {} files in all", super::MAX_CONFIG_FILES);
            self.error(pos, &format!("failed to include file {name}: {why}"));
            return Ok(());
        }
        match super::read_config_file(&canonical) {
            Ok(data) if self.lex.bytes_read + data.len() as u64 > super::MAX_CONFIG_FILE => {
                let why = format!("more than {} MiB in all", super::MAX_CONFIG_FILE >> 20);
                self.error(pos, &format!("failed to include file {name}: {why}"));
            }
            Ok(data) => self.lex.push(path.display().to_string(), canonical, data),
            Err(e) => self.error(pos, &format!("failed to include file {name}: {e}")),
        }
        Ok(())
    }

    /// `name = value`
    fn varset(&mut self) -> PResult<()> {
        let (name, pos) = self.single_string()?;
        self.expect_punct(b'=')?;
        // Define before reading on: the next line may use the macro.
        let (value, _) = self.single_string()?;
        if name.chars().any(char::is_whitespace) {
            self.error(pos, "macro name cannot contain whitespace");
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.error(pos, &format!("invalid macro name: {name}"));
        } else {
            self.lex.define(&name, &value, false);
        }
        Ok(())
    }

    fn global_local(&mut self) -> PResult<()> {
        self.bump();
        match self.peek_tok() {
            Tok::Kw(Kw::Inet6) => {
                self.bump();
                self.config.globals.local_inet6 = true;
                if self.peek().tok == Tok::Kw(Kw::Prefix) {
                    self.bump();
                    let (text, pos) = self.single_string()?;
                    match checks::local_prefix6(&text) {
                        Ok(prefix) => self.config.globals.local_prefix6 = Some(prefix),
                        Err(e) => self.error(pos, &format!("invalid local inet6 prefix: {e}")),
                    }
                }
                Ok(())
            }
            Tok::Kw(Kw::Prefix) => {
                self.bump();
                let (text, pos) = self.single_string()?;
                match checks::local_prefix4(&text) {
                    Ok(prefix) => self.config.globals.local_prefix = prefix,
                    Err(e) => self.error(pos, &format!("invalid local prefix: {e}")),
                }
                Ok(())
            }
            _ => Err(self.syntax_error()),
        }
    }

    fn staggered_start(&mut self) -> PResult<()> {
        self.bump();
        self.expect_kw(Kw::Start)?;
        self.expect_kw(Kw::Parallel)?;
        let (parallel, parallel_pos) = self.number()?;
        self.expect_kw(Kw::Delay)?;
        let (delay, delay_pos) = self.number()?;
        let parallel = match u32::try_from(parallel) {
            Ok(n) if n >= 1 => n,
            _ => {
                self.error(parallel_pos, &format!("invalid parallel: {parallel}"));
                return Ok(());
            }
        };
        let Ok(delay) = u32::try_from(delay) else {
            self.error(delay_pos, &format!("invalid delay: {delay}"));
            return Ok(());
        };
        self.config.globals.staggered_start = Some(StaggeredStart { parallel, delay });
        Ok(())
    }

    fn global_accel(&mut self) -> PResult<()> {
        self.bump();
        if let Some(accel) = self.accel_value()? {
            self.config.globals.accel = accel;
        }
        Ok(())
    }

    fn accel_value(&mut self) -> PResult<Option<Accel>> {
        let (text, pos) = self.single_string()?;
        let accel = Accel::from_keyword(&text);
        if accel.is_none() {
            self.error(pos, &format!("invalid accel: {text}"));
        }
        Ok(accel)
    }

    fn global_console_log(&mut self) -> PResult<()> {
        self.bump();
        self.expect_word("log")?;
        // `console log keep` (a directory is an absolute path).
        if self.peek().word() == Some("keep") {
            self.bump();
            self.config.globals.console_log_keep = true;
            return Ok(());
        }
        let (dir, pos) = self.string()?;
        if !dir.starts_with('/') {
            self.error(
                pos,
                &format!("console log directory must be an absolute path: {dir}"),
            );
        } else if dir.len() >= MAX_PATH {
            self.error(pos, "console log directory name too long");
        } else {
            self.config.globals.console_log_dir = dir;
        }
        if self.peek().tok == Tok::Kw(Kw::Size) {
            self.bump();
            let token = self.peek().clone();
            let bytes = match &token.tok {
                Tok::Num(n) => u64::try_from(*n).ok(),
                Tok::Str { text, .. } => size::parse(text).ok(),
                _ => return Err(self.syntax_error()),
            };
            self.bump();
            match bytes {
                Some(bytes) if (MIN_CONSOLE_LOG_SIZE..=MAX_CONSOLE_LOG_SIZE).contains(&bytes) => {
                    self.config.globals.console_log_size = bytes
                }
                _ => self.error(
                    token.pos,
                    &format!(
                        "invalid console log size: must be {} to {}",
                        size::format(MIN_CONSOLE_LOG_SIZE),
                        size::format(MAX_CONSOLE_LOG_SIZE)
                    ),
                ),
            }
        }
        Ok(())
    }

    /// `timeout SECONDS` after `shutdown`.
    fn shutdown_timeout(&mut self) -> PResult<Option<u32>> {
        self.expect_word("timeout")?;
        let (seconds, pos) = self.number()?;
        if !(1..=MAX_SHUTDOWN_TIMEOUT).contains(&seconds) {
            self.error(pos, &format!("invalid shutdown timeout: {seconds}"));
            return Ok(None);
        }
        Ok(Some(seconds as u32))
    }

    fn global_uid_range(&mut self) -> PResult<()> {
        self.bump();
        self.expect_word("range")?;
        let (text, pos) = self.single_string()?;
        let checked = checks::uid_range_syntax(&text)
            .and_then(|range| checks::uid_range_free_here(range).map(|()| range));
        match checked {
            Ok(range) => self.config.globals.uid_range = range,
            Err(e) => self.error(pos, &e.to_string()),
        }
        Ok(())
    }

    /// `limit users { KEY VALUE ... }` or `limit user NAME { ... }`: what
    /// users may run at once (vms, memory, vcpus; each optional).
    fn global_limit(&mut self) -> PResult<()> {
        let start = self.bump().pos;
        let word = self.peek().word().map(str::to_string);
        let user = match word.as_deref() {
            Some("users") => {
                self.bump();
                None
            }
            Some("user") => {
                self.bump();
                let token = self.peek().clone();
                let owner = match &token.tok {
                    Tok::Num(uid) => checks::owner_uid(*uid),
                    Tok::Str { text, .. } if !text.contains(':') => checks::owner(text),
                    Tok::Str { text, .. } => Err(checks::ValueError::UnknownUser(text.to_string())),
                    _ => return Err(self.syntax_error()),
                };
                self.bump();
                match owner {
                    Ok(owner) => Some(Ok((owner, token.pos))),
                    Err(e) => Some(Err((e, token.pos))),
                }
            }
            _ => return Err(self.syntax_error()),
        };
        self.expect_punct(b'{')?;
        let mut limits = Limits::default();
        self.block(Sep::Loose, |p| p.limit_option(&mut limits))?;
        match user {
            None => {
                if self.limit_users_seen {
                    self.error(start, "limit users specified more than once");
                } else {
                    self.limit_users_seen = true;
                    self.config.globals.user_limits = limits;
                }
            }
            Some(Err((e, pos))) => self.error(pos, &e.to_string()),
            Some(Ok((owner, pos))) => {
                let user = owner.user.clone().unwrap_or_else(|| owner.uid.to_string());
                let limits_of = &mut self.config.globals.limits;
                if limits_of.iter().any(|l| l.uid == owner.uid) {
                    self.error(
                        pos,
                        &format!("limit user \"{user}\" defined more than once"),
                    );
                } else {
                    let source = self.source(start);
                    self.config.globals.limits.push(UserLimit {
                        uid: owner.uid,
                        user,
                        limits,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// One `vms N`, `memory SIZE` or `vcpus N` of a limit block.
    fn limit_option(&mut self, limits: &mut Limits) -> PResult<()> {
        let token = self.peek().clone();
        let key = match &token.tok {
            Tok::Kw(Kw::Memory) => "memory",
            Tok::Str {
                quoted: false,
                text,
            } if text == "vms" => "vms",
            Tok::Str {
                quoted: false,
                text,
            } if text == "vcpus" => "vcpus",
            _ => return Err(self.syntax_error()),
        };
        self.bump();
        let set = match key {
            "vms" => limits.vms.is_some(),
            "vcpus" => limits.vcpus.is_some(),
            _ => limits.memory.is_some(),
        };
        if key == "memory" {
            if let Some(bytes) = self.memory_value(set, "limit memory")? {
                limits.memory = Some(bytes);
            }
            return Ok(());
        }
        let (n, pos) = self.number()?;
        if set {
            self.error(pos, &format!("limit {key} specified more than once"));
        } else if !(0..=MAX_LIMIT_COUNT).contains(&n) {
            self.error(pos, &format!("invalid limit {key}: {n}"));
        } else if key == "vms" {
            limits.vms = Some(n as u32);
        } else {
            limits.vcpus = Some(n as u32);
        }
        Ok(())
    }

    /// `user`, `user:group`, `:group` or a uid; `None` once an unknown
    /// name has been reported.
    fn owner_id(&mut self) -> PResult<Option<Owner>> {
        let token = self.peek().clone();
        let owner = match token.tok {
            Tok::Num(uid) => checks::owner_uid(uid),
            Tok::Str { text, .. } => checks::owner(&text),
            _ => return Err(self.syntax_error()),
        };
        self.bump();
        match owner {
            Ok(owner) => Ok(Some(owner)),
            Err(e) => {
                self.error(token.pos, &e.to_string());
                Ok(None)
            }
        }
    }

    // -- switch

    fn switch(&mut self) -> PResult<()> {
        let start = self.bump().pos;
        let (name, name_pos) = self.string()?;
        self.expect_punct(b'{')?;
        let mut sw = SwitchConfig {
            name,
            enabled: true,
            group: None,
            interface: String::new(),
            locked_lladdr: false,
            rdomain: None,
            up: true,
            source: self.source(start),
        };
        let end = self.block(Sep::Lines, |p| p.switch_option(&mut sw))?;
        if sw.interface.is_empty() {
            self.error(
                end,
                &format!("switch \"{}\" is missing interface name", sw.name),
            );
        } else if self.config.switch(&sw.name).is_some() {
            self.error(
                name_pos,
                &format!("switch \"{}\" defined more than once", sw.name),
            );
        } else {
            self.config.switches.push(sw);
        }
        Ok(())
    }

    fn switch_option(&mut self, sw: &mut SwitchConfig) -> PResult<()> {
        match self.peek_tok() {
            Tok::Kw(Kw::Enable) => sw.enabled = true,
            Tok::Kw(Kw::Disable) => sw.enabled = false,
            Tok::Kw(Kw::Up) => sw.up = true,
            Tok::Kw(Kw::Down) => sw.up = false,
            Tok::Kw(Kw::Group) => {
                self.bump();
                sw.group = self.group_name()?.or(sw.group.take());
                return Ok(());
            }
            Tok::Kw(Kw::Interface) => {
                self.bump();
                let (name, pos) = self.string()?;
                if !checks::valid_ifname(&name) {
                    self.error(pos, &format!("invalid switch interface: {name}"));
                } else if name.len() >= IF_NAMESIZE {
                    self.error(pos, &format!("switch interface too long: {name}"));
                } else {
                    sw.interface = name;
                }
                return Ok(());
            }
            Tok::Kw(Kw::Locked) => {
                self.bump();
                self.expect_kw(Kw::Lladdr)?;
                sw.locked_lladdr = true;
                return Ok(());
            }
            Tok::Kw(Kw::Rdomain) => {
                self.bump();
                sw.rdomain = self.rdomain()?.or(sw.rdomain);
                return Ok(());
            }
            _ => return Err(self.syntax_error()),
        }
        self.bump();
        Ok(())
    }

    fn group_name(&mut self) -> PResult<Option<String>> {
        let (group, pos) = self.string()?;
        if checks::valid_group(&group) {
            // A Linux link group: its name must be iproute2's.
            if let Err(e) = crate::linkgroup::linkgroup_check(&group) {
                self.error(pos, &e);
            }
            Ok(Some(group))
        } else {
            self.error(pos, &format!("invalid group name: {group}"));
            Ok(None)
        }
    }

    fn rdomain(&mut self) -> PResult<Option<u32>> {
        let (n, pos) = self.number()?;
        if (0..=RDOMAIN_MAX).contains(&n) {
            Ok(Some(n as u32))
        } else {
            self.error(pos, &format!("invalid rdomain: {n}"));
            Ok(None)
        }
    }

    // -- vm

    fn vm(&mut self) -> PResult<()> {
        let start = self.bump().pos;
        let (first, first_pos) = self.string()?;
        let (parent, name, name_pos) = if self.peek().tok == Tok::Kw(Kw::Instance) {
            self.bump();
            let (name, pos) = self.string()?;
            (Some((first, first_pos)), name, pos)
        } else {
            (None, first, first_pos)
        };
        self.expect_punct(b'{')?;

        let mut valid = true;
        if let Some((parent, pos)) = &parent {
            if parent.len() >= VM_NAME_MAX {
                self.error(*pos, &format!("vm {parent} name too long"));
                valid = false;
            } else if self.config.vm(parent).is_none() {
                self.error(
                    *pos,
                    &format!("vm \"{name}\" failed: parent vm \"{parent}\" not defined"),
                );
                valid = false;
            }
        }
        match check_vm_name(&name) {
            Ok(()) => {}
            Err(NameError::TooLong) => {
                self.error(name_pos, "vm name too long");
                valid = false;
            }
            Err(NameError::Invalid) => {
                self.error(name_pos, &format!("invalid VM name: {name}"));
                valid = false;
            }
        }
        if valid && self.config.vm(&name).is_some() {
            self.error(name_pos, &format!("vm \"{name}\" defined more than once"));
            valid = false;
        }

        let mut build = VmBuild {
            vm: VmConfig::new(&name),
            nics_seen: 0,
        };
        build.vm.instance_of = parent.map(|(parent, _)| parent);
        build.vm.source = self.source(start);
        self.block(Sep::Lines, |p| p.vm_option(&mut build))?;
        if valid {
            self.config.vms.push(build.vm);
        }
        Ok(())
    }

    fn vm_option(&mut self, build: &mut VmBuild) -> PResult<()> {
        let token = self.peek().clone();
        let vm = &mut build.vm;
        match &token.tok {
            Tok::Kw(Kw::Enable) => vm.enabled = true,
            Tok::Kw(Kw::Disable) => vm.enabled = false,
            Tok::Kw(Kw::Disk) => return self.vm_disk(vm),
            Tok::Kw(Kw::Local) | Tok::Kw(Kw::Interface) => return self.vm_interface(build),
            Tok::Kw(Kw::Boot) => {
                self.bump();
                if self.peek().tok == Tok::Kw(Kw::Device) {
                    self.bump();
                    vm.boot_device = Some(match self.peek_tok() {
                        Tok::Kw(Kw::Cdrom) => BootDevice::Cdrom,
                        Tok::Kw(Kw::Disk) => BootDevice::Disk,
                        Tok::Kw(Kw::Net) => BootDevice::Net,
                        _ => return Err(self.syntax_error()),
                    });
                    self.bump();
                } else {
                    let (path, pos) = self.string()?;
                    self.set_path(&mut vm.boot, path, pos, "kernel");
                }
                return Ok(());
            }
            Tok::Kw(Kw::Cdrom) => {
                self.bump();
                let (path, pos) = self.string()?;
                self.set_path(&mut vm.cdrom, path, pos, "cdrom");
                return Ok(());
            }
            Tok::Kw(Kw::Interfaces) => {
                self.bump();
                let (n, pos) = self.number()?;
                if vm.interface_count.is_some() {
                    self.error(pos, "interfaces specified more than once");
                } else if !(0..=MAX_INTERFACES as i64).contains(&n) {
                    self.error(pos, &format!("too many interfaces: {n}"));
                } else {
                    vm.interface_count = Some(n as usize);
                }
                return Ok(());
            }
            Tok::Kw(Kw::Memory) => return self.vm_memory(vm),
            Tok::Kw(Kw::Owner) => {
                self.bump();
                if let Some(owner) = self.owner_id()? {
                    vm.owner = owner;
                }
                return Ok(());
            }
            Tok::Kw(Kw::Allow) => {
                self.bump();
                self.expect_kw(Kw::Instance)?;
                let allow = &mut vm.allow_instance;
                if self.peek().tok == Tok::Punct(b'{') {
                    self.bump();
                    self.block(Sep::Loose, |p| p.instance_flag(allow))?;
                } else {
                    self.instance_flag(allow)?;
                }
                return Ok(());
            }
            Tok::Str {
                quoted: false,
                text,
            } => return self.vm_extension(vm, &text.clone()),
            _ => return Err(self.syntax_error()),
        }
        self.bump();
        Ok(())
    }

    /// `boot`, `cdrom`, `initrd`: set once, shorter than MAX_PATH.
    fn set_path(&mut self, slot: &mut Option<String>, path: String, pos: Pos, what: &str) {
        if slot.is_some() {
            self.error(pos, &format!("{what} specified more than once"));
        } else if path.len() >= MAX_PATH {
            self.error(pos, &format!("{what} name too long"));
        } else {
            *slot = Some(path);
        }
    }

    fn vm_disk(&mut self, vm: &mut VmConfig) -> PResult<()> {
        self.bump();
        let (path, pos) = self.string()?;
        let mut format = None;
        if self.peek().tok == Tok::Kw(Kw::Format) {
            self.bump();
            let (word, word_pos) = self.string()?;
            match DiskFormat::from_keyword(&word.to_ascii_lowercase()) {
                Some(f) => format = Some(f),
                None => {
                    self.error(word_pos, &format!("unrecognized disk format {word}"));
                    return Ok(());
                }
            }
        }
        let refusal = if vm.disks.len() >= MAX_DISKS {
            Some("too many disks")
        } else if path.len() >= MAX_PATH {
            Some("disk path too long")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.lex.note(why.to_string());
            self.error(pos, &format!("failed to parse disks: {path}"));
            return Ok(());
        }
        let format = format.unwrap_or_else(|| DiskFormat::from_file_name(&path));
        vm.disks.push(Disk { path, format });
        Ok(())
    }

    fn vm_memory(&mut self, vm: &mut VmConfig) -> PResult<()> {
        self.bump();
        if let Some(bytes) = self.memory_value(vm.memory.is_some(), "memory")? {
            vm.memory = Some(bytes);
        }
        Ok(())
    }

    /// A memory size (a number of bytes or a scaled size): `None` once
    /// it is reported, as given twice (`set`: `WHAT specified more than
    /// once`) or not a size (its explanation, then `failed to parse
    /// size`).
    fn memory_value(&mut self, set: bool, what: &str) -> PResult<Option<u64>> {
        let token = self.peek().clone();
        let (parsed, shown): (Result<(u64, Option<String>), MemoryError>, String) = match &token.tok
        {
            Tok::Num(n) => (checks::memory_size(*n), n.to_string()),
            Tok::Str { text, .. } => (checks::memory_size_str(text), text.clone()),
            _ => return Err(self.syntax_error()),
        };
        self.bump();
        if set {
            self.error(token.pos, &format!("{what} specified more than once"));
            return Ok(None);
        }
        match parsed {
            Ok((bytes, note)) => {
                if let Some(note) = note {
                    self.lex.note(note);
                }
                Ok(Some(bytes))
            }
            Err(e) => {
                self.lex.note(e.to_string());
                self.error(token.pos, &format!("failed to parse size: {shown}"));
                Ok(None)
            }
        }
    }

    fn vm_interface(&mut self, build: &mut VmBuild) -> PResult<()> {
        let local = self.peek().tok == Tok::Kw(Kw::Local);
        if local {
            self.bump();
        }
        let start = self.expect_kw(Kw::Interface)?;
        let mut iface = Interface {
            local,
            ..Interface::default()
        };
        let name = match self.peek_tok() {
            Tok::Str { text, .. } => Some((text, self.bump().pos)),
            _ => None,
        };
        if self.peek().tok == Tok::Punct(b'{') {
            self.bump();
            self.block(Sep::Loose, |p| p.iface_option(&mut iface))?;
        } else {
            while matches!(
                self.peek().tok,
                Tok::Kw(
                    Kw::Switch
                        | Kw::Group
                        | Kw::Locked
                        | Kw::Lladdr
                        | Kw::Rdomain
                        | Kw::Up
                        | Kw::Down
                )
            ) {
                self.iface_option(&mut iface)?;
                if self.peek().tok == Tok::Punct(b',') {
                    self.bump();
                }
            }
        }

        build.nics_seen += 1;
        if build.nics_seen > MAX_INTERFACES {
            self.error(start, &format!("too many interfaces: {}", build.nics_seen));
            return Ok(());
        }
        if let Some((name, pos)) = name {
            if name != "tap" {
                if !checks::valid_ifname(&name) {
                    self.error(pos, &format!("invalid interface: {name}"));
                    return Ok(());
                }
                if name.len() >= IF_NAMESIZE {
                    self.error(pos, &format!("interface name too long: {name}"));
                    return Ok(());
                }
                iface.tap = Some(name);
            }
        }
        build.vm.interfaces.push(iface);
        Ok(())
    }

    fn iface_option(&mut self, iface: &mut Interface) -> PResult<()> {
        match self.peek_tok() {
            Tok::Kw(Kw::Switch) => {
                self.bump();
                let (name, pos) = self.string()?;
                if name.len() >= VM_NAME_MAX {
                    self.error(pos, &format!("switch name too long: {name}"));
                } else {
                    iface.switch = Some(name);
                }
            }
            Tok::Kw(Kw::Group) => {
                self.bump();
                iface.group = self.group_name()?.or(iface.group.take());
            }
            Tok::Kw(Kw::Locked) => {
                self.bump();
                self.expect_kw(Kw::Lladdr)?;
                iface.locked = true;
                self.lladdr_value(iface);
            }
            Tok::Kw(Kw::Lladdr) => {
                self.bump();
                self.lladdr_value(iface);
            }
            Tok::Kw(Kw::Rdomain) => {
                self.bump();
                iface.rdomain = self.rdomain()?.or(iface.rdomain);
            }
            Tok::Kw(Kw::Up) => {
                self.bump();
                iface.up = true;
            }
            Tok::Kw(Kw::Down) => {
                self.bump();
                iface.up = false;
            }
            _ => return Err(self.syntax_error()),
        }
        Ok(())
    }

    /// The optional address after `lladdr`.
    fn lladdr_value(&mut self, iface: &mut Interface) {
        let token = self.peek().clone();
        if let Tok::Str { text, .. } = token.tok {
            self.bump();
            match checks::lladdr(&text) {
                Some(mac) => iface.lladdr = Some(mac),
                None => self.error(token.pos, &format!("invalid address: {text}")),
            }
        }
    }

    fn instance_flag(&mut self, allow: &mut AllowInstance) -> PResult<()> {
        match self.peek_tok() {
            Tok::Kw(Kw::Boot) => allow.boot = true,
            Tok::Kw(Kw::Cdrom) => allow.cdrom = true,
            Tok::Kw(Kw::Disk) => allow.disk = true,
            Tok::Kw(Kw::Instance) => allow.instance = true,
            Tok::Kw(Kw::Interface) => allow.interface = true,
            Tok::Kw(Kw::Memory) => allow.memory = true,
            Tok::Kw(Kw::Owner) => {
                self.bump();
                if let Some(owner) = self.owner_id()? {
                    allow.owner = Some(owner);
                }
                return Ok(());
            }
            _ => return Err(self.syntax_error()),
        }
        self.bump();
        Ok(())
    }

    /// The Linux extensions inside a vm block.
    fn vm_extension(&mut self, vm: &mut VmConfig, word: &str) -> PResult<()> {
        let duplicate = match word {
            "initrd" => vm.initrd.is_some(),
            "cmdline" => vm.cmdline.is_some(),
            "vcpu" => vm.vcpus.is_some(),
            "backend" => vm.backend.is_some(),
            "accel" => vm.accel.is_some(),
            "shutdown" => vm.shutdown_timeout.is_some(),
            _ => return Err(self.syntax_error()),
        };
        self.bump();
        match word {
            "initrd" => {
                let (path, pos) = self.string()?;
                self.set_path(&mut vm.initrd, path, pos, "initrd");
            }
            "cmdline" => {
                let (line, pos) = self.string()?;
                if duplicate {
                    self.error(pos, "cmdline specified more than once");
                } else if line.len() >= MAX_CMDLINE {
                    self.error(pos, "cmdline too long");
                } else {
                    vm.cmdline = Some(line);
                }
            }
            "vcpu" => {
                let (n, pos) = self.number()?;
                if duplicate {
                    self.error(pos, "vcpu specified more than once");
                } else if !(1..=MAX_VCPUS as i64).contains(&n) {
                    self.error(pos, &format!("invalid vcpu count: {n}"));
                } else {
                    vm.vcpus = Some(n as u32);
                }
            }
            "backend" => {
                let (text, pos) = self.single_string()?;
                if duplicate {
                    self.error(pos, "backend specified more than once");
                } else {
                    match Backend::from_keyword(&text) {
                        Some(backend) => vm.backend = Some(backend),
                        None => self.error(pos, &format!("invalid backend: {text}")),
                    }
                }
            }
            "accel" => {
                let pos = self.peek().pos;
                let accel = self.accel_value()?;
                if duplicate {
                    self.error(pos, "accel specified more than once");
                } else if accel.is_some() {
                    vm.accel = accel;
                }
            }
            _ => {
                let pos = self.peek().pos;
                let seconds = self.shutdown_timeout()?;
                if duplicate {
                    self.error(pos, "shutdown timeout specified more than once");
                } else if seconds.is_some() {
                    vm.shutdown_timeout = seconds;
                }
            }
        }
        Ok(())
    }
}
