//! The untagged first packet of a connection: StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest, or something unsupported.

use super::{
    ProtoError, Reader, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, SSL_REQUEST_CODE,
};

/// What the client's first packet asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest with the (proxy-issued) key.
    Cancel {
        /// Process id from BackendKeyData.
        pid: u32,
        /// Secret key from BackendKeyData.
        secret: u32,
    },
    /// StartupMessage.
    Startup {
        /// Major protocol version.
        major: u16,
        /// Minor protocol version.
        minor: u16,
        /// Parameters in the order sent.
        params: Vec<(String, String)>,
    },
}

/// Checks a startup packet's length prefix (which counts itself) before anything is allocated.
/// Returns the body length to read.
pub fn body_len(len_prefix: u32) -> Result<usize, ProtoError> {
    let len = usize::try_from(len_prefix).map_err(|_| ProtoError::BadLength(i64::from(len_prefix)))?;
    if len < 8 {
        return Err(ProtoError::BadLength(i64::from(len_prefix)));
    }
    if len > MAX_STARTUP_PACKET {
        // PostgreSQL's "invalid length of startup packet": a protocol violation, not a
        // configurable limit.
        return Err(ProtoError::BadLength(i64::from(len_prefix)));
    }
    Ok(len - 4)
}

/// Parses a startup packet body (everything after the length prefix).
pub fn parse(body: &[u8]) -> Result<StartupRequest, ProtoError> {
    let mut r = Reader::new(body);
    let code = r.u32("startup request code")?;
    match code {
        SSL_REQUEST_CODE if r.remaining() == 0 => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST_CODE if r.remaining() == 0 => Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST_CODE if r.remaining() == 8 => Ok(StartupRequest::Cancel {
            pid: r.u32("cancel pid")?,
            secret: r.u32("cancel key")?,
        }),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(ProtoError::Invalid("special startup request length"))
        }
        _ => {
            let major = u16::try_from(code >> 16).map_err(|_| ProtoError::Invalid("protocol version"))?;
            let minor = u16::try_from(code & 0xffff).map_err(|_| ProtoError::Invalid("protocol version"))?;
            let mut params = Vec::new();
            if major == 3 {
                loop {
                    let name = r.cstr_utf8("startup parameter name")?;
                    if name.is_empty() {
                        break;
                    }
                    let value = r.cstr_utf8("startup parameter value")?;
                    params.push((name.to_string(), value.to_string()));
                }
                if r.remaining() != 0 {
                    return Err(ProtoError::Invalid("startup packet: data after the terminator"));
                }
            }
            Ok(StartupRequest::Startup { major, minor, params })
        }
    }
}

/// Whether a `replication` startup value asks for a replication connection
/// (PostgreSQL's boolean spellings, plus `database`).
pub fn is_replication(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    matches!(v.as_str(), "true" | "on" | "yes" | "1" | "database")
        || (v.len() > 1 && ("true".starts_with(&v) || "yes".starts_with(&v)))
}

/// Splits the `options` startup parameter into `name=value` settings, as the backend does for
/// `-c name=value`, `-cname=value` and `--name=value`. Backslash escapes a space or backslash.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_option_words(options);
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| "\"-c\" without a setting in options".to_string())?
        } else if let Some(s) = w.strip_prefix("--").or_else(|| w.strip_prefix("-c")) {
            s.to_string()
        } else {
            return Err(format!(
                "unsupported switch {w:?} in options (only -c name=value is)"
            ));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("invalid setting {setting:?} in options (want name=value)"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

fn split_option_words(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn startup(code: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn parses_startup_and_special_requests() {
        let body = startup(super::super::PROTOCOL_3_0, &[("user", "a"), ("database", "d")]);
        match parse(&body).unwrap() {
            StartupRequest::Startup {
                major: 3,
                minor: 0,
                params,
            } => assert_eq!(params.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupRequest::Ssl
        );
        let mut c = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        c.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(parse(&c).unwrap(), StartupRequest::Cancel { pid: 7, secret: 9 });
    }

    #[test]
    fn rejects_malformed() {
        assert!(body_len(3).is_err());
        assert!(body_len(10_001).is_err());
        assert!(parse(&[0, 3]).is_err());
        // missing terminator
        let mut b = startup(super::super::PROTOCOL_3_0, &[("user", "a")]);
        b.pop();
        b.pop();
        assert!(parse(&b).is_err());
        // cancel with a short key
        let mut c = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        c.push(1);
        assert!(parse(&c).is_err());
    }

    #[test]
    fn options_and_replication() {
        let o = parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x=a\\ b").unwrap();
        assert_eq!(o[0], ("search_path".into(), "a,b".into()));
        assert_eq!(o[1], ("statement_timeout".into(), "5s".into()));
        assert_eq!(o[2], ("work_mem".into(), "1MB".into()));
        assert_eq!(o[3], ("x".into(), "a b".into()));
        assert!(parse_options("-d 5").is_err());
        assert!(is_replication("database") && is_replication("on") && is_replication("1"));
        assert!(!is_replication("false") && !is_replication("off") && !is_replication("0"));
    }
}
