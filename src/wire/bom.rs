//! The one leading byte order mark an event stream may start with.

/// UTF-8 encoding of U+FEFF.
pub(crate) const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// True when `block` starts with a byte order mark. Inside a stream that mark is content; first
/// in a client's stream it would be taken for the stream's own and dropped, so a block like this
/// goes out or is stored after a blank line.
pub(crate) fn starts_with_bom(block: &[u8]) -> bool {
    block.starts_with(&BOM)
}

/// How far the start of a stream has been matched against [`BOM`].
///
/// Only the first three bytes of a stream can be a BOM, but they may arrive in three chunks, so the
/// match is carried from one chunk to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeadingBom {
    /// Still at the start of the stream; this many bytes of the BOM were seen (0 to 2).
    Matching(u8),
    /// Decided: the BOM was found and skipped, or the stream does not start with one.
    Decided,
}

/// What one chunk told about the leading BOM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BomStep {
    /// The whole chunk (and any bytes held before it) may still be a BOM: wait for more bytes.
    NeedMore,
    /// A BOM ends at this offset of the chunk: the bytes before it, and any held, are the BOM.
    Found { end: usize },
    /// No BOM: `held` bytes from earlier chunks turned out to be ordinary content.
    Absent { held: u8 },
    /// Decided in an earlier chunk.
    Decided,
}

impl LeadingBom {
    pub(crate) const fn new() -> Self {
        Self::Matching(0)
    }

    /// True until the first byte of the stream has been seen.
    pub(crate) const fn is_untouched(self) -> bool {
        matches!(self, Self::Matching(0))
    }

    /// Matches the start of `chunk`; an empty chunk changes nothing.
    pub(crate) fn step(&mut self, chunk: &[u8]) -> BomStep {
        let Self::Matching(matched) = *self else {
            return BomStep::Decided;
        };
        if chunk.is_empty() {
            return if matched == 0 {
                BomStep::Decided
            } else {
                BomStep::NeedMore
            };
        }
        let wanted = &BOM[usize::from(matched)..];
        let n = wanted.len().min(chunk.len());
        if chunk[..n] != wanted[..n] {
            *self = Self::Decided;
            return BomStep::Absent { held: matched };
        }
        if n == wanted.len() {
            *self = Self::Decided;
            BomStep::Found { end: n }
        } else {
            // `n` is at most 2 here, so the sum stays below 3.
            *self = Self::Matching(matched + n as u8);
            BomStep::NeedMore
        }
    }
}

/// Drops the leading BOM of an inner stream that something was inserted in front of.
///
/// A BOM is only skipped at the very start of a stream: once a layer sends its own bytes first
/// (an initial comment, a `retry` hint, a heartbeat), an upstream BOM would become an ordinary
/// character that spoils the first line. A client drops a leading BOM anyway, so dropping it here
/// changes nothing it sees. While the first bytes may still be a BOM (at most two), they are held.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BomFilter {
    bom: LeadingBom,
    held: u8,
}

impl BomFilter {
    /// A filter that drops a leading BOM.
    pub(crate) const fn dropping() -> Self {
        Self {
            bom: LeadingBom::new(),
            held: 0,
        }
    }

    /// A filter that lets everything through.
    pub(crate) const fn off() -> Self {
        Self {
            bom: LeadingBom::Decided,
            held: 0,
        }
    }

    /// True once the question is settled: every chunk passes through as it is.
    pub(crate) fn is_done(&self) -> bool {
        self.bom == LeadingBom::Decided && self.held == 0
    }

    /// Filters the next chunk of the inner stream; `None` when nothing is to be sent yet.
    pub(crate) fn push(&mut self, mut data: bytes::Bytes) -> Option<bytes::Bytes> {
        match self.bom.step(&data) {
            // At most two bytes: a longer chunk settles the question.
            BomStep::NeedMore => {
                self.held += data.len() as u8;
                None
            }
            BomStep::Found { end } => {
                self.held = 0;
                bytes::Buf::advance(&mut data, end);
                (!data.is_empty()).then_some(data)
            }
            BomStep::Absent { .. } | BomStep::Decided => match self.take_held() {
                Some(held) => {
                    let mut joined = bytes::BytesMut::with_capacity(held.len() + data.len());
                    joined.extend_from_slice(&held);
                    joined.extend_from_slice(&data);
                    Some(joined.freeze())
                }
                None => Some(data),
            },
        }
    }

    /// Settles the question without more bytes (the stream ended, or a non-data frame came):
    /// what was held is content after all.
    pub(crate) fn finish(&mut self) -> Option<bytes::Bytes> {
        self.bom = LeadingBom::Decided;
        self.take_held()
    }

    fn take_held(&mut self) -> Option<bytes::Bytes> {
        let n = std::mem::take(&mut self.held);
        (n > 0).then(|| bytes::Bytes::from_static(&BOM[..usize::from(n)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn filter_all(chunks: &[&[u8]]) -> Vec<u8> {
        let mut filter = BomFilter::dropping();
        let mut out = Vec::new();
        for chunk in chunks {
            if let Some(data) = filter.push(Bytes::copy_from_slice(chunk)) {
                out.extend_from_slice(&data);
            }
        }
        if let Some(data) = filter.finish() {
            out.extend_from_slice(&data);
        }
        assert!(filter.is_done());
        out
    }

    #[test]
    fn filter_drops_a_leading_bom_however_split() {
        assert_eq!(filter_all(&[b"\xEF\xBB\xBFdata"]), b"data");
        assert_eq!(filter_all(&[b"\xEF", b"", b"\xBB", b"\xBF", b"x"]), b"x");
        assert_eq!(filter_all(&[b"\xEF\xBB\xBF\xEF\xBB\xBF"]), b"\xEF\xBB\xBF");
    }

    #[test]
    fn filter_keeps_what_is_not_a_bom() {
        assert_eq!(filter_all(&[b"\xEF\xBB", b"x"]), b"\xEF\xBBx");
        assert_eq!(filter_all(&[b"\xEF"]), b"\xEF");
        assert_eq!(filter_all(&[b"data", b"\xEF\xBB\xBF"]), b"data\xEF\xBB\xBF");
        let mut off = BomFilter::off();
        assert!(off.is_done());
        let bom = Bytes::from_static(&BOM);
        assert_eq!(off.push(bom.clone()), Some(bom));
    }

    #[test]
    fn whole_bom_in_one_chunk() {
        let mut bom = LeadingBom::new();
        assert_eq!(bom.step(b"\xEF\xBB\xBFdata"), BomStep::Found { end: 3 });
        assert_eq!(bom.step(b"\xEF\xBB\xBF"), BomStep::Decided);
    }

    #[test]
    fn bom_split_byte_by_byte() {
        let mut bom = LeadingBom::new();
        assert_eq!(bom.step(b"\xEF"), BomStep::NeedMore);
        assert_eq!(bom.step(b""), BomStep::NeedMore);
        assert_eq!(bom.step(b"\xBB"), BomStep::NeedMore);
        assert_eq!(bom.step(b"\xBFx"), BomStep::Found { end: 1 });
    }

    #[test]
    fn partial_bom_then_other_bytes() {
        let mut bom = LeadingBom::new();
        assert_eq!(bom.step(b"\xEF\xBB"), BomStep::NeedMore);
        assert_eq!(bom.step(b"x"), BomStep::Absent { held: 2 });
    }

    #[test]
    fn no_bom() {
        let mut bom = LeadingBom::new();
        assert!(bom.is_untouched());
        assert_eq!(bom.step(b"data: x"), BomStep::Absent { held: 0 });
        assert!(!bom.is_untouched());
    }
}
