//! The SCRAM server state machine fed arbitrary client messages: never panics.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use libfuzzer_sys::fuzz_target;
use pgsluice::auth::scram_server::ScramServer;
use pgsluice::auth::secret::ScramVerifier;

fuzz_target!(|data: &[u8]| {
    let (first, last) = data.split_at(data.len() / 2);
    let v = ScramVerifier::from_password("pencil", b"0123456789abcdef", 1);
    let mut s = ScramServer::new(v, false);
    let _ = s.client_first("SCRAM-SHA-256", first);
    let _ = s.client_final(last);
});
