//! Tests of the SCRAM client alone (RFC 7677 vector, malformed server messages) and of
//! client/server exchanges, including pass-through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::auth::scram::b64_decode;
use crate::auth::{ScramServer, ScramVerifier};

// RFC 7677 section 3.
const C1: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const S1: &[u8] = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const C2: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const S2: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

/// Few iterations keep the round-trip tests fast in debug builds.
const ITER: u32 = 64;

fn rfc_client(cred: ScramCredential) -> ScramClient {
    ScramClient::with_parts(cred, "user", "rOprNGfwEbeRWgbNEkqO".into())
}

fn rfc_keys() -> ([u8; 32], [u8; 32]) {
    let salt = b64_decode(b"W22ZaJ0SNY7soEsUEjb6gQ==", "salt").unwrap();
    let salted = salted_password(b"pencil", &salt, 4096);
    (client_key(&salted), server_key(&salted))
}

#[test]
fn rfc7677_with_password() {
    let mut c = rfc_client(ScramCredential::Password("pencil".into()));
    assert_eq!(c.client_first(), C1);
    assert_eq!(c.server_first(S1).unwrap(), C2);
    c.server_final(S2).unwrap();
    assert_eq!(c.server_final(S2), Err(AuthError::OutOfOrder));
}

#[test]
fn rfc7677_with_keys() {
    let (client_key, server_key) = rfc_keys();
    let mut c = rfc_client(ScramCredential::Keys {
        client_key,
        server_key,
    });
    assert_eq!(c.server_first(S1).unwrap(), C2);
    c.server_final(S2).unwrap();
}

#[test]
fn new_client_first_is_libpq_shaped() {
    let c = ScramClient::new(ScramCredential::Password("x".into()));
    let first = String::from_utf8(c.client_first()).unwrap();
    let nonce = first.strip_prefix("n,,n=,r=").unwrap();
    assert_eq!(nonce.len(), 24);
    let other = ScramClient::new(ScramCredential::Password("x".into())).client_first();
    assert_ne!(c.client_first(), other);
}

/// Runs a full exchange; returns the server's result and, if the server accepted, the
/// client's check of server-final.
fn exchange(client: &mut ScramClient, server: &mut ScramServer) -> Result<[u8; 32], AuthError> {
    let first = server.client_first("SCRAM-SHA-256", &client.client_first())?;
    let last = client.server_first(&first)?;
    let (server_final, client_key) = server.client_final(&last)?;
    client.server_final(&server_final)?;
    Ok(client_key)
}

#[test]
fn password_round_trip_and_pass_through() {
    let verifier = ScramVerifier::from_password("s3cret pw", b"0123456789abcdef", ITER);
    let mut c = ScramClient::new(ScramCredential::Password("s3cret pw".into()));
    let mut s = ScramServer::new(verifier.clone(), false);
    let recovered = exchange(&mut c, &mut s).unwrap();
    let salted = salted_password(b"s3cret pw", b"0123456789abcdef", ITER);
    assert_eq!(recovered, client_key(&salted));

    // Pass-through: the recovered ClientKey plus the verifier's ServerKey log in to a
    // server holding the same verifier, which proves who it is in turn.
    let keys = ScramCredential::Keys {
        client_key: recovered,
        server_key: verifier.server_key,
    };
    let mut c = ScramClient::new(keys.clone());
    let mut s = ScramServer::new(verifier.clone(), false);
    assert_eq!(exchange(&mut c, &mut s).unwrap(), recovered);

    // A server with another verifier rejects the keys.
    let other = ScramVerifier::from_password("other", b"0123456789abcdef", ITER);
    let mut c = ScramClient::new(keys);
    assert_eq!(
        exchange(&mut c, &mut ScramServer::new(other, false)),
        Err(AuthError::BadProof)
    );
}

#[test]
fn wrong_password_fails_at_proof() {
    let verifier = ScramVerifier::from_password("right", b"salt", ITER);
    let mut c = ScramClient::new(ScramCredential::Password("wrong".into()));
    let mut s = ScramServer::new(verifier, false);
    assert_eq!(exchange(&mut c, &mut s), Err(AuthError::BadProof));
}

#[test]
fn non_ascii_password_round_trip() {
    let verifier = ScramVerifier::from_password("pässwörd", b"salt", ITER);
    let mut c = ScramClient::new(ScramCredential::Password("pässwörd".into()));
    assert!(exchange(&mut c, &mut ScramServer::new(verifier, false)).is_ok());
}

#[test]
fn fake_verifier_and_doomed_always_fail() {
    let fake = ScramVerifier::fake_for("mallory", b"proxy secret");
    for password in ["", "mallory", "proxy secret", "pencil"] {
        let mut c = ScramClient::new(ScramCredential::Password(password.into()));
        let mut s = ScramServer::new(fake.clone(), true);
        assert_eq!(exchange(&mut c, &mut s), Err(AuthError::BadProof));
    }
    // Even keys that would match the verifier fail when doomed.
    let verifier = ScramVerifier::from_password("pw", b"salt", ITER);
    let mut c = ScramClient::new(ScramCredential::Password("pw".into()));
    let mut s = ScramServer::new(verifier, true);
    assert_eq!(exchange(&mut c, &mut s), Err(AuthError::BadProof));
}

#[test]
fn impostor_server_is_detected() {
    // The server knows StoredKey (so it accepts us) but not the real ServerKey.
    let mut verifier = ScramVerifier::from_password("pw", b"salt", ITER);
    verifier.server_key = [7; 32];
    let mut c = ScramClient::new(ScramCredential::Password("pw".into()));
    let mut s = ScramServer::new(verifier, false);
    assert_eq!(exchange(&mut c, &mut s), Err(AuthError::BadServerSignature));
}

#[test]
fn bad_server_first_messages() {
    use AuthError::*;
    let ours = "rOprNGfwEbeRWgbNEkqO";
    let cases: Vec<(String, AuthError)> = vec![
        (
            format!("r={ours},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            NonceMismatch,
        ),
        (
            "r=rOprNGfwEbeRWgbNEkqX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".into(),
            NonceMismatch,
        ),
        (
            "r=other%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".into(),
            NonceMismatch,
        ),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0"),
            IterationCount(0),
        ),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001"),
            IterationCount(10_000_001),
        ),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4294967296"),
            MalformedMessage("iteration count is too large"),
        ),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1"),
            MalformedMessage("iteration count is not a number"),
        ),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i="),
            MalformedMessage("iteration count is not a number"),
        ),
        (
            format!("r={ours}x,s=***,i=4096"),
            MalformedMessage("salt is not base64"),
        ),
        (format!("r={ours}x,s=,i=4096"), MalformedMessage("empty salt")),
        (
            format!("r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ=="),
            MalformedMessage("expected i= iteration count"),
        ),
        (format!("r={ours}x"), MalformedMessage("expected s= salt")),
        (
            format!("m=ext,r={ours}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            UnsupportedExtension,
        ),
        (
            "".into(),
            MalformedMessage("expected an attribute of the form x=value"),
        ),
        ("e=other-error".into(), MalformedMessage("expected r= nonce")),
    ];
    for (data, want) in cases {
        let mut c = rfc_client(ScramCredential::Password("pencil".into()));
        assert_eq!(c.server_first(data.as_bytes()), Err(want), "{data}");
        assert_eq!(c.server_first(S1), Err(OutOfOrder), "failed means finished");
    }
    // Non-UTF-8 and truncations: errors, never panics.
    let mut c = rfc_client(ScramCredential::Password("pencil".into()));
    assert!(c.server_first(b"r=rOprNGfwEbeRWgbNEkqO\xff,s=AA==,i=1").is_err());
    for len in 0..S1.len() {
        let mut c = rfc_client(ScramCredential::Password("pencil".into()));
        let r = c.server_first(&S1[..len]);
        // A prefix cut inside the iteration count ("i=4", "i=40", ...) is still valid.
        assert_eq!(r.is_ok(), len > S1.len() - 4, "truncated to {len}");
    }
}

#[test]
fn bad_server_final_messages() {
    use AuthError::*;
    let (client_key, server_key) = rfc_keys();
    let keys = ScramCredential::Keys {
        client_key,
        server_key,
    };
    let cases: &[(&[u8], AuthError)] = &[
        (b"e=invalid-proof", ServerError("invalid-proof".into())),
        (b"e=", ServerError(String::new())),
        (
            b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            BadServerSignature,
        ),
        (b"v=AAAA", MalformedMessage("server signature is not 32 bytes")),
        (b"v=!!", MalformedMessage("server signature is not base64")),
        (b"", MalformedMessage("expected an attribute of the form x=value")),
        (b"x=1", MalformedMessage("expected v= server signature")),
        (
            b"\xff\xfe",
            MalformedMessage("expected an attribute of the form x=value"),
        ),
    ];
    for (data, want) in cases {
        let mut c = rfc_client(keys.clone());
        c.server_first(S1).unwrap();
        assert_eq!(c.server_final(data).as_ref(), Err(want));
    }
    // Out of order: server-final before server-first.
    assert_eq!(rfc_client(keys.clone()).server_final(S2), Err(OutOfOrder));
    // Extensions after v= are allowed (RFC 5802).
    let mut c = rfc_client(keys);
    c.server_first(S1).unwrap();
    c.server_final(&[S2, b",x=ext"].concat()).unwrap();
}
