//! What QEMU writes, bounded: its output cut into lines of at most a
//! given length, and a rate limit for the lines logged.

use std::time::{Duration, Instant};

/// One line out of a [`LineBuffer`], without its newline.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    /// It was longer than the buffer's maximum: only its start is here.
    pub truncated: bool,
}

/// Cuts a byte stream into lines, holding at most `max` bytes of a line:
/// the rest of a longer one is dropped and the line marked truncated.
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// The line being read is already longer than `max`.
    overlong: bool,
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            max,
            overlong: false,
        }
    }

    /// Adds `data`; returns the lines it completed.
    pub fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        for chunk in data.split_inclusive(|&b| b == b'\n') {
            let (body, complete) = match chunk.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (chunk, false),
            };
            let room = self.max.saturating_sub(self.buf.len());
            if body.len() > room {
                self.overlong = true;
            }
            self.buf.extend_from_slice(&body[..body.len().min(room)]);
            if complete {
                lines.extend(self.take());
            }
        }
        lines
    }

    /// True while the unfinished line is longer than the maximum.
    pub fn overlong(&self) -> bool {
        self.overlong
    }

    /// At the end of the stream: the unfinished line, if any.
    pub fn finish(&mut self) -> Option<Line> {
        if self.buf.is_empty() && !self.overlong {
            return None;
        }
        self.take()
    }

    pub fn take(&mut self) -> Option<Line> {
        let line = Line {
            text: String::from_utf8_lossy(&self.buf).into_owned(),
            truncated: self.overlong,
        };
        self.buf.clear();
        self.overlong = false;
        Some(line)
    }
}

/// At most `limit` lines per `window`; the lines refused are counted and
/// reported once the window is over.
pub struct RateLimit {
    limit: u32,
    window: Duration,
    /// When the current window began (None: no line since the last one).
    start: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    pub fn new(limit: u32, window: Duration) -> Self {
        RateLimit {
            limit,
            window,
            start: None,
            used: 0,
            dropped: 0,
        }
    }

    /// One more line at `now`: how many lines a window that just ended
    /// dropped (to report first), and whether this one may be logged.
    pub fn admit(&mut self, now: Instant) -> (Option<u64>, bool) {
        let dropped = self.expire(now);
        let start = *self.start.get_or_insert(now);
        debug_assert!(start <= now);
        if self.used < self.limit {
            self.used += 1;
            (dropped, true)
        } else {
            self.dropped += 1;
            (dropped, false)
        }
    }

    /// Ends the window if it is over at `now`; returns how many lines it
    /// dropped, if any.
    pub fn expire(&mut self, now: Instant) -> Option<u64> {
        match self.start {
            Some(start) if now >= start + self.window => {
                self.start = None;
                self.used = 0;
                self.flush()
            }
            _ => None,
        }
    }

    /// When the dropped lines are due to be reported (None: none dropped).
    pub fn due(&self) -> Option<Instant> {
        self.start
            .filter(|_| self.dropped > 0)
            .map(|start| start + self.window)
    }

    /// The lines dropped and not reported yet, if any (at the end).
    pub fn flush(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.dropped)).filter(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, truncated: bool) -> Line {
        Line {
            text: text.into(),
            truncated,
        }
    }

    #[test]
    fn lines_split_across_reads_and_capped() {
        let mut lines = LineBuffer::new(8);
        assert_eq!(lines.push(b"ab"), vec![]);
        assert_eq!(
            lines.push(b"c\nde\n\nf"),
            vec![line("abc", false), line("de", false), line("", false)]
        );
        // A line past the cap keeps its first 8 bytes, across reads.
        assert!(!lines.overlong());
        assert_eq!(lines.push(b"1234567"), vec![]);
        assert!(!lines.overlong());
        assert_eq!(lines.push(b"9"), vec![]);
        assert!(lines.overlong());
        assert_eq!(lines.buf.len(), 8);
        assert_eq!(lines.push(&[b'x'; 100_000]), vec![]);
        assert_eq!(lines.buf.len(), 8, "the excess is not kept");
        assert_eq!(
            lines.push(b"yy\nok\n"),
            vec![line("f1234567", true), line("ok", false)]
        );
        assert!(!lines.overlong());
        // The end of the stream ends an unfinished line.
        assert_eq!(lines.push(b"tail"), vec![]);
        assert_eq!(lines.finish(), Some(line("tail", false)));
        assert_eq!(lines.finish(), None);
        assert_eq!(lines.push(&[b'z'; 20]), vec![]);
        assert_eq!(lines.finish(), Some(line("zzzzzzzz", true)));
    }

    #[test]
    fn rate_limit_drops_and_reports_once_per_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut limit = RateLimit::new(3, Duration::from_secs(1));
        assert_eq!(limit.due(), None);
        for ms in [0, 10, 20] {
            assert_eq!(limit.admit(at(ms)), (None, true));
        }
        assert_eq!(limit.due(), None, "nothing dropped yet");
        for ms in [30, 40, 999] {
            assert_eq!(limit.admit(at(ms)), (None, false));
        }
        assert_eq!(limit.due(), Some(at(1000)));
        assert_eq!(limit.expire(at(999)), None);
        // The next line after the window reports the drops and passes.
        assert_eq!(limit.admit(at(1500)), (Some(3), true));
        assert_eq!(limit.due(), None);
        for ms in [1501, 1502] {
            assert_eq!(limit.admit(at(ms)), (None, true));
        }
        assert_eq!(limit.admit(at(1503)), (None, false));
        // Or the timer does, once.
        assert_eq!(limit.expire(at(2500)), Some(1));
        assert_eq!(limit.expire(at(2600)), None);
        assert_eq!(limit.due(), None);
        // And the end reports what is left.
        for ms in [3000, 3001, 3002, 3003, 3004] {
            limit.admit(at(ms));
        }
        assert_eq!(limit.flush(), Some(2));
        assert_eq!(limit.flush(), None);
    }
}
