//! Tests of the SCRAM primitives (against RFC 4231 / RFC 7677 values) and message parsers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn hmac_and_sha256_known_answers() {
    // RFC 4231 test case 2.
    assert_eq!(
        hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // FIPS 180-2 "abc".
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // Long keys are hashed, not rejected.
    let _ = hmac_sha256(&[1; 200], b"x");
    assert!(ct_eq(b"abc", b"abc"));
    assert!(!ct_eq(b"abc", b"abd"));
    assert!(!ct_eq(b"abc", b"ab"));
}

/// RFC 7677 section 3: the primitives reproduce the exchange's proof and signature.
#[test]
fn rfc7677_primitives() {
    let salt = b64_decode(b"W22ZaJ0SNY7soEsUEjb6gQ==", "salt").unwrap();
    let salted = salted_password(saslprep("pencil"), &salt, 4096);
    let ck = client_key(&salted);
    let sk = server_key(&salted);
    let client_first_bare = b"n=user,r=rOprNGfwEbeRWgbNEkqO";
    let server_first =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    let without_proof = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    let am = auth_message(client_first_bare, server_first, without_proof);
    let proof = xor32(&ck, &hmac_sha256(&stored_key(&ck), &am));
    assert_eq!(b64_encode(&proof), "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
    assert_eq!(
        b64_encode(&hmac_sha256(&sk, &am)),
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
}

#[test]
fn nonces_are_printable_and_distinct() {
    let a = generate_nonce();
    assert_eq!(a.len(), 24);
    assert!(parse_nonce(a.as_bytes()).is_ok());
    assert_ne!(a, generate_nonce());
}

#[test]
fn saslprep_passes_text_through() {
    assert_eq!(saslprep("pencil"), b"pencil");
    assert_eq!(saslprep("p\u{e4}ss"), "p\u{e4}ss".as_bytes());
}

#[test]
fn parses_client_first() {
    let cf = parse_client_first(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL").unwrap();
    assert_eq!(cf.gs2, Gs2Flag::NotSupported);
    assert_eq!(cf.bare, b"n=user,r=fyko+d2lbbFgONRv9qkxdawL");
    assert_eq!(cf.nonce, "fyko+d2lbbFgONRv9qkxdawL");
    let cf = parse_client_first(b"y,,n=,r=abc").unwrap();
    assert_eq!(cf.gs2, Gs2Flag::SupportedNotUsed);
    assert_eq!(cf.gs2.header(), b"y,,");
    assert_eq!(
        parse_client_first(b"p=tls-server-end-point,,n=,r=abc"),
        Err(AuthError::ChannelBindingUnsupported)
    );
}

#[test]
fn builds_messages() {
    assert_eq!(build_client_first_bare("a=b,c", "xyz"), "n=a=3Db=2Cc,r=xyz");
    assert_eq!(build_server_first("abc", b"\x01\x02", 7), "r=abc,s=AQI=,i=7");
    let without = build_client_final_without_proof(Gs2Flag::NotSupported, "abc");
    assert_eq!(without, "c=biws,r=abc");
    assert_eq!(
        build_client_final_without_proof(Gs2Flag::SupportedNotUsed, "n"),
        "c=eSws,r=n"
    );
    let full = build_client_final(&without, &[0; 32]);
    let parsed = parse_client_final(full.as_bytes()).unwrap();
    assert_eq!(parsed.without_proof, without.as_bytes());
    assert_eq!(parsed.channel_binding, b"n,,");
    assert_eq!(parsed.nonce, "abc");
    assert_eq!(parsed.proof, [0; 32]);
    let sf = build_server_final(&[9; 32]);
    assert_eq!(
        parse_server_final(sf.as_bytes()),
        Ok(ServerFinal::Verifier([9; 32]))
    );
}

#[test]
fn parses_server_first_with_extension() {
    let sf = parse_server_first(b"r=abcdef,s=AQI=,i=12,x=ignored").unwrap();
    assert_eq!(sf.nonce, "abcdef");
    assert_eq!(sf.salt, [1, 2]);
    assert_eq!(sf.iterations, 12);
}

#[test]
fn server_error_keeps_commas() {
    assert_eq!(
        parse_server_final(b"e=other-error, really"),
        Ok(ServerFinal::Error("other-error, really".into()))
    );
    // Non-UTF-8 error text is replaced, not rejected.
    assert_eq!(
        parse_server_final(b"e=\xff"),
        Ok(ServerFinal::Error("\u{fffd}".into()))
    );
}

#[test]
fn iteration_parsing() {
    assert_eq!(parse_iterations(b"4096"), Ok(4096));
    assert_eq!(parse_iterations(b"4294967295"), Ok(u32::MAX));
    assert_eq!(parse_iterations(b"0"), Err(AuthError::IterationCount(0)));
    for bad in [
        &b""[..],
        b"+1",
        b"-1",
        b" 1",
        b"1 ",
        b"4294967296",
        b"1e3",
        b"\xff",
    ] {
        assert!(parse_iterations(bad).is_err(), "{bad:?}");
    }
}
