//! A borrowing reader over untrusted bytes (the rustls `codec::Reader` habit).

use super::error::InvalidMessage;

/// Reads big-endian fields off the front of a slice. Every read is checked: a read past the end
/// returns `None` and leaves nothing half-consumed.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The next `n` bytes, or `None` if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.buf.split_at_checked(n)?;
        self.buf = tail;
        Some(head)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// One byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A child reader over the next `n` bytes (a length-prefixed substructure).
    pub fn sub(&mut self, n: usize) -> Option<Self> {
        self.take(n).map(Self::new)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// How many bytes are left.
    pub fn left(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// `Err(TrailingBytes(what))` unless everything was consumed.
    pub fn finish(&self, what: &'static str) -> Result<(), InvalidMessage> {
        match self.is_empty() {
            true => Ok(()),
            false => Err(InvalidMessage::TrailingBytes(what)),
        }
    }
}

/// Shorthand for turning a failed read into `Truncated(what)`.
pub(crate) trait OrTruncated<T> {
    /// `Ok(v)` or `Err(Truncated(what))`.
    fn or_truncated(self, what: &'static str) -> Result<T, InvalidMessage>;
}

impl<T> OrTruncated<T> for Option<T> {
    fn or_truncated(self, what: &'static str) -> Result<T, InvalidMessage> {
        self.ok_or(InvalidMessage::Truncated(what))
    }
}

/// Appends `body(out)` behind a big-endian `u16` length that covers `header_len` bytes already
/// written before the length field plus the length field itself and the body (IKE lengths
/// include their own header). Encoding cannot fail: a body too large for 16 bits saturates the
/// field, which the peer then rejects; callers never build such payloads.
pub(crate) fn with_u16_len(out: &mut Vec<u8>, header_len: usize, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    body(out);
    let len = u16::try_from(out.len() - at + header_len).unwrap_or(u16::MAX);
    if let Some(field) = out.get_mut(at..at + 2) {
        field.copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_fields_and_stops_at_the_end() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 3, 9]);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(2));
        assert_eq!(r.u32(), Some(3));
        assert_eq!(r.u16(), None, "a short read consumes nothing");
        assert_eq!(r.left(), 1);
        assert_eq!(r.finish("x"), Err(InvalidMessage::TrailingBytes("x")));
        assert_eq!(r.rest(), &[9]);
        assert!(r.is_empty());
        assert_eq!(r.take(1), None);
        assert_eq!(r.take(0), Some(&[][..]));
    }

    #[test]
    fn sub_takes_a_bounded_child() {
        let mut r = Reader::new(&[0, 0, 0, 0, 0, 0, 0, 7, 1, 2]);
        assert_eq!(r.u64(), Some(7));
        let mut child = r.sub(1).unwrap();
        assert_eq!(child.u16(), None);
        assert_eq!(child.u8(), Some(1));
        assert!(r.sub(2).is_none());
        assert_eq!(r.rest(), &[2]);
    }

    #[test]
    fn length_prefix_counts_header_and_body() {
        let mut out = vec![0xaa, 0xbb];
        with_u16_len(&mut out, 2, |o| o.extend_from_slice(&[1, 2, 3]));
        assert_eq!(out, [0xaa, 0xbb, 0, 7, 1, 2, 3]);
    }
}
