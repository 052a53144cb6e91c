//! The one leading byte order mark an event stream may start with.

/// UTF-8 encoding of U+FEFF.
pub(crate) const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

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

#[cfg(test)]
mod tests {
    use super::*;

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
