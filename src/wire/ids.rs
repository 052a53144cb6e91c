//! The id a client would send as `Last-Event-ID`, followed through a stream on the scanner's
//! pieces alone: no event is built, and only an `id` line split across chunks is copied.

use bytes::Bytes;

use super::Piece;

/// Ids longer than this are not followed (the last shorter one stays); replay treats ids over
/// 256 bytes as unknown anyway.
const MAX_ID_LEN: usize = 1024;

/// Follows the spec's "last event ID buffer" (set by each `id` field without NUL) and the last
/// event ID string (the buffer, copied at each blank line), fed with every [`Piece`] of a
/// scanner in order.
#[derive(Debug, Default)]
pub(crate) struct LastEventIds {
    buffer: Bytes,
    last: Bytes,
    line: Line,
}

/// What is known of the line that the chunk ended inside.
#[derive(Debug, Default)]
enum Line {
    /// Nothing of it seen yet.
    #[default]
    Fresh,
    /// Its bytes so far, which may still make an `id` line.
    MaybeId(Vec<u8>),
    /// It cannot be an `id` line (or is too long to follow).
    Other,
}

impl LastEventIds {
    /// The id a client would send now (empty: none, or reset).
    pub(crate) fn last(&self) -> &Bytes {
        &self.last
    }

    /// Takes in one piece of `chunk`; true when it was a blank line that changed [`last`].
    ///
    /// [`last`]: Self::last
    pub(crate) fn piece(&mut self, chunk: &Bytes, piece: Piece) -> bool {
        match piece {
            Piece::Bom { .. } => self.line = Line::Fresh,
            Piece::Partial { start } => {
                let tail = &chunk[start..];
                self.line = match std::mem::take(&mut self.line) {
                    // Copied only while it may still be an id line: most chunks end in `data`.
                    Line::Fresh if could_be_id(tail) => Line::MaybeId(tail.to_vec()),
                    Line::Fresh => Line::Other,
                    Line::MaybeId(mut line) => {
                        line.extend_from_slice(tail);
                        maybe_id(line)
                    }
                    Line::Other => Line::Other,
                };
            }
            Piece::Line {
                start,
                end,
                continued,
            } => match (continued, std::mem::take(&mut self.line)) {
                (false, _) => self.field(chunk, start, end),
                (true, Line::MaybeId(mut line)) => {
                    line.extend_from_slice(&chunk[start..end]);
                    if line.len() <= MAX_ID_LEN + 4 {
                        let line = Bytes::from(line);
                        self.field(&line, 0, line.len());
                    }
                }
                (true, _) => {}
            },
            Piece::Dispatch { .. } => {
                if self.last != self.buffer {
                    self.last = self.buffer.clone();
                    return true;
                }
            }
        }
        false
    }

    /// An `id` field sets the buffer, unless its value holds a NUL.
    fn field(&mut self, chunk: &Bytes, start: usize, end: usize) {
        let line = &chunk[start..end];
        let value = match line {
            b"id" => start..start,
            [b'i', b'd', b':', b' ', ..] => start + 4..end,
            [b'i', b'd', b':', ..] => start + 3..end,
            _ => return,
        };
        if value.len() <= MAX_ID_LEN && !chunk[value.clone()].contains(&0) {
            self.buffer = chunk.slice(value);
        }
    }
}

/// `Line::MaybeId` while `line` can still become an `id` line of a followed length.
fn maybe_id(line: Vec<u8>) -> Line {
    if could_be_id(&line) {
        Line::MaybeId(line)
    } else {
        Line::Other
    }
}

/// Whether a line that starts with `start` can be an `id` line of a followed length.
fn could_be_id(start: &[u8]) -> bool {
    if start.len() <= 2 {
        b"id".starts_with(start)
    } else {
        start.starts_with(b"id:") && start.len() <= MAX_ID_LEN + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Parser, Scanner};

    /// The ids after each chunk, as the tracker and as the parser see them.
    fn both(chunks: &[&[u8]]) -> (Vec<Bytes>, Vec<Bytes>) {
        let (mut scanner, mut ids, mut parser) =
            (Scanner::new(), LastEventIds::default(), Parser::new());
        let (mut tracked, mut parsed) = (Vec::new(), Vec::new());
        for chunk in chunks {
            let chunk = Bytes::copy_from_slice(chunk);
            for piece in scanner.pieces(&chunk.clone()) {
                ids.piece(&chunk, piece.unwrap());
            }
            parser.push(chunk);
            while parser.next_event().is_some() {}
            tracked.push(ids.last().clone());
            parsed.push(Bytes::copy_from_slice(parser.last_event_id()));
        }
        (tracked, parsed)
    }

    #[test]
    fn agrees_with_the_parser_on_every_split() {
        let streams: [&[u8]; 8] = [
            b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n",
            b"\xEF\xBB\xBFid: 7\r\ndata: x\r\n\r\nid:8\rdata\r\r",
            b"id: with\0nul\ndata: a\n\nid: 3\n\n",
            b"id: 4\n\nid\n\ndata: reset\n\nid: 5\ndata: never ends",
            b"data: a\nidx: 9\nid : 9\n\nID: 9\n\n: id: 9\n\n",
            b"id:  two spaces\n\nid:\n\nid: last\n\n",
            b"data: id: 1\n\nid: \xE2\x80\xA6\n\n",
            b"\xEF\xBB\xBF\xEF\xBB\xBFid: 1\n\nid: 2\n\n",
        ];
        for stream in streams {
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                let (tracked, parsed) = both(&[a, b]);
                assert_eq!(
                    tracked,
                    parsed,
                    "{:?} split at {split}",
                    String::from_utf8_lossy(stream)
                );
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            let (tracked, parsed) = both(&bytes);
            assert_eq!(
                tracked,
                parsed,
                "{:?} byte by byte",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn long_ids_are_not_followed_and_hold_nothing() {
        let long = format!("id: 1\n\nid: {}\n\n", "x".repeat(2000));
        let bytes: Vec<&[u8]> = long.as_bytes().chunks(7).collect();
        let (tracked, _) = both(&bytes);
        assert_eq!(tracked.last().unwrap(), "1");
        let mut ids = LastEventIds::default();
        let mut scanner = Scanner::new();
        let line = Bytes::from(format!("id: {}", "y".repeat(10_000)));
        for piece in scanner.pieces(&line.clone()) {
            ids.piece(&line, piece.unwrap());
        }
        assert!(matches!(ids.line, Line::Other));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_the_parser_on_random_streams_and_chunkings(
            tokens in proptest::collection::vec(proptest::sample::select(vec![
                &b"\n"[..], b"\r", b"\r\n", b":", b" ", b"id", b"id: ", b"data", b"\0", b"\xEF\xBB\xBF", b"7", b"x",
            ]), 0..60),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let stream: Vec<u8> = tokens.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= stream.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                chunks.push(&stream[from..cut]);
                from = cut;
            }
            let (tracked, parsed) = both(&chunks);
            proptest::prop_assert_eq!(tracked, parsed);
        }
    }
}
