//! Line and event boundaries across chunks, without building events.

use memchr::memchr2;

use super::{BomStep, LeadingBom, LimitError, Limits};

/// Finds where lines and events end in an event stream that arrives in arbitrary chunks.
///
/// The scanner is the cheapest reader of the wire format: it holds no bytes, only a few counters,
/// and finds line endings with `memchr`. It follows the spec exactly: CRLF, LF and lone CR end
/// lines, a CR at the end of a chunk and an LF at the start of the next are one line ending, and
/// a leading byte order mark is not content (so `BOM` + `\n` is a blank line).
///
/// Feed each chunk with [`pieces`](Scanner::pieces) (to see every line, as the [`Parser`] does)
/// or [`scan`](Scanner::scan) (to learn only where the last event in the chunk ended), then ask
/// [`is_at_boundary`](Scanner::is_at_boundary) whether something may be inserted between events.
///
/// ```
/// use tower_sse::wire::Scanner;
///
/// let mut scanner = Scanner::new();
/// assert!(scanner.is_at_boundary());
///
/// // The event ends after the blank line: offset 11 of this chunk.
/// assert_eq!(scanner.scan(b"data: 1\r\n\r\ndata: 2").unwrap(), Some(11));
/// assert!(!scanner.is_at_boundary());
///
/// // The lone CR ends the blank line at once; an LF in the next chunk would be part of it.
/// assert_eq!(scanner.scan(b"\n\r").unwrap(), Some(2));
/// assert!(scanner.is_at_boundary());
/// ```
///
/// [`Parser`]: super::Parser
#[derive(Clone, Debug)]
pub struct Scanner {
    // Counted in 32 bits (see `Bound`): every idle stream carries a scanner, and this keeps it
    // at 24 bytes.
    max_line: Bound,
    max_event: Bound,
    bom: LeadingBom,
    /// The previous chunk ended with a CR that ended a line: an LF first in this chunk belongs to it.
    pending_cr: bool,
    /// Bytes of the unfinished line that arrived in earlier chunks (saturating).
    line_len: u32,
    /// Bytes of the current event since the last boundary, line endings included (saturating).
    event_len: u32,
    /// The last complete line was blank (or there was none yet).
    after_blank_line: bool,
    /// Which limit was broken, if any; the error is rebuilt from `limits`, which keeps every
    /// idle stream's scanner a few bytes smaller.
    failed: Option<Broken>,
}

/// A bound on a length counted in 32 bits: `u32::MAX` is no bound. A bound of 4 GiB or more
/// (but not unbounded) counts as `u32::MAX - 1`, one the saturating counters can still exceed:
/// it is enforced a little early, never late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bound(u32);

impl Bound {
    const fn new(limit: usize) -> Self {
        if limit == usize::MAX {
            Self(u32::MAX)
        } else if limit >= u32::MAX as usize {
            Self(u32::MAX - 1)
        } else {
            Self(limit as u32)
        }
    }

    const fn get(self) -> usize {
        if self.0 == u32::MAX {
            usize::MAX
        } else {
            self.0 as usize
        }
    }

    fn exceeded_by(self, len: u32) -> bool {
        len > self.0
    }
}

/// `len` bytes more on a saturating 32-bit counter.
fn grow(counter: &mut u32, len: usize) {
    *counter = counter.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    Line,
    Event,
}

/// Bytes scanned on this thread, in test builds: proof that a stack scans each byte once.
#[cfg(test)]
pub(crate) mod scanned {
    use std::cell::Cell;

    thread_local! {
        static BYTES: Cell<usize> = const { Cell::new(0) };
    }

    pub(crate) fn add(bytes: usize) {
        BYTES.with(|b| b.set(b.get() + bytes));
    }

    /// The bytes scanned since the last call.
    pub(crate) fn take() -> usize {
        BYTES.with(|b| b.replace(0))
    }
}

/// One thing a [`Scanner`] found in a chunk; offsets are into that chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// The bytes before `end` (and any held from earlier chunks) were the stream's leading byte
    /// order mark: they are not content.
    Bom {
        /// Offset just past the byte order mark.
        end: usize,
    },
    /// A complete line that is not blank, without its line ending. Its content is
    /// `chunk[start..end]`, preceded by the unfinished line of earlier chunks when `continued`.
    Line {
        /// Offset where the line's bytes in this chunk start.
        start: usize,
        /// Offset where the line's content ends (its line ending starts there).
        end: usize,
        /// The line started in an earlier chunk.
        continued: bool,
    },
    /// A blank line: the event before it is dispatched, and `end` is an event boundary.
    Dispatch {
        /// Offset just past the blank line's line ending.
        end: usize,
    },
    /// The chunk ends inside a line that starts (or continues) at `start`.
    Partial {
        /// Offset where this chunk's part of the unfinished line starts.
        start: usize,
    },
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner for a new stream, holding nothing and so bounded by nothing.
    pub const fn new() -> Self {
        Self::with_limits(Limits::unbounded())
    }

    /// A scanner that fails with a [`LimitError`] once a line or event exceeds `limits`.
    ///
    /// Lengths are counted in 32 bits: a bound of 4 GiB or more (other than `usize::MAX`, no
    /// bound) is enforced at 4 GiB.
    pub const fn with_limits(limits: Limits) -> Self {
        Self {
            max_line: Bound::new(limits.line_len()),
            max_event: Bound::new(limits.event_len()),
            bom: LeadingBom::new(),
            pending_cr: false,
            line_len: 0,
            event_len: 0,
            after_blank_line: true,
            failed: None,
        }
    }

    /// The stream's start was taken care of before this scanner (its leading byte order mark
    /// dropped): a mark in the first bytes it sees is content.
    pub(crate) fn past_leading_bom(&mut self) {
        if self.bom.is_untouched() {
            self.bom = LeadingBom::Decided;
        }
    }

    /// The line and event bounds this scanner enforces (a scanner keeps no lines: the kept-lines
    /// count is the default).
    pub fn limits(&self) -> Limits {
        Limits::default()
            .max_line_len(self.max_line.get())
            .max_event_len(self.max_event.get())
    }

    /// True between events: nothing has been seen, or the last thing seen was a blank line.
    ///
    /// Only here may a complete block (a comment, a heartbeat, a replayed event) be inserted
    /// without changing what the client parses. After a lone CR the next upstream byte may be an
    /// LF completing it; an insertion there only adds a harmless blank line.
    pub fn is_at_boundary(&self) -> bool {
        self.after_blank_line && self.line_len == 0 && self.failed.is_none()
    }

    /// True until the first byte of the stream has been seen.
    ///
    /// Anything inserted here comes before a possible upstream byte order mark, which then stops
    /// being the leading one and spoils the first line.
    pub fn is_at_stream_start(&self) -> bool {
        self.bom.is_untouched()
    }

    /// Bytes of the current event seen so far (zero at a boundary; at most `u32::MAX`).
    pub fn event_len(&self) -> usize {
        self.event_len as usize
    }

    /// The pieces of `chunk`, in order. Every chunk must be fed, in order, and fully: drop the
    /// iterator early and the rest of the chunk is not scanned.
    pub fn pieces<'a>(&'a mut self, chunk: &'a [u8]) -> Pieces<'a> {
        Pieces {
            scanner: self,
            chunk,
            pos: 0,
        }
    }

    /// Scans `chunk` and returns the offset just past the last event boundary in it, if any.
    pub fn scan(&mut self, chunk: &[u8]) -> Result<Option<usize>, LimitError> {
        let mut pos = 0;
        let mut last = None;
        while let Some(piece) = self.next_piece(chunk, &mut pos) {
            if let Piece::Dispatch { end } = piece? {
                last = Some(end);
            }
        }
        Ok(last)
    }

    /// The next piece of `chunk` from `*pos` on, advancing `*pos` past it.
    ///
    /// This is the primitive behind [`pieces`](Scanner::pieces) for readers that must stop
    /// part-way through a chunk and resume later: call it with `*pos == 0` once per chunk first.
    pub fn next_piece(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
    ) -> Option<Result<Piece, LimitError>> {
        #[cfg(test)]
        let start = *pos;
        let piece = self.next_piece_uncounted(chunk, pos);
        #[cfg(test)]
        scanned::add(*pos - start);
        piece
    }

    fn next_piece_uncounted(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
    ) -> Option<Result<Piece, LimitError>> {
        if let Some(broken) = self.failed {
            let error = self.error(broken);
            // Report a failure once per chunk, then nothing.
            let report = *pos < chunk.len();
            *pos = chunk.len();
            return report.then_some(Err(error));
        }
        if *pos == 0 {
            match self.bom.step(chunk) {
                BomStep::NeedMore => {
                    *pos = chunk.len();
                    grow(&mut self.line_len, chunk.len());
                    grow(&mut self.event_len, chunk.len());
                    return (!chunk.is_empty()).then_some(Ok(Piece::Partial { start: 0 }));
                }
                BomStep::Found { end } => {
                    *pos = end;
                    self.line_len = 0;
                    self.event_len = 0;
                    return Some(Ok(Piece::Bom { end }));
                }
                BomStep::Absent { .. } | BomStep::Decided => {}
            }
            if self.pending_cr && !chunk.is_empty() {
                self.pending_cr = false;
                if chunk[0] == b'\n' {
                    *pos = 1;
                }
            }
        }
        let start = *pos;
        let rest = chunk.get(start..).filter(|rest| !rest.is_empty())?;
        let Some(found) = memchr2(b'\n', b'\r', rest) else {
            *pos = chunk.len();
            grow(&mut self.line_len, rest.len());
            grow(&mut self.event_len, rest.len());
            return Some(self.check_limits().map(|()| Piece::Partial { start }));
        };
        let ending_len = if rest[found] == b'\n' {
            1
        } else {
            match rest.get(found + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                None => {
                    self.pending_cr = true;
                    1
                }
            }
        };
        let end = start + found;
        *pos = end + ending_len;
        let continued = self.line_len > 0;
        if !continued && found == 0 {
            self.event_len = 0;
            self.after_blank_line = true;
            return Some(Ok(Piece::Dispatch { end: *pos }));
        }
        grow(&mut self.line_len, found);
        grow(&mut self.event_len, found + ending_len);
        let checked = self.check_limits();
        self.line_len = 0;
        self.after_blank_line = false;
        Some(checked.map(|()| Piece::Line {
            start,
            end,
            continued,
        }))
    }

    fn check_limits(&mut self) -> Result<(), LimitError> {
        let broken = if self.max_line.exceeded_by(self.line_len) {
            Broken::Line
        } else if self.max_event.exceeded_by(self.event_len) {
            Broken::Event
        } else {
            return Ok(());
        };
        self.failed = Some(broken);
        Err(self.error(broken))
    }

    fn error(&self, broken: Broken) -> LimitError {
        match broken {
            Broken::Line => LimitError::LineTooLong {
                limit: self.max_line.get(),
            },
            Broken::Event => LimitError::EventTooLarge {
                limit: self.max_event.get(),
            },
        }
    }
}

/// The pieces of one chunk, from [`Scanner::pieces`].
#[derive(Debug)]
pub struct Pieces<'a> {
    scanner: &'a mut Scanner,
    chunk: &'a [u8],
    pos: usize,
}

impl Iterator for Pieces<'_> {
    type Item = Result<Piece, LimitError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.scanner.next_piece(self.chunk, &mut self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(scanner: &mut Scanner, chunk: &[u8]) -> Vec<Piece> {
        scanner.pieces(chunk).map(Result::unwrap).collect()
    }

    #[test]
    fn lines_and_dispatch_with_every_line_ending() {
        let mut s = Scanner::new();
        let got = pieces(&mut s, b"a\rb\nc\r\n\r\n");
        assert_eq!(
            got,
            [
                Piece::Line {
                    start: 0,
                    end: 1,
                    continued: false
                },
                Piece::Line {
                    start: 2,
                    end: 3,
                    continued: false
                },
                Piece::Line {
                    start: 4,
                    end: 5,
                    continued: false
                },
                Piece::Dispatch { end: 9 },
            ]
        );
        assert!(s.is_at_boundary());
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_ending() {
        let mut s = Scanner::new();
        assert_eq!(
            pieces(&mut s, b"data: a\r"),
            [Piece::Line {
                start: 0,
                end: 7,
                continued: false
            }]
        );
        // The LF completes the CRLF: it is not a blank line.
        assert_eq!(pieces(&mut s, b"\n"), []);
        assert!(!s.is_at_boundary());
        assert_eq!(pieces(&mut s, b"\r"), [Piece::Dispatch { end: 1 }]);
        assert_eq!(pieces(&mut s, b"\n"), []);
        assert!(s.is_at_boundary());
    }

    #[test]
    fn line_spanning_chunks_is_continued() {
        let mut s = Scanner::new();
        assert_eq!(pieces(&mut s, b"da"), [Piece::Partial { start: 0 }]);
        assert!(!s.is_at_boundary());
        assert_eq!(
            pieces(&mut s, b"ta\n\n"),
            [
                Piece::Line {
                    start: 0,
                    end: 2,
                    continued: true
                },
                Piece::Dispatch { end: 4 },
            ]
        );
        // A line whose last chunk adds no content is still not blank.
        assert_eq!(pieces(&mut s, b"x"), [Piece::Partial { start: 0 }]);
        assert_eq!(
            pieces(&mut s, b"\n"),
            [Piece::Line {
                start: 0,
                end: 0,
                continued: true
            }]
        );
    }

    #[test]
    fn leading_bom_is_not_content() {
        let mut s = Scanner::new();
        assert!(s.is_at_stream_start());
        assert_eq!(
            pieces(&mut s, b"\xEF\xBB\xBF\n"),
            [Piece::Bom { end: 3 }, Piece::Dispatch { end: 4 }]
        );
        assert!(!s.is_at_stream_start());
        // A second BOM is content.
        assert_eq!(
            pieces(&mut s, b"\xEF\xBB\xBF\n"),
            [Piece::Line {
                start: 0,
                end: 3,
                continued: false
            }]
        );
    }

    #[test]
    fn bom_split_across_chunks() {
        let mut s = Scanner::new();
        assert_eq!(pieces(&mut s, b"\xEF"), [Piece::Partial { start: 0 }]);
        assert!(
            !s.is_at_boundary(),
            "a half BOM must not be split by an insertion"
        );
        assert_eq!(
            pieces(&mut s, b"\xBB\xBF\n"),
            [Piece::Bom { end: 2 }, Piece::Dispatch { end: 3 }]
        );
        let mut s = Scanner::new();
        assert_eq!(pieces(&mut s, b"\xEF\xBB"), [Piece::Partial { start: 0 }]);
        assert_eq!(
            pieces(&mut s, b"x\n"),
            [Piece::Line {
                start: 0,
                end: 1,
                continued: true
            }]
        );
    }

    /// Lengths are counted in 32 bits: no bound stays no bound, a bound of 4 GiB or more is
    /// enforced at 4 GiB (early, never late), and smaller bounds are exact.
    #[test]
    fn bounds_are_counted_in_32_bits() {
        let unbounded = Scanner::new().limits();
        assert_eq!(unbounded.line_len(), usize::MAX);
        assert_eq!(unbounded.event_len(), usize::MAX);
        let huge = Scanner::with_limits(
            Limits::default()
                .max_line_len(usize::MAX - 1)
                .max_event_len(u32::MAX as usize),
        )
        .limits();
        assert_eq!(huge.line_len(), u32::MAX as usize - 1);
        assert_eq!(huge.event_len(), u32::MAX as usize - 1);
        let mut s = Scanner::with_limits(Limits::default().max_line_len(4).max_event_len(10));
        assert_eq!(s.scan(b"abcd\n").unwrap(), None);
        assert_eq!(s.scan(b"abcde"), Err(LimitError::LineTooLong { limit: 4 }));
        // A saturated counter still exceeds the largest bound.
        let mut counter = u32::MAX - 1;
        grow(&mut counter, usize::MAX);
        assert!(Bound::new(usize::MAX - 1).exceeded_by(counter));
        assert!(!Bound::new(usize::MAX).exceeded_by(counter));
    }

    #[test]
    fn scan_reports_last_boundary() {
        let mut s = Scanner::new();
        assert_eq!(
            s.scan(b"data: 1\n\ndata: 2\n\ndata: 3\n").unwrap(),
            Some(18)
        );
        assert_eq!(s.scan(b"").unwrap(), None);
        assert!(!s.is_at_boundary());
        assert_eq!(s.scan(b"\n").unwrap(), Some(1));
        assert!(s.is_at_boundary());
        assert_eq!(s.event_len(), 0);
    }

    #[test]
    fn comment_only_line_is_not_a_boundary() {
        let mut s = Scanner::new();
        assert_eq!(s.scan(b":keep-alive\n").unwrap(), None);
        assert!(!s.is_at_boundary());
    }

    #[test]
    fn line_limit_counts_bytes_across_chunks() {
        let mut s = Scanner::with_limits(Limits::default().max_line_len(4));
        assert_eq!(s.scan(b"abcd\n").unwrap(), None);
        assert_eq!(s.scan(b"abc").unwrap(), None);
        let err = s.scan(b"de").unwrap_err();
        assert_eq!(err, LimitError::LineTooLong { limit: 4 });
        // Failed for good, reported once per chunk.
        assert_eq!(s.scan(b"\n\n").unwrap_err(), err);
        assert!(!s.is_at_boundary());
    }

    #[test]
    fn event_limit_counts_line_endings() {
        let mut s = Scanner::with_limits(Limits::default().max_event_len(10));
        assert_eq!(s.scan(b"a:1\r\nb:2\r\n\r\n").unwrap(), Some(12));
        let err = s.scan(b"a:1\r\nb:22\r\n").unwrap_err();
        assert_eq!(err, LimitError::EventTooLarge { limit: 10 });
    }
}
