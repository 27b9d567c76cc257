//! Frontend messages: parsers for what clients send during authentication, and builders for
//! what the proxy itself sends to servers.

use bytes::{BufMut, BytesMut};

use super::backend::put_cstr;
use super::frame::write_message;
use super::{ProtoError, Reader, CANCEL_REQUEST_CODE, PROTOCOL_3_0};

/// SASLInitialResponse body: (mechanism, client-first data).
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ProtoError> {
    let mut r = Reader::new(body);
    let mech = r.cstr_utf8("SASL mechanism")?;
    let len = r.i32("SASL data length")?;
    let data = match usize::try_from(len) {
        Ok(n) => r.bytes(n, "SASL data")?,
        Err(_) => &[],
    };
    Ok((mech, data))
}

/// PasswordMessage body (cleartext or md5 response), without its NUL.
pub fn parse_password(body: &[u8]) -> Result<&[u8], ProtoError> {
    Reader::new(body).cstr("password")
}

/// StartupMessage to a server.
pub fn startup(out: &mut BytesMut, params: &[(&str, &str)]) {
    let start = out.len();
    out.put_u32(0);
    out.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.put_u8(0);
    let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(start..start + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// PasswordMessage (cleartext or md5).
pub fn password(out: &mut BytesMut, pw: &[u8]) {
    write_message(out, b'p', |o| put_cstr(o, pw));
}

/// SASLInitialResponse.
pub fn sasl_initial(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    write_message(out, b'p', |o| {
        put_cstr(o, mechanism.as_bytes());
        o.put_i32(i32::try_from(data.len()).unwrap_or(i32::MAX));
        o.put_slice(data);
    });
}

/// SASLResponse.
pub fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    write_message(out, b'p', |o| o.put_slice(data));
}

/// Simple Query.
pub fn query(out: &mut BytesMut, sql: &str) {
    write_message(out, b'Q', |o| put_cstr(o, sql.as_bytes()));
}

/// Terminate.
pub fn terminate(out: &mut BytesMut) {
    write_message(out, b'X', |_| {});
}

/// CancelRequest (16 bytes, untagged).
pub fn cancel_request(out: &mut BytesMut, pid: u32, secret: u32) {
    out.put_u32(16);
    out.put_u32(CANCEL_REQUEST_CODE);
    out.put_u32(pid);
    out.put_u32(secret);
}

/// Quotes `s` as an SQL string literal the way libpq's PQescapeLiteral does: doubled quotes,
/// and the `E''` form with doubled backslashes when a backslash is present, so the result is
/// right whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        q.push_str(" E'");
    } else {
        q.push('\'');
    }
    for c in s.chars() {
        match c {
            '\'' => q.push_str("''"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sasl_initial_round_trip() {
        let mut b = BytesMut::new();
        sasl_initial(&mut b, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let (mech, data) = parse_sasl_initial(&b[5..]).unwrap();
        assert_eq!(mech, "SCRAM-SHA-256");
        assert_eq!(data, b"n,,n=,r=abc");
        assert!(parse_sasl_initial(b"SCRAM\0\0\0\0\x09ab").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal("a\\b"), " E'a\\\\b'");
    }
}
