//! BSD getopt(3) for vmd and vmctl: short options (clustered, with an
//! argument attached or following), `--long[=value]` options, `--`, and
//! options ending at the first operand. Errors read as BSD's do.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GetoptError {
    #[error("unknown option -- {0}")]
    Unknown(String),
    #[error("option requires an argument -- {0}")]
    MissingArgument(String),
    #[error("option does not take an argument -- {0}")]
    UnexpectedArgument(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Opt {
    /// A short option and its argument, if it takes one.
    Short(char, Option<String>),
    /// A long option (its name without `--`) and its argument.
    Long(&'static str, Option<String>),
}

/// Iterates over the options of `args` (which excludes the program or
/// command name). `shorts` is a getopt(3) string such as `"dnvD:f:"`;
/// `longs` lists long option names and whether each takes an argument.
pub struct Getopt<'a> {
    args: &'a [String],
    shorts: &'static str,
    longs: &'static [(&'static str, bool)],
    index: usize,
    offset: usize,
}

impl<'a> Getopt<'a> {
    pub fn new(
        args: &'a [String],
        shorts: &'static str,
        longs: &'static [(&'static str, bool)],
    ) -> Self {
        Getopt {
            args,
            shorts,
            longs,
            index: 0,
            offset: 0,
        }
    }

    /// The operands left after the options.
    pub fn operands(&self) -> &'a [String] {
        &self.args[self.index.min(self.args.len())..]
    }

    fn takes_argument(&self, c: char) -> Option<bool> {
        let at = self.shorts.find(c).filter(|_| c != ':')?;
        Some(self.shorts[at + c.len_utf8()..].starts_with(':'))
    }

    fn next_long(&mut self, body: &str) -> Result<Opt, GetoptError> {
        self.index += 1;
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (body, None),
        };
        let &(long, wants) = self
            .longs
            .iter()
            .find(|(long, _)| *long == name)
            .ok_or_else(|| GetoptError::Unknown(name.to_string()))?;
        match (wants, inline) {
            (true, Some(value)) => Ok(Opt::Long(long, Some(value))),
            (true, None) => {
                let value = self.args.get(self.index).cloned();
                let value = value.ok_or_else(|| GetoptError::MissingArgument(name.to_string()))?;
                self.index += 1;
                Ok(Opt::Long(long, Some(value)))
            }
            (false, Some(_)) => Err(GetoptError::UnexpectedArgument(name.to_string())),
            (false, None) => Ok(Opt::Long(long, None)),
        }
    }

    fn next_short(&mut self, word: &'a str) -> Result<Opt, GetoptError> {
        let rest = &word[self.offset..];
        let c = rest.chars().next().unwrap_or('-');
        self.offset += c.len_utf8();
        let end_of_word = self.offset >= word.len();
        let wants = self.takes_argument(c);
        if end_of_word || wants == Some(true) {
            self.index += 1;
            self.offset = 0;
        }
        match wants {
            None => Err(GetoptError::Unknown(c.to_string())),
            Some(false) => Ok(Opt::Short(c, None)),
            Some(true) if !end_of_word => Ok(Opt::Short(c, Some(rest[c.len_utf8()..].to_string()))),
            Some(true) => {
                let value = self.args.get(self.index).cloned();
                let value = value.ok_or_else(|| GetoptError::MissingArgument(c.to_string()))?;
                self.index += 1;
                Ok(Opt::Short(c, Some(value)))
            }
        }
    }
}

impl<'a> Iterator for Getopt<'a> {
    type Item = Result<Opt, GetoptError>;

    fn next(&mut self) -> Option<Self::Item> {
        let word = self.args.get(self.index)?.as_str();
        if self.offset == 0 {
            if word == "--" {
                self.index += 1;
                return None;
            }
            if let Some(body) = word.strip_prefix("--") {
                return Some(self.next_long(body));
            }
            if !word.starts_with('-') || word == "-" {
                return None;
            }
            self.offset = 1;
        }
        Some(self.next_short(word))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn clustered_and_separate_arguments() {
        let a = args(&[
            "-dv",
            "-fvm.conf",
            "-D",
            "x=1",
            "--initrd=/i",
            "--cmdline",
            "c",
            "op",
            "-n",
        ]);
        let mut g = Getopt::new(&a, "dnvD:f:", &[("initrd", true), ("cmdline", true)]);
        let opts: Vec<_> = g.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            opts,
            vec![
                Opt::Short('d', None),
                Opt::Short('v', None),
                Opt::Short('f', Some("vm.conf".into())),
                Opt::Short('D', Some("x=1".into())),
                Opt::Long("initrd", Some("/i".into())),
                Opt::Long("cmdline", Some("c".into())),
            ]
        );
        assert_eq!(g.operands(), &args(&["op", "-n"])[..]);
    }

    #[test]
    fn errors() {
        let a = args(&["-x"]);
        assert_eq!(
            Getopt::new(&a, "d", &[]).next(),
            Some(Err(GetoptError::Unknown("x".into())))
        );
        let a = args(&["-f"]);
        assert_eq!(
            Getopt::new(&a, "f:", &[]).next(),
            Some(Err(GetoptError::MissingArgument("f".into())))
        );
        let a = args(&["--", "-d"]);
        let mut g = Getopt::new(&a, "d", &[]);
        assert_eq!(g.next(), None);
        assert_eq!(g.operands(), &args(&["-d"])[..]);
    }
}
