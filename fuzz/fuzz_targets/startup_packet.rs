//! Startup packets, `options` strings and frame headers from untrusted clients: never panic.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use libfuzzer_sys::fuzz_target;
use pgsluice::proto::{frame, frontend, startup};

fuzz_target!(|data: &[u8]| {
    let _ = startup::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = startup::parse_options(text);
        let _ = startup::is_replication(text);
    }
    let _ = frame::parse_header(data, 1 << 20);
    let _ = frame::whole_message(data, 1 << 20);
    let _ = frontend::parse_sasl_initial(data);
    let _ = frontend::parse_password(data);
});
