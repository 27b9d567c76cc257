//! Framing by the 5-byte header (tag + length), with the length checked against a cap before
//! anything is allocated.

use super::ProtoError;

/// Tag byte + 4-byte length.
pub const HEADER_LEN: usize = 5;

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type byte.
    pub tag: u8,
    /// Length of the body (the length prefix minus its own 4 bytes).
    pub body_len: usize,
}

impl Header {
    /// Header plus body.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

/// Reads a header from the start of `buf`: `Ok(None)` when fewer than 5 bytes are there.
/// A length below 4 is malformed; a body over `max_body` is refused.
pub fn parse_header(buf: &[u8], max_body: usize) -> Result<Option<Header>, ProtoError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let tag = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let body_len = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_sub(4))
        .ok_or(ProtoError::BadLength(i64::from(len)))?;
    if body_len > max_body {
        return Err(ProtoError::TooLarge {
            len: body_len,
            max: max_body,
        });
    }
    Ok(Some(Header { tag, body_len }))
}

/// A complete message found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole<'a> {
    /// Message type byte.
    pub tag: u8,
    /// The body.
    pub body: &'a [u8],
    /// Header plus body length.
    pub total: usize,
}

/// A whole message at the start of `buf`, if all of it is there.
pub fn whole_message(buf: &[u8], max_body: usize) -> Result<Option<Whole<'_>>, ProtoError> {
    let Some(h) = parse_header(buf, max_body)? else {
        return Ok(None);
    };
    Ok(buf.get(HEADER_LEN..h.total_len()).map(|body| Whole {
        tag: h.tag,
        body,
        total: h.total_len(),
    }))
}

/// Appends a message with `tag` whose body is written by `body`; fills in the length.
pub fn write_message(out: &mut bytes::BytesMut, tag: u8, body: impl FnOnce(&mut bytes::BytesMut)) {
    use bytes::BufMut;
    out.put_u8(tag);
    let len_at = out.len();
    out.put_u32(0);
    body(out);
    let len = u32::try_from(out.len() - len_at).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(len_at..len_at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_checks() {
        assert_eq!(parse_header(b"Q\0\0", 100).unwrap(), None);
        assert_eq!(
            parse_header(b"Q\0\0\0\x09abcd", 100).unwrap(),
            Some(Header {
                tag: b'Q',
                body_len: 5
            })
        );
        assert!(parse_header(b"Q\0\0\0\x03", 100).is_err());
        assert!(parse_header(b"Q\xff\xff\xff\xff", 100).is_err());
        assert!(whole_message(b"Q\0\0\0\x09abcd", 100).unwrap().is_none());
        assert_eq!(
            whole_message(b"Z\0\0\0\x05I", 100).unwrap(),
            Some(Whole {
                tag: b'Z',
                body: &b"I"[..],
                total: 6
            })
        );
    }

    #[test]
    fn writes_lengths() {
        let mut b = bytes::BytesMut::new();
        write_message(&mut b, b'Z', |o| o.extend_from_slice(b"I"));
        assert_eq!(&b[..], b"Z\0\0\0\x05I");
    }
}
