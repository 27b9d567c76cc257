//! Backend message bodies the proxy reads (auth requests, ParameterStatus, BackendKeyData,
//! ErrorResponse): never panic, and a parsed error re-encodes to something that parses.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use libfuzzer_sys::fuzz_target;
use pgsluice::proto::backend::{self, PgError, Severity};
use pgsluice::proto::frame;

fuzz_target!(|data: &[u8]| {
    let _ = backend::parse_auth(data);
    let _ = backend::parse_parameter_status(data);
    let _ = backend::parse_backend_key(data);
    if let Ok(e) = PgError::parse(data) {
        let mut out = bytes::BytesMut::new();
        e.clone().with_severity(Severity::Error).write_error(&mut out);
        let w = frame::whole_message(&out, usize::MAX).unwrap().unwrap();
        PgError::parse(w.body).unwrap();
    }
});
