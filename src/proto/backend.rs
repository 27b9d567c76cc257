//! Backend messages: builders for what the proxy sends to clients, and parsers for the few
//! server messages it must read (authentication requests, ParameterStatus, BackendKeyData,
//! ErrorResponse).

use bytes::{BufMut, BytesMut};

use super::frame::write_message;
use super::{ProtoError, Reader};

/// An ErrorResponse or NoticeResponse as its fields (type byte, text), in wire order, so a
/// backend error can be forwarded unchanged except where the proxy means to change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    fields: Vec<(u8, String)>,
}

/// Severity of a proxy-made error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Statement-level: the session continues.
    Error,
    /// Session-level: the connection closes after it.
    Fatal,
    /// A notice.
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

impl PgError {
    /// A proxy-made error.
    pub fn new(severity: Severity, code: &str, message: impl Into<String>) -> Self {
        let s = severity.as_str().to_string();
        PgError {
            fields: vec![
                (b'S', s.clone()),
                (b'V', s),
                (b'C', code.to_string()),
                (b'M', message.into()),
            ],
        }
    }

    /// Adds a DETAIL line.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.fields.push((b'D', detail.into()));
        self
    }

    /// Adds a HINT line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.fields.push((b'H', hint.into()));
        self
    }

    /// Parses an ErrorResponse/NoticeResponse body.
    pub fn parse(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(body);
        let mut fields = Vec::new();
        loop {
            let t = r.u8("error field type")?;
            if t == 0 {
                break;
            }
            let v = r.cstr("error field")?;
            fields.push((t, String::from_utf8_lossy(v).into_owned()));
        }
        Ok(PgError { fields })
    }

    fn field(&self, t: u8) -> Option<&str> {
        self.fields.iter().find(|(k, _)| *k == t).map(|(_, v)| v.as_str())
    }

    /// SQLSTATE.
    pub fn code(&self) -> &str {
        self.field(b'C').unwrap_or("XX000")
    }

    /// Primary message.
    pub fn message(&self) -> &str {
        self.field(b'M').unwrap_or("")
    }

    /// The HINT line, if any.
    pub fn hint(&self) -> Option<&str> {
        self.field(b'H')
    }

    /// Non-localized severity (`V`), else the localized one (`S`).
    pub fn severity(&self) -> &str {
        self.field(b'V').or_else(|| self.field(b'S')).unwrap_or("ERROR")
    }

    /// Whether the severity is FATAL or PANIC.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity(), "FATAL" | "PANIC")
    }

    /// The same error with another severity (S and V), e.g. a backend FATAL passed on as ERROR
    /// when the client's connection survives it, or an ERROR made FATAL at login.
    pub fn with_severity(mut self, severity: Severity) -> Self {
        for (k, v) in &mut self.fields {
            if *k == b'S' || *k == b'V' {
                *v = severity.as_str().to_string();
            }
        }
        self
    }

    /// Appends the ErrorResponse ('E') to `out`.
    pub fn write_error(&self, out: &mut BytesMut) {
        self.write_as(b'E', out);
    }

    /// Appends it as a NoticeResponse ('N') to `out`.
    pub fn write_notice(&self, out: &mut BytesMut) {
        self.write_as(b'N', out);
    }

    fn write_as(&self, tag: u8, out: &mut BytesMut) {
        write_message(out, tag, |o| {
            for (k, v) in &self.fields {
                o.put_u8(*k);
                put_cstr(o, v.as_bytes());
            }
            o.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity(), self.code(), self.message())
    }
}

/// Appends `s` and a NUL.
pub fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// AuthenticationOk, MD5Password, SASL and friends: `R` with a code and optional payload.
pub fn auth(out: &mut BytesMut, code: u32, payload: &[u8]) {
    write_message(out, b'R', |o| {
        o.put_u32(code);
        o.put_slice(payload);
    });
}

/// Authentication request codes.
pub mod auth_code {
    /// AuthenticationOk.
    pub const OK: u32 = 0;
    /// AuthenticationCleartextPassword.
    pub const CLEARTEXT: u32 = 3;
    /// AuthenticationMD5Password.
    pub const MD5: u32 = 5;
    /// AuthenticationSASL.
    pub const SASL: u32 = 10;
    /// AuthenticationSASLContinue.
    pub const SASL_CONTINUE: u32 = 11;
    /// AuthenticationSASLFinal.
    pub const SASL_FINAL: u32 = 12;
}

/// ParameterStatus.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    write_message(out, b'S', |o| {
        put_cstr(o, name.as_bytes());
        put_cstr(o, value.as_bytes());
    });
}

/// BackendKeyData.
pub fn backend_key_data(out: &mut BytesMut, pid: u32, secret: u32) {
    write_message(out, b'K', |o| {
        o.put_u32(pid);
        o.put_u32(secret);
    });
}

/// ReadyForQuery with a transaction status byte (`I`, `T`, `E`).
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    write_message(out, b'Z', |o| o.put_u8(status));
}

/// CommandComplete.
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    write_message(out, b'C', |o| put_cstr(o, tag.as_bytes()));
}

/// NegotiateProtocolVersion: the newest minor version supported and the unrecognised options.
pub fn negotiate_protocol_version(out: &mut BytesMut, minor: u32, unrecognised: &[&str]) {
    write_message(out, b'v', |o| {
        o.put_u32((3 << 16) | minor);
        o.put_u32(u32::try_from(unrecognised.len()).unwrap_or(u32::MAX));
        for name in unrecognised {
            put_cstr(o, name.as_bytes());
        }
    });
}

/// An authentication request from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    /// Login done.
    Ok,
    /// Send the password in clear.
    Cleartext,
    /// MD5 with this salt.
    Md5([u8; 4]),
    /// SASL with these mechanisms.
    Sasl(Vec<String>),
    /// SASL server data.
    SaslContinue(Vec<u8>),
    /// SASL outcome data.
    SaslFinal(Vec<u8>),
    /// Something the proxy does not speak (Kerberos, GSS, SSPI).
    Other(u32),
}

/// Parses an 'R' body.
pub fn parse_auth(body: &[u8]) -> Result<AuthRequest, ProtoError> {
    let mut r = Reader::new(body);
    Ok(match r.u32("auth code")? {
        auth_code::OK => AuthRequest::Ok,
        auth_code::CLEARTEXT => AuthRequest::Cleartext,
        auth_code::MD5 => {
            let s = r.bytes(4, "md5 salt")?;
            AuthRequest::Md5([s[0], s[1], s[2], s[3]])
        }
        auth_code::SASL => {
            let mut mechs = Vec::new();
            loop {
                let m = r.cstr_utf8("SASL mechanism")?;
                if m.is_empty() {
                    break;
                }
                mechs.push(m.to_string());
            }
            AuthRequest::Sasl(mechs)
        }
        auth_code::SASL_CONTINUE => AuthRequest::SaslContinue(r.rest().to_vec()),
        auth_code::SASL_FINAL => AuthRequest::SaslFinal(r.rest().to_vec()),
        other => AuthRequest::Other(other),
    })
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), ProtoError> {
    let mut r = Reader::new(body);
    let name = r.cstr_utf8("parameter name")?.to_string();
    let value = String::from_utf8_lossy(r.cstr("parameter value")?).into_owned();
    Ok((name, value))
}

/// Parses a BackendKeyData body into (pid, secret).
pub fn parse_backend_key(body: &[u8]) -> Result<(u32, u32), ProtoError> {
    let mut r = Reader::new(body);
    Ok((r.u32("backend pid")?, r.u32("backend key")?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proto::frame::whole_message;

    #[test]
    fn error_round_trip_and_severity_change() {
        let e = PgError::new(Severity::Fatal, "57P01", "terminating").with_detail("d");
        let mut b = BytesMut::new();
        e.write_error(&mut b);
        let w = whole_message(&b, 1000).unwrap().unwrap();
        assert_eq!(w.tag, b'E');
        let p = PgError::parse(w.body).unwrap();
        assert_eq!(p, e);
        assert!(p.is_fatal());
        let lowered = p.with_severity(Severity::Error);
        assert_eq!(lowered.severity(), "ERROR");
        assert_eq!(lowered.code(), "57P01");
    }

    #[test]
    fn parsers_reject_truncation() {
        assert!(parse_auth(&[0, 0, 0, 5, 1]).is_err());
        assert_eq!(
            parse_auth(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(),
            AuthRequest::Md5([1, 2, 3, 4])
        );
        assert!(parse_parameter_status(b"a\0b").is_err());
        assert!(parse_backend_key(&[0, 0, 0]).is_err());
        assert!(PgError::parse(b"Cabc").is_err());
    }
}
