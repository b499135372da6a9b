//! The vm.conf tokenizer. It reads characters the way OpenBSD's parse.y
//! does (so the same files split into the same tokens): `#` comments,
//! backslash continuations, quoted strings, numbers, unquoted words, and
//! `$macro` expansion, which pushes the macro's value back into the input
//! to be read again (outside quotes only, and never recursively).
//!
//! Included files are a stack of sources: at the end of one, reading goes
//! on in the file that included it.

use std::path::PathBuf;

/// Longest token, as OpenBSD's lexer buffer allows.
const MAX_TOKEN: usize = 8096;

/// The reserved words of OpenBSD's vm.conf. Linux extensions are not
/// reserved: the parser recognizes them by position (see parser.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kw {
    Add,
    Allow,
    Boot,
    Cdrom,
    Delay,
    Device,
    Disable,
    Disk,
    Down,
    Enable,
    Format,
    Group,
    Id,
    Include,
    Inet6,
    Instance,
    Interface,
    Interfaces,
    Lladdr,
    Local,
    Locked,
    Memory,
    Net,
    Owner,
    Parallel,
    Prefix,
    Rdomain,
    Size,
    Socket,
    Staggered,
    Start,
    Switch,
    Up,
    Vm,
}

const KEYWORDS: &[(&str, Kw)] = &[
    ("add", Kw::Add),
    ("allow", Kw::Allow),
    ("boot", Kw::Boot),
    ("cdrom", Kw::Cdrom),
    ("delay", Kw::Delay),
    ("device", Kw::Device),
    ("disable", Kw::Disable),
    ("disk", Kw::Disk),
    ("down", Kw::Down),
    ("enable", Kw::Enable),
    ("format", Kw::Format),
    ("group", Kw::Group),
    ("id", Kw::Id),
    ("include", Kw::Include),
    ("inet6", Kw::Inet6),
    ("instance", Kw::Instance),
    ("interface", Kw::Interface),
    ("interfaces", Kw::Interfaces),
    ("lladdr", Kw::Lladdr),
    ("local", Kw::Local),
    ("locked", Kw::Locked),
    ("memory", Kw::Memory),
    ("net", Kw::Net),
    ("owner", Kw::Owner),
    ("parallel", Kw::Parallel),
    ("prefix", Kw::Prefix),
    ("rdomain", Kw::Rdomain),
    ("size", Kw::Size),
    ("socket", Kw::Socket),
    ("staggered", Kw::Staggered),
    ("start", Kw::Start),
    ("switch", Kw::Switch),
    ("up", Kw::Up),
    ("vm", Kw::Vm),
];

fn lookup(word: &str) -> Option<Kw> {
    KEYWORDS
        .iter()
        .find(|(name, _)| *name == word)
        .map(|&(_, kw)| kw)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Kw(Kw),
    /// A quoted string, or an unquoted word that is not a keyword.
    Str {
        text: String,
        quoted: bool,
    },
    Num(i64),
    /// Any other single character: `{ } , = -` and the like.
    Punct(u8),
    Newline,
    /// The lexer already reported an error and skipped the rest of the
    /// line, its newline included.
    Error,
    Eof,
}

/// Where a token starts: an index into the file names, and a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub file: usize,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub pos: Pos,
}

impl Token {
    /// The text of an unquoted word (candidate for a Linux extension keyword).
    pub fn word(&self) -> Option<&str> {
        match &self.tok {
            Tok::Str {
                text,
                quoted: false,
            } => Some(text),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Macro {
    name: String,
    value: String,
    used: bool,
    /// Set with `-D`: file definitions do not replace it.
    persist: bool,
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Byte(u8),
    StartExpand,
    DoneExpand,
}

struct Source {
    file: usize,
    data: Vec<u8>,
    pos: usize,
    line: usize,
    eof_reached: bool,
    unget: Vec<Item>,
}

/// An open file on the include stack, by its canonical path.
pub struct OpenFile {
    pub name: String,
    pub canonical: PathBuf,
}

pub struct Lexer {
    /// Every file read so far, by the index a `Pos` carries.
    pub files: Vec<OpenFile>,
    stack: Vec<Source>,
    expanding: bool,
    macros: Vec<Macro>,
    /// Lines for stderr, errors and notes, in the order they arose.
    pub diags: Vec<String>,
    pub errors: usize,
    last_pos: Pos,
    /// Where the token being read started.
    token_pos: Pos,
    /// Bytes of every file read so far (see MAX_CONFIG_FILE).
    pub bytes_read: u64,
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

fn is_punct(c: u8) -> bool {
    c.is_ascii_punctuation()
}

fn allowed_to_end_number(c: u8) -> bool {
    c.is_ascii_whitespace() || matches!(c, b')' | b',' | b'/' | b'}' | b'=')
}

fn allowed_in_string(c: u8) -> bool {
    is_alnum(c)
        || (is_punct(c) && !matches!(c, b'(' | b')' | b'{' | b'}' | b'!' | b'=' | b'#' | b','))
}

impl Lexer {
    /// A lexer with the `-D name=value` macros defined.
    pub fn new(defines: &[(String, String)]) -> Lexer {
        let mut lexer = Lexer {
            files: Vec::new(),
            stack: Vec::new(),
            expanding: false,
            macros: Vec::new(),
            diags: Vec::new(),
            errors: 0,
            last_pos: Pos { file: 0, line: 1 },
            token_pos: Pos { file: 0, line: 1 },
            bytes_read: 0,
        };
        for (name, value) in defines {
            lexer.define(name, value, true);
        }
        lexer
    }

    /// Starts reading `data` as file `name`; reading returns to the
    /// current file at its end.
    pub fn push(&mut self, name: String, canonical: PathBuf, data: Vec<u8>) {
        self.bytes_read += data.len() as u64;
        self.files.push(OpenFile { name, canonical });
        self.stack.push(Source {
            file: self.files.len() - 1,
            data,
            pos: 0,
            line: 1,
            eof_reached: false,
            unget: Vec::new(),
        });
    }

    /// The canonical paths of the files being read, outermost first.
    pub fn open_paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.stack.iter().map(|src| &self.files[src.file].canonical)
    }

    pub fn file_name(&self, pos: Pos) -> &str {
        self.files.get(pos.file).map_or("", |f| f.name.as_str())
    }

    /// Reports `FILE:LINE: message`.
    pub fn error_at(&mut self, pos: Pos, message: &str) {
        let text = format!("{}:{}: {}", self.file_name(pos), pos.line, message);
        self.diags.push(text);
        self.errors += 1;
    }

    /// Reports a line without a place, as OpenBSD's log_warnx does before
    /// the `FILE:LINE:` error it explains.
    pub fn note(&mut self, text: String) {
        self.diags.push(text);
    }

    /// Sets macro `name`; a `-D` definition wins over the file's.
    pub fn define(&mut self, name: &str, value: &str, persist: bool) {
        if let Some(i) = self.macros.iter().position(|m| m.name == name) {
            if self.macros[i].persist {
                return;
            }
            self.macros.remove(i);
        }
        self.macros.push(Macro {
            name: name.to_string(),
            value: value.to_string(),
            used: false,
            persist,
        });
    }

    /// `warning: macro 'X' not used` for each macro never expanded.
    pub fn unused_macro_warnings(&self) -> Vec<String> {
        self.macros
            .iter()
            .filter(|m| !m.used)
            .map(|m| format!("warning: macro '{}' not used", m.name))
            .collect()
    }

    fn current_pos(&self) -> Pos {
        match self.stack.last() {
            Some(src) => Pos {
                file: src.file,
                line: src.line,
            },
            None => self.last_pos,
        }
    }

    fn bump_line(&mut self) {
        if let Some(src) = self.stack.last_mut() {
            src.line += 1;
        }
    }

    fn igetc(&mut self) -> Option<u8> {
        let src = self.stack.last_mut()?;
        loop {
            let item = match src.unget.pop() {
                Some(item) => item,
                None => {
                    let byte = *src.data.get(src.pos)?;
                    src.pos += 1;
                    Item::Byte(byte)
                }
            };
            match item {
                Item::StartExpand => self.expanding = true,
                Item::DoneExpand => self.expanding = false,
                Item::Byte(b) => return Some(b),
            }
        }
    }

    fn unget(&mut self, c: Option<u8>) {
        if let (Some(c), Some(src)) = (c, self.stack.last_mut()) {
            src.unget.push(Item::Byte(c));
        }
    }

    /// Leaves the current file; false at the outermost one.
    fn pop_file(&mut self) -> bool {
        if self.stack.len() <= 1 {
            return false;
        }
        self.stack.pop();
        true
    }

    /// The next character: inside quotes raw, outside with backslash
    /// escapes and continuations applied. The first end of a file reads as
    /// a newline, so a last line without one still ends a statement.
    fn lgetc(&mut self, quote: Option<u8>) -> Option<u8> {
        if let Some(q) = quote {
            return match self.igetc() {
                Some(c) => Some(c),
                None => {
                    let pos = self.token_pos;
                    self.error_at(pos, "reached end of file while parsing quoted string");
                    if self.pop_file() {
                        Some(q)
                    } else {
                        None
                    }
                }
            };
        }
        let mut c = self.igetc();
        while c == Some(b'\\') {
            let next = self.igetc();
            if next != Some(b'\n') {
                c = next;
                break;
            }
            self.bump_line();
            c = self.igetc();
        }
        if c.is_none() {
            if let Some(src) = self.stack.last_mut() {
                if !src.eof_reached {
                    src.eof_reached = true;
                    return Some(b'\n');
                }
            }
            while c.is_none() {
                if !self.pop_file() {
                    return None;
                }
                c = self.igetc();
            }
        }
        c
    }

    /// Skips the rest of the line after an error the lexer reported.
    fn findeol(&mut self, pos: Pos) -> Token {
        loop {
            match self.lgetc(None) {
                Some(b'\n') => {
                    self.bump_line();
                    break;
                }
                None => break,
                Some(_) => {}
            }
        }
        Token {
            tok: Tok::Error,
            pos,
        }
    }

    /// The end of input, placed on the last line of the file.
    fn eof(&mut self) -> Token {
        let pos = match self.stack.last() {
            Some(src) => {
                let newlines = src.data.iter().filter(|&&b| b == b'\n').count();
                let partial = usize::from(src.data.last().is_some_and(|&b| b != b'\n'));
                Pos {
                    file: src.file,
                    line: (newlines + partial).max(1),
                }
            }
            None => self.last_pos,
        };
        Token { tok: Tok::Eof, pos }
    }

    pub fn next_token(&mut self) -> Token {
        let token = self.lex();
        self.last_pos = token.pos;
        token
    }

    fn lex(&mut self) -> Token {
        'top: loop {
            let mut c = self.lgetc(None);
            while matches!(c, Some(b' ') | Some(b'\t')) {
                c = self.lgetc(None);
            }
            let pos = self.current_pos();
            self.token_pos = pos;
            if c == Some(b'#') {
                while !matches!(c, Some(b'\n') | None) {
                    c = self.lgetc(None);
                }
            }
            if c == Some(b'$') && !self.expanding {
                let mut name = Vec::new();
                loop {
                    let Some(ch) = self.lgetc(None) else {
                        return self.eof();
                    };
                    if name.len() + 1 >= MAX_TOKEN - 1 {
                        self.error_at(pos, "string too long");
                        return self.findeol(pos);
                    }
                    if is_alnum(ch) || ch == b'_' {
                        name.push(ch);
                        continue;
                    }
                    self.unget(Some(ch));
                    break;
                }
                let name = String::from_utf8_lossy(&name).into_owned();
                let Some(m) = self.macros.iter_mut().find(|m| m.name == name) else {
                    self.error_at(pos, &format!("macro '{name}' not defined"));
                    return self.findeol(pos);
                };
                m.used = true;
                let value = m.value.clone().into_bytes();
                if let Some(src) = self.stack.last_mut() {
                    src.unget.push(Item::DoneExpand);
                    src.unget.extend(value.iter().rev().map(|&b| Item::Byte(b)));
                    src.unget.push(Item::StartExpand);
                }
                continue 'top;
            }

            if let Some(quote @ (b'"' | b'\'')) = c {
                let mut buf = Vec::new();
                loop {
                    let Some(mut ch) = self.lgetc(Some(quote)) else {
                        return Token {
                            tok: Tok::Error,
                            pos,
                        };
                    };
                    if ch == b'\n' {
                        self.bump_line();
                        continue;
                    } else if ch == b'\\' {
                        let Some(next) = self.lgetc(Some(quote)) else {
                            return Token {
                                tok: Tok::Error,
                                pos,
                            };
                        };
                        if next == quote || next == b' ' || next == b'\t' {
                            ch = next;
                        } else if next == b'\n' {
                            self.bump_line();
                            continue;
                        } else {
                            self.unget(Some(next));
                        }
                    } else if ch == quote {
                        break;
                    } else if ch == 0 {
                        self.error_at(pos, "syntax error");
                        return self.findeol(pos);
                    }
                    if buf.len() + 1 >= MAX_TOKEN - 1 {
                        self.error_at(pos, "string too long");
                        return self.findeol(pos);
                    }
                    buf.push(ch);
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                return Token {
                    tok: Tok::Str { text, quoted: true },
                    pos,
                };
            }

            if let Some(first @ (b'-' | b'0'..=b'9')) = c {
                let mut buf = vec![first];
                let mut ch = self.lgetc(None);
                while let Some(digit @ b'0'..=b'9') = ch {
                    buf.push(digit);
                    if buf.len() >= MAX_TOKEN {
                        self.error_at(pos, "string too long");
                        return self.findeol(pos);
                    }
                    ch = self.lgetc(None);
                }
                self.unget(ch);
                let only_minus = buf == b"-";
                if !only_minus && ch.is_none_or(allowed_to_end_number) {
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    return match text.parse::<i64>() {
                        Ok(n) => Token {
                            tok: Tok::Num(n),
                            pos,
                        },
                        Err(_) => {
                            let why = if first == b'-' {
                                "too small"
                            } else {
                                "too large"
                            };
                            self.error_at(pos, &format!("\"{text}\" invalid number: {why}"));
                            self.findeol(pos)
                        }
                    };
                }
                // Not a number: read it again as a word.
                for &b in buf[1..].iter().rev() {
                    self.unget(Some(b));
                }
                if first == b'-' {
                    return Token {
                        tok: Tok::Punct(b'-'),
                        pos,
                    };
                }
                c = Some(first);
            }

            if let Some(first) = c.filter(|&ch| is_alnum(ch) || matches!(ch, b':' | b'_' | b'/')) {
                let mut buf = vec![first];
                let mut ch = self.lgetc(None);
                while let Some(b) = ch.filter(|&b| allowed_in_string(b)) {
                    buf.push(b);
                    if buf.len() >= MAX_TOKEN {
                        self.error_at(pos, "string too long");
                        return self.findeol(pos);
                    }
                    ch = self.lgetc(None);
                }
                self.unget(ch);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let tok = match lookup(&text) {
                    Some(kw) => Tok::Kw(kw),
                    None => Tok::Str {
                        text,
                        quoted: false,
                    },
                };
                return Token { tok, pos };
            }

            return match c {
                Some(b'\n') => {
                    self.bump_line();
                    Token {
                        tok: Tok::Newline,
                        pos,
                    }
                }
                None => self.eof(),
                Some(other) => Token {
                    tok: Tok::Punct(other),
                    pos,
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex_all(text: &str, defines: &[(String, String)]) -> (Vec<(Tok, usize)>, Lexer) {
        let mut lexer = Lexer::new(defines);
        lexer.push(
            "t.conf".into(),
            PathBuf::from("/t.conf"),
            text.as_bytes().to_vec(),
        );
        let mut out = Vec::new();
        loop {
            let token = lexer.next_token();
            if token.tok == Tok::Eof {
                break;
            }
            out.push((token.tok, token.pos.line));
        }
        (out, lexer)
    }

    fn word(s: &str) -> Tok {
        Tok::Str {
            text: s.into(),
            quoted: false,
        }
    }

    fn quoted(s: &str) -> Tok {
        Tok::Str {
            text: s.into(),
            quoted: true,
        }
    }

    #[test]
    fn words_numbers_keywords_and_punctuation() {
        let (toks, _) = lex_all("vm x { memory 1G, 512 }\n", &[]);
        let toks: Vec<Tok> = toks.into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            toks,
            vec![
                Tok::Kw(Kw::Vm),
                word("x"),
                Tok::Punct(b'{'),
                Tok::Kw(Kw::Memory),
                word("1G"),
                Tok::Punct(b','),
                Tok::Num(512),
                Tok::Punct(b'}'),
                Tok::Newline,
                Tok::Newline, // the end of the file reads as one more newline
            ]
        );
    }

    #[test]
    fn unquoted_words_allow_paths_owners_and_addresses() {
        let (toks, _) = lex_all(
            "/bsd.rd :wheel user:group 100.64.0.0/10 fe:e1:ba:d0:00:01 -x",
            &[],
        );
        let toks: Vec<Tok> = toks.into_iter().map(|(t, _)| t).collect();
        assert_eq!(toks[0], word("/bsd.rd"));
        assert_eq!(toks[1], word(":wheel"));
        assert_eq!(toks[2], word("user:group"));
        assert_eq!(toks[3], word("100.64.0.0/10"));
        assert_eq!(toks[4], word("fe:e1:ba:d0:00:01"));
        assert_eq!(toks[5], Tok::Punct(b'-'));
        assert_eq!(toks[6], word("x"));
    }

    #[test]
    fn an_argument_starting_with_a_dot_must_be_quoted() {
        let (toks, _) = lex_all("./disk.img \"./disk.img\"", &[]);
        assert_eq!(toks[0].0, Tok::Punct(b'.'));
        assert_eq!(toks[1].0, word("/disk.img"));
        assert_eq!(toks[2].0, quoted("./disk.img"));
    }

    #[test]
    fn comments_continuations_and_line_numbers() {
        let text = "# comment\nmemory \\\n  1G # trailing\n\"multi\nline\" x\n";
        let (toks, _) = lex_all(text, &[]);
        assert_eq!(toks[0], (Tok::Newline, 1));
        assert_eq!(toks[1], (Tok::Kw(Kw::Memory), 2));
        assert_eq!(toks[2], (word("1G"), 3));
        assert_eq!(toks[3], (Tok::Newline, 3));
        assert_eq!(toks[4], (quoted("multiline"), 4));
        assert_eq!(toks[5], (word("x"), 5));
        assert_eq!(toks[6], (Tok::Newline, 5));
    }

    #[test]
    fn quoted_escapes() {
        let (toks, _) = lex_all(r#""a\"b" 'c\ d' "e\nf""#, &[]);
        assert_eq!(toks[0].0, quoted("a\"b"));
        assert_eq!(toks[1].0, quoted("c d"));
        assert_eq!(toks[2].0, quoted("e\\nf"));
    }

    #[test]
    fn macros_expand_outside_quotes_only() {
        let defines = vec![("disk".to_string(), "/var/disk.img".to_string())];
        let (toks, lexer) = lex_all("$disk \"$disk\" $disk.bak", &defines);
        assert_eq!(toks[0].0, word("/var/disk.img"));
        assert_eq!(toks[1].0, quoted("$disk"));
        assert_eq!(toks[2].0, word("/var/disk.img.bak"));
        assert!(lexer.unused_macro_warnings().is_empty());
    }

    #[test]
    fn a_macro_can_expand_to_several_tokens_but_not_recursively() {
        let defines = vec![
            ("opts".to_string(), "memory 1G".to_string()),
            ("inner".to_string(), "$opts".to_string()),
        ];
        let (toks, _) = lex_all("$opts $inner", &defines);
        assert_eq!(toks[0].0, Tok::Kw(Kw::Memory));
        assert_eq!(toks[1].0, word("1G"));
        assert_eq!(toks[2].0, Tok::Punct(b'$'));
        assert_eq!(toks[3].0, word("opts"));
    }

    #[test]
    fn undefined_macro_is_an_error_that_skips_the_line() {
        let (toks, lexer) = lex_all("boot $nope x\nup\n", &[]);
        assert_eq!(toks[0].0, Tok::Kw(Kw::Boot));
        assert_eq!(toks[1], (Tok::Error, 1));
        assert_eq!(toks[2], (Tok::Kw(Kw::Up), 2));
        assert_eq!(lexer.diags[0], "t.conf:1: macro 'nope' not defined");
    }

    #[test]
    fn command_line_macros_win_and_unused_ones_are_reported() {
        let defines = vec![("a".to_string(), "cmd".to_string())];
        let mut lexer = Lexer::new(&defines);
        lexer.define("a", "file", false);
        lexer.define("b", "file", false);
        lexer.push("t".into(), PathBuf::from("/t"), b"$a".to_vec());
        assert_eq!(lexer.next_token().tok, word("cmd"));
        assert_eq!(
            lexer.unused_macro_warnings(),
            vec!["warning: macro 'b' not used"]
        );
    }

    #[test]
    fn huge_numbers_are_errors() {
        let (toks, lexer) = lex_all("99999999999999999999 -99999999999999999999\n", &[]);
        assert_eq!(toks[0].0, Tok::Error);
        assert_eq!(
            lexer.diags[0],
            "t.conf:1: \"99999999999999999999\" invalid number: too large"
        );
    }

    #[test]
    fn unterminated_quote_is_reported() {
        let (toks, lexer) = lex_all("boot \"abc", &[]);
        assert_eq!(toks[1].0, Tok::Error);
        assert_eq!(
            lexer.diags[0],
            "t.conf:1: reached end of file while parsing quoted string"
        );
    }

    #[test]
    fn included_source_continues_into_the_parent() {
        let mut lexer = Lexer::new(&[]);
        lexer.push("a".into(), PathBuf::from("/a"), b"x\ny\n".to_vec());
        assert_eq!(lexer.next_token().tok, word("x"));
        assert_eq!(lexer.next_token().tok, Tok::Newline);
        lexer.push("b".into(), PathBuf::from("/b"), b"z".to_vec());
        let z = lexer.next_token();
        assert_eq!((z.tok, z.pos.file), (word("z"), 1));
        assert_eq!(lexer.next_token().tok, Tok::Newline);
        let y = lexer.next_token();
        assert_eq!((y.tok, y.pos), (word("y"), Pos { file: 0, line: 2 }));
    }
}
