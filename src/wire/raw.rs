//! A stream's blocks as the bytes the stream carried them in, with what a recorder and the
//! comment-metadata stage need to know of them (the id of a message, a metadata field), found on
//! the scanner's pieces without building events. Only a block that spans chunks is copied (once,
//! whole).

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::{LimitError, Piece, Scanner};

/// A block (an event, or lines without data) as the stream carried it: where its bytes are,
/// and what is known of it. Nothing is counted or copied for a block within one chunk: its
/// reader takes the bytes it needs from the chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawBlock {
    /// From the block's first line to the end of its blank line.
    pub(crate) span: Span,
    /// Where it ends in the chunk it ended in.
    pub(crate) ends_at: usize,
    /// Where the value of its last `id` field is in its bytes, when the block is a message (it
    /// has `data`) with a non-empty id: what a recorder keeps.
    pub(crate) id: Option<Range<usize>>,
    /// A field of the block is named with the marking prefix given to [`RawEvents::feed`].
    pub(crate) marked: bool,
    /// A marked block's lines (ranges of its bytes, without line endings), to build its event
    /// from without scanning it again.
    pub(crate) lines: Vec<Range<usize>>,
}

/// Where a block's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Span {
    /// In the chunk it ended in.
    Chunk(Range<usize>),
    /// Its own copy: it spanned chunks.
    Own(Bytes),
}

impl RawBlock {
    /// The block's bytes; `chunk` is the chunk it ended in.
    pub(crate) fn bytes<'a>(&'a self, chunk: &'a [u8]) -> &'a [u8] {
        match &self.span {
            Span::Chunk(range) => &chunk[range.clone()],
            Span::Own(bytes) => bytes,
        }
    }

    /// The block's bytes as a `Bytes` (a slice of `chunk`, or its own).
    pub(crate) fn to_bytes(&self, chunk: &Bytes) -> Bytes {
        match &self.span {
            Span::Chunk(range) => chunk.slice(range.clone()),
            Span::Own(bytes) => bytes.clone(),
        }
    }

    /// The length of the buffer the block's bytes are in: its chunk's, or its own.
    pub(crate) fn buffer_len(&self, chunk: &[u8]) -> usize {
        match &self.span {
            Span::Chunk(_) => chunk.len(),
            Span::Own(bytes) => bytes.len(),
        }
    }
}

/// How a chunk fed to [`RawEvents`] lies against the blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Fed {
    /// Stopped after the first blank line, which ends here.
    pub(crate) stopped_at: Option<usize>,
    /// The chunk ended inside a block (its bytes are held until it ends), which starts here in
    /// the chunk (0 when it began in an earlier one).
    pub(crate) held_from: Option<usize>,
}

/// Finds the [`RawBlock`]s of a stream fed chunk by chunk through one scanner, following the
/// parser's rules for fields (an `id` value with NUL is ignored; the last `id` of a block is its
/// id; a comment is no field).
#[derive(Debug, Default)]
pub(crate) struct RawEvents {
    /// The current block's bytes from earlier chunks (empty when it started in this one).
    held: BytesMut,
    /// The current block has a line.
    started: bool,
    has_data: bool,
    marked: bool,
    /// The value of the block's last `id` field without NUL, relative to the block's start.
    id: Option<Range<usize>>,
    /// The previous chunk ended inside a line that starts here, relative to the block's start.
    open_line: Option<usize>,
    /// While marking: the block's lines, relative to its start.
    lines: Vec<Range<usize>>,
}

impl RawEvents {
    /// Scans `chunk` with `scanner` (which sees every chunk of the stream, in order, through
    /// this method only), handing each block that ends in it to `found`. `mark`: the field name
    /// prefix that marks a block. With `stop_at_boundary`, stops after the first blank line.
    pub(crate) fn feed(
        &mut self,
        scanner: &mut Scanner,
        chunk: &Bytes,
        stop_at_boundary: bool,
        mark: Option<&[u8]>,
        mut found: impl FnMut(RawBlock),
    ) -> Result<Fed, LimitError> {
        // Where the current block's bytes start in this chunk, once it has started.
        let mut block_start = self.started.then_some(0);
        let mut fed = Fed::default();
        let mut pos = 0;
        while let Some(piece) = scanner.next_piece(chunk, &mut pos) {
            match piece? {
                Piece::Bom { .. } => {
                    // Bytes held as the start of a line were the byte order mark.
                    self.held.clear();
                    self.lines.clear();
                    self.started = false;
                    self.open_line = None;
                    block_start = None;
                }
                Piece::Partial { start } => {
                    let block = *block_start.get_or_insert(start);
                    self.started = true;
                    if self.open_line.is_none() {
                        self.open_line = Some(self.held.len() + start - block);
                    }
                }
                Piece::Line {
                    start,
                    end,
                    continued,
                } => {
                    let block = *block_start.get_or_insert(start);
                    self.started = true;
                    let line_start = match self.open_line.take() {
                        Some(line_start) if continued => line_start,
                        _ => self.held.len() + start - block,
                    };
                    self.field(chunk, block, line_start, end, mark);
                }
                Piece::Dispatch { end } => {
                    self.open_line = None;
                    if let Some(block) = block_start.take() {
                        found(self.dispatch(chunk, block, end));
                    }
                    if stop_at_boundary {
                        fed.stopped_at = Some(end);
                        return Ok(fed);
                    }
                }
            }
        }
        if let Some(block) = block_start {
            self.held.extend_from_slice(&chunk[block..]);
            fed.held_from = Some(block);
        }
        Ok(fed)
    }

    /// A complete line, from `line_start` (relative to the block) to `chunk[..end]`.
    fn field(
        &mut self,
        chunk: &Bytes,
        block: usize,
        line_start: usize,
        end: usize,
        mark: Option<&[u8]>,
    ) {
        let held = self.held.len();
        let here = &chunk[block + line_start.saturating_sub(held)..end];
        if line_start >= held {
            return self.take_line(here, line_start, mark);
        }
        // A line begun in an earlier chunk, joined (the parser copies it too); bounded by the
        // scanner's line limit.
        let mut line = Vec::with_capacity(held - line_start + here.len());
        line.extend_from_slice(&self.held[line_start..]);
        line.extend_from_slice(here);
        self.take_line(&line, line_start, mark);
    }

    /// One complete line of the block, starting at `line_start` (relative to the block).
    fn take_line(&mut self, line: &[u8], line_start: usize, mark: Option<&[u8]>) {
        if mark.is_some() {
            self.lines.push(line_start..line_start + line.len());
        }
        match line {
            b"data" | [b'd', b'a', b't', b'a', b':', ..] => self.has_data = true,
            b"id" | [b'i', b'd', b':', ..] => {
                let value = match line {
                    [b'i', b'd', b':', b' ', ..] => 4,
                    [b'i', b'd', b':', ..] => 3,
                    _ => 2,
                };
                // An id holding NUL is ignored.
                if memchr::memchr(0, &line[value..]).is_none() {
                    self.id = Some(line_start + value..line_start + line.len());
                }
            }
            _ => {
                if let Some(prefix) = mark {
                    self.marked |= is_marked(line, prefix);
                }
            }
        }
    }

    /// The blank line ending at `chunk[..end]` ends the block that started at `block`.
    fn dispatch(&mut self, chunk: &Bytes, block: usize, end: usize) -> RawBlock {
        let (has_data, id, marked) = (self.has_data, self.id.take(), self.marked);
        self.started = false;
        self.has_data = false;
        self.marked = false;
        let span = if self.held.is_empty() {
            Span::Chunk(block..end)
        } else {
            self.held.extend_from_slice(&chunk[block..end]);
            Span::Own(self.held.split().freeze())
        };
        let lines = if marked {
            std::mem::take(&mut self.lines)
        } else {
            self.lines.clear();
            Vec::new()
        };
        RawBlock {
            span,
            ends_at: end,
            id: id.filter(|id| has_data && !id.is_empty()),
            marked,
            lines,
        }
    }

    /// The bytes held of the block in flight (from earlier chunks), which the reader then owns.
    pub(crate) fn take_held(&mut self) -> Bytes {
        self.held.split().freeze()
    }

    /// True while a block has started and not ended.
    #[cfg(test)]
    fn is_mid_block(&self) -> bool {
        self.started
    }
}

/// A field line (not a comment, not a field the spec knows; `data` and `id` are taken before)
/// whose name starts with `prefix`.
fn is_marked(line: &[u8], prefix: &[u8]) -> bool {
    if line.first() == Some(&b':') || !line.starts_with(prefix) {
        return false;
    }
    let name = &line[..memchr::memchr(b':', line).unwrap_or(line.len())];
    name.len() >= prefix.len() && name != b"event" && name != b"retry"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Limits, Parser};

    /// A recordable block's bytes and id, as a recorder takes them.
    #[derive(Debug)]
    struct Found {
        bytes: Bytes,
        id: Bytes,
        buffer_len: usize,
    }

    /// What `on_block` takes of each raw block of `chunks` (marked with `mark`), and what
    /// `on_event` takes of each event the parser finds in them.
    fn side_by_side<T, U>(
        chunks: &[&[u8]],
        mark: Option<&[u8]>,
        mut on_block: impl FnMut(&RawBlock, &Bytes) -> Option<T>,
        mut on_event: impl FnMut(crate::wire::Event) -> Option<U>,
    ) -> (Vec<T>, Vec<U>) {
        let (mut scanner, mut raw, mut parser) = (
            Scanner::with_limits(Limits::default()),
            RawEvents::default(),
            Parser::new(),
        );
        let (mut found, mut parsed) = (Vec::new(), Vec::new());
        for chunk in chunks {
            let chunk = Bytes::copy_from_slice(chunk);
            raw.feed(&mut scanner, &chunk, false, mark, |block| {
                found.extend(on_block(&block, &chunk))
            })
            .unwrap();
            parser.push(chunk);
            while let Some(event) = parser.next_event() {
                parsed.extend(on_event(event.unwrap()));
            }
        }
        (found, parsed)
    }

    /// The recordable raw blocks of `chunks`, and the recordable events the parser finds.
    fn both(chunks: &[&[u8]]) -> (Vec<Found>, Vec<crate::wire::Event>) {
        side_by_side(
            chunks,
            None,
            |block, chunk| {
                let id = block.id.clone()?;
                let bytes = block.to_bytes(chunk);
                Some(Found {
                    id: bytes.slice(id),
                    buffer_len: block.buffer_len(chunk),
                    bytes,
                })
            },
            |event| {
                (event.is_message() && event.id().is_some_and(|id| !id.is_empty())).then_some(event)
            },
        )
    }

    /// Each raw event parses, alone, as the very event the parser found, with its id.
    fn assert_agree(chunks: &[&[u8]], what: &str) {
        let (found, parsed) = both(chunks);
        assert_eq!(
            found.len(),
            parsed.len(),
            "{what}: {found:?} against {parsed:?}"
        );
        for (raw, event) in found.iter().zip(&parsed) {
            assert_eq!(Some(&raw.id[..]), event.id(), "{what}");
            // After a blank line, as in its stream: a byte order mark first in the event is
            // content there, not the stream's own (the recorder guards it the same way).
            let mut alone = Parser::new();
            alone.push(Bytes::from_static(b"\n"));
            alone.push(raw.bytes.clone());
            let again = alone.next_event().expect("one event").unwrap();
            assert_eq!(&again, event, "{what}: {:?}", raw.bytes);
            assert!(alone.next_event().is_none(), "{what}");
        }
    }

    #[test]
    fn agrees_with_the_parser_on_every_split() {
        let streams: [&[u8]; 9] = [
            b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n",
            b"\xEF\xBB\xBFid: 7\r\ndata: x\r\n\r\nid:8\rdata\r\r",
            b"id: with\0nul\ndata: a\n\nid: 3\ndata\n\n",
            b"id: 4\n\nid\ndata: empty id\n\ndata: no id\n\nid: 5\ndata: never ends",
            b"data: a\nidx: 9\nid : 9\n\nID: 9\ndata\n\n: id: 9\n\n",
            b"id:  two spaces\ndata\n\nid:\ndata\n\nid: 1\nid: last\ndata: x\n\n",
            b"data: id: 1\n\nid: \xE2\x80\xA6\ndata:\n\n",
            b"\n\n\nevent: tick\n: note\nretry: 5\nid: 6\ndatum: no\ndata: yes\n\n\r\n",
            b"id: 1\r\ndata: a\r\r\nid: 2\ndata: b\r\n\r\n",
        ];
        for stream in streams {
            let what = String::from_utf8_lossy(stream);
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                assert_agree(&[a, b], &format!("{what:?} split at {split}"));
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_agree(&bytes, &format!("{what:?} byte by byte"));
        }
    }

    #[test]
    fn an_event_in_one_chunk_is_a_slice_of_it_and_one_across_chunks_is_its_own() {
        let (found, _) = both(&[b"data: a\nid: 1\n\nid: 2\ndat", b"a: b\n\n"]);
        assert_eq!(found.len(), 2);
        assert_eq!(&found[0].bytes[..], b"data: a\nid: 1\n\n");
        assert_eq!(found[0].buffer_len, 24);
        assert_eq!(&found[1].bytes[..], b"id: 2\ndata: b\n\n");
        assert_eq!(found[1].buffer_len, found[1].bytes.len());
    }

    #[test]
    fn stops_at_the_first_boundary_when_asked() {
        let mut scanner = Scanner::new();
        let mut raw = RawEvents::default();
        let chunk = Bytes::from_static(b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
        let mut found = Vec::new();
        let fed = raw
            .feed(&mut scanner, &chunk, true, None, |b| found.push(b))
            .unwrap();
        assert_eq!(fed.stopped_at, Some(15));
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn a_block_past_the_limits_is_an_error_and_holds_no_more() {
        let mut scanner = Scanner::with_limits(Limits::default().max_event_len(64));
        let mut raw = RawEvents::default();
        let chunk = Bytes::from(format!("id: 1\ndata: {}", "x".repeat(40)));
        let fed = raw.feed(&mut scanner, &chunk, false, None, |_| {}).unwrap();
        assert_eq!(fed.held_from, Some(0));
        assert!(raw.is_mid_block());
        let more = Bytes::from("y".repeat(40));
        assert!(raw.feed(&mut scanner, &more, false, None, |_| {}).is_err());
        assert!(raw.held.len() <= 64);
    }

    /// Marks, per block, as the raw blocks and the parser (any unknown field named with the
    /// prefix) see them.
    fn marks(chunks: &[&[u8]], prefix: &[u8]) -> (Vec<bool>, Vec<bool>) {
        side_by_side(
            chunks,
            Some(prefix),
            |block, _| Some(block.marked),
            |event| {
                Some(
                    event
                        .unknown_fields()
                        .iter()
                        .any(|(name, _)| name.starts_with(prefix)),
                )
            },
        )
    }

    #[test]
    fn marks_blocks_with_a_prefixed_field_as_the_parser_sees_them() {
        let stream: &[u8] = b"meta-a: 1\ndata: x\n\n: meta-b: comment\ndata: y\n\nmeta-\n\nmeta:x\n\nevent: meta-c\ndata\n\nx-meta-d: 1\n\n";
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            let (found, parsed) = marks(&[a, b], b"meta-");
            assert_eq!(found, parsed, "split at {split}");
            assert_eq!(found, [true, false, true, false, false, false]);
        }
        // Any unknown field, with an empty prefix; never a comment nor a known field.
        let (found, parsed) = marks(&[b"data: 1\nid: 2\nevent: e\nretry: 1\n: c\n\nx\n\n"], b"");
        assert_eq!(found, parsed);
        assert_eq!(found, [false, true]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_the_parser_on_random_streams_and_chunkings(
            tokens in proptest::collection::vec(proptest::sample::select(vec![
                &b"\n"[..], b"\r", b"\r\n", b":", b" ", b"id", b"id: ", b"data", b"data: ",
                b"\0", b"\xEF\xBB\xBF", b"7", b"x", b"event", b"\n\n", b"meta-", b"meta",
            ]), 0..60),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let stream: Vec<u8> = tokens.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= stream.len()).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts {
                chunks.push(&stream[at..cut]);
                at = cut;
            }
            chunks.push(&stream[at..]);
            assert_agree(&chunks, &format!("{:?} in {:?}", String::from_utf8_lossy(&stream), chunks));
            let (found, parsed) = marks(&chunks, b"meta-");
            proptest::prop_assert_eq!(found, parsed);
        }
    }
}
