//! The PostgreSQL v3 wire protocol, pure and synchronous: framing by header, startup packets,
//! the few message bodies the proxy must read, builders for what it writes, and SQLSTATEs.
//!
//! No I/O and no policy live here, so every function can be fuzzed and unit tested on bytes.
//! Nothing here panics on input: lengths are checked before use and before allocation.

pub mod backend;
pub mod effects;
pub mod frame;
pub mod frontend;
pub mod set_config;
pub mod sql;
pub mod sqlstate;
pub mod startup;

/// Protocol 3.0 as one integer (major << 16 | minor).
pub const PROTOCOL_3_0: u32 = 196_608;
/// Request code of CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Request code of SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A malformed message: always the client's (or server's) fault, never ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A length prefix below its minimum.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// A message longer than the configured cap.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap in force.
        max: usize,
    },
    /// The body ended before a field did.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Anything else wrong with a body.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over a message body that never panics: every read checks what remains.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        let (&b, rest) = self.buf.split_first().ok_or(ProtoError::Truncated(what))?;
        self.buf = rest;
        Ok(b)
    }

    /// Reads a big-endian i16.
    pub fn i16(&mut self, what: &'static str) -> Result<i16, ProtoError> {
        let b = self.bytes(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a big-endian i32.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, ProtoError> {
        self.u32(what).map(|v| i32::from_be_bytes(v.to_be_bytes()))
    }

    /// Reads exactly `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Reads a NUL-terminated string (without the NUL).
    pub fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], ProtoError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtoError::Truncated(what))?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// Reads a NUL-terminated UTF-8 string.
    pub fn cstr_utf8(&mut self, what: &'static str) -> Result<&'a str, ProtoError> {
        std::str::from_utf8(self.cstr(what)?).map_err(|_| ProtoError::Invalid(what))
    }

    /// The rest of the body.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}
