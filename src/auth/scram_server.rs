//! The SCRAM-SHA-256 server side, checking a client the way PostgreSQL's backend does.
//!
//! Owns: the exchange state (client-first → server-first → client-final → server-final),
//! nonce/channel-binding checks and proof verification.
//! Must not touch: the wire framing (the caller wraps our bytes in AuthenticationSASL*
//! messages), user lookup (the caller passes the verifier, or a fake one), or I/O.
//!
//! Any error leaves the exchange finished: a failed exchange cannot be resumed, which is
//! also what PostgreSQL does (it ends the connection).

use super::scram::{
    auth_message, build_server_final, build_server_first, ct_eq, generate_nonce, hmac_sha256,
    parse_client_final, parse_client_first, stored_key, xor32, Gs2Flag, SCRAM_SHA_256,
};
use super::secret::ScramVerifier;
use super::AuthError;

/// Where the exchange stands.
enum State {
    /// Waiting for SASLInitialResponse.
    Initial,
    /// server-first sent; waiting for client-final. Keeps what the AuthMessage needs.
    SentServerFirst {
        /// GS2 flag the client sent, which `c=` must echo.
        gs2: Gs2Flag,
        /// client-first-message-bare, part of the AuthMessage.
        client_first_bare: Vec<u8>,
        /// The server-first-message we sent, part of the AuthMessage.
        server_first: Vec<u8>,
        /// Client nonce + server nonce, which client-final must repeat.
        nonce: String,
    },
    /// Succeeded or failed; no further step is valid.
    Finished,
}

/// One SCRAM-SHA-256 exchange with a connecting client.
pub struct ScramServer {
    /// The user's verifier (or a fake one).
    verifier: ScramVerifier,
    /// Fail at the proof whatever the client sends (unknown user).
    doomed: bool,
    /// Our half of the nonce, chosen at construction.
    server_nonce: String,
    /// Exchange progress.
    state: State,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The verifier is password-equivalent for pass-through; never print it.
        f.debug_struct("ScramServer")
            .field("doomed", &self.doomed)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Starts an exchange. `verifier` is the user's verifier, or
    /// [`ScramVerifier::fake_for`] for an unknown user with `doomed = true` (then the
    /// exchange always fails at the proof, even if a client somehow matched), so that an
    /// unknown user is indistinguishable from a wrong password.
    pub fn new(verifier: ScramVerifier, doomed: bool) -> Self {
        Self::with_nonce(verifier, doomed, generate_nonce())
    }

    /// [`ScramServer::new`] with a chosen server nonce, so tests can replay RFC vectors.
    /// The nonce must be printable ASCII without ','.
    pub(crate) fn with_nonce(verifier: ScramVerifier, doomed: bool, server_nonce: String) -> Self {
        ScramServer {
            verifier,
            doomed,
            server_nonce,
            state: State::Initial,
        }
    }

    /// Mechanism list for AuthenticationSASL: `b"SCRAM-SHA-256\0\0"` (one name, then the
    /// empty name ending the list). No `-PLUS`: we offer no channel binding yet.
    pub fn mechanisms() -> &'static [u8] {
        b"SCRAM-SHA-256\0\0"
    }

    /// Handles SASLInitialResponse: the chosen `mechanism` and the client-first bytes.
    /// Returns the server-first bytes to send in AuthenticationSASLContinue. The server
    /// nonce (18 random bytes, base64) is appended to the client's nonce.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        // Take the state out so that every early return leaves the exchange finished.
        let State::Initial = std::mem::replace(&mut self.state, State::Finished) else {
            return Err(AuthError::OutOfOrder);
        };
        if mechanism != SCRAM_SHA_256 {
            return Err(AuthError::UnsupportedMechanism);
        }
        let first = parse_client_first(data)?;
        let nonce = format!("{}{}", first.nonce, self.server_nonce);
        let server_first =
            build_server_first(&nonce, &self.verifier.salt, self.verifier.iterations).into_bytes();
        self.state = State::SentServerFirst {
            gs2: first.gs2,
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// Handles SASLResponse: the client-final bytes. On success returns the server-final
    /// bytes (for AuthenticationSASLFinal) and the ClientKey recovered from the proof, which
    /// lets the proxy log in to PostgreSQL as this client (SCRAM pass-through).
    ///
    /// Checks, in PostgreSQL's order: the channel-binding echo, the nonce, then the proof
    /// (ClientKey = proof XOR HMAC(StoredKey, AuthMessage); SHA-256(ClientKey) must equal
    /// StoredKey, compared in constant time).
    pub fn client_final(&mut self, data: &[u8]) -> Result<(Vec<u8>, [u8; 32]), AuthError> {
        let State::SentServerFirst {
            gs2,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Err(AuthError::OutOfOrder);
        };
        let last = parse_client_final(data)?;
        // Without channel binding, c= must be the base64 of the very GS2 header the client
        // sent ("biws" for n,, or "eSws" for y,,), as PostgreSQL requires.
        if last.channel_binding != gs2.header() {
            return Err(AuthError::ChannelBindingMismatch);
        }
        if last.nonce != nonce {
            return Err(AuthError::NonceMismatch);
        }
        let auth_message = auth_message(&client_first_bare, &server_first, last.without_proof);
        let client_signature = hmac_sha256(&self.verifier.stored_key, &auth_message);
        let client_key = xor32(&last.proof, &client_signature);
        let proof_ok = ct_eq(&stored_key(&client_key), &self.verifier.stored_key);
        // `doomed` is checked after the full computation so unknown users take as long.
        if self.doomed || !proof_ok {
            return Err(AuthError::BadProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, &auth_message);
        Ok((build_server_final(&server_signature).into_bytes(), client_key))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::auth::scram::b64_decode;

    // RFC 7677 section 3.
    const SALT_B64: &[u8] = b"W22ZaJ0SNY7soEsUEjb6gQ==";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const C1: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const S1: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const C2: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const S2: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_server(doomed: bool) -> ScramServer {
        // PBKDF2 once: the garbage test builds thousands of servers.
        static VERIFIER: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
        let v = VERIFIER.get_or_init(|| {
            let salt = b64_decode(SALT_B64, "salt").unwrap();
            ScramVerifier::from_password("pencil", &salt, 4096)
        });
        ScramServer::with_nonce(v.clone(), doomed, SERVER_NONCE.into())
    }

    /// A server that has already answered the RFC's client-first.
    fn after_first() -> ScramServer {
        let mut s = rfc_server(false);
        assert_eq!(s.client_first("SCRAM-SHA-256", C1).unwrap(), S1);
        s
    }

    #[test]
    fn rfc7677_exchange() {
        let mut s = rfc_server(false);
        assert_eq!(s.client_first("SCRAM-SHA-256", C1).unwrap(), S1);
        let (server_final, client_key) = s.client_final(C2).unwrap();
        assert_eq!(server_final, S2);
        let salt = b64_decode(SALT_B64, "salt").unwrap();
        let salted = crate::auth::scram::salted_password(b"pencil", &salt, 4096);
        assert_eq!(client_key, crate::auth::scram::client_key(&salted));
        // Finished: no more steps.
        assert_eq!(s.client_final(C2), Err(AuthError::OutOfOrder));
        assert_eq!(s.client_first("SCRAM-SHA-256", C1), Err(AuthError::OutOfOrder));
    }

    #[test]
    fn doomed_fails_even_with_correct_proof() {
        let mut s = rfc_server(true);
        assert_eq!(s.client_first("SCRAM-SHA-256", C1).unwrap(), S1);
        assert_eq!(s.client_final(C2), Err(AuthError::BadProof));
    }

    #[test]
    fn mechanisms_and_order() {
        assert_eq!(ScramServer::mechanisms(), b"SCRAM-SHA-256\0\0");
        assert_eq!(rfc_server(false).client_final(C2), Err(AuthError::OutOfOrder));
        for mech in ["SCRAM-SHA-256-PLUS", "scram-sha-256", "", "PLAIN"] {
            let mut s = rfc_server(false);
            assert_eq!(s.client_first(mech, C1), Err(AuthError::UnsupportedMechanism));
            // A failed step finishes the exchange.
            assert_eq!(s.client_first("SCRAM-SHA-256", C1), Err(AuthError::OutOfOrder));
        }
    }

    #[test]
    fn bad_client_first_messages() {
        use AuthError::*;
        let cases: &[(&[u8], AuthError)] = &[
            (b"p=tls-server-end-point,,n=,r=abc", ChannelBindingUnsupported),
            (b"n,a=admin,n=,r=abc", AuthzidUnsupported),
            (b"n,,m=ext,n=,r=abc", UnsupportedExtension),
            (b"n,,n=,m=ext", UnsupportedExtension),
            (b"", MalformedMessage("invalid GS2 channel-binding flag")),
            (
                b"x,,n=,r=abc",
                MalformedMessage("invalid GS2 channel-binding flag"),
            ),
            (b"n", MalformedMessage("invalid GS2 channel-binding flag")),
            (b"n,", MalformedMessage("invalid GS2 header")),
            (
                b"n,,",
                MalformedMessage("expected an attribute of the form x=value"),
            ),
            (b"n,,n=", MalformedMessage("expected r= nonce")),
            (b"n,,r=abc", MalformedMessage("expected n= user name")),
            (
                b"n,,n=,r=",
                MalformedMessage("nonce is empty or not printable ASCII"),
            ),
            (
                b"n,,n=,r=a b",
                MalformedMessage("nonce is empty or not printable ASCII"),
            ),
            (
                b"n,,n=,r=\xff\xfe",
                MalformedMessage("nonce is empty or not printable ASCII"),
            ),
            (
                b"n,,n=,r=abc,",
                MalformedMessage("expected an attribute of the form x=value"),
            ),
            (
                b"n,,n=,r=abc,1=x",
                MalformedMessage("expected an attribute of the form x=value"),
            ),
        ];
        for (data, want) in cases {
            let mut s = rfc_server(false);
            let got = s.client_first("SCRAM-SHA-256", data);
            assert_eq!(got.as_ref(), Err(want), "{}", String::from_utf8_lossy(data));
        }
        // Accepted: y flag, a non-UTF-8 user name (ignored, as PostgreSQL does), extensions.
        for ok in [&b"y,,n=,r=abc"[..], b"n,,n=\xff,r=abc", b"n,,n=u,r=abc,x=ext"] {
            assert!(rfc_server(false).client_first("SCRAM-SHA-256", ok).is_ok());
        }
    }

    #[test]
    fn bad_client_final_messages() {
        use AuthError::*;
        let nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let cases: Vec<(String, AuthError)> = vec![
            (format!("c=eSws,r={nonce},{proof}"), ChannelBindingMismatch),
            (format!("c=,r={nonce},{proof}"), ChannelBindingMismatch),
            (
                format!("c=b!ws,r={nonce},{proof}"),
                MalformedMessage("channel binding is not base64"),
            ),
            (format!("c=biws,r={nonce}x,{proof}"), NonceMismatch),
            (format!("c=biws,r=rOprNGfwEbeRWgbNEkqO,{proof}"), NonceMismatch),
            (format!("c=biws,r={nonce}"), MalformedMessage("expected p= proof")),
            (
                format!("r={nonce},c=biws,{proof}"),
                MalformedMessage("expected c= channel binding"),
            ),
            (format!("c=biws,{proof}"), MalformedMessage("expected r= nonce")),
            (
                format!("c=biws,r={nonce},{proof},x=y"),
                MalformedMessage("garbage after the proof"),
            ),
            (
                format!("c=biws,r={nonce},p=AAAA"),
                MalformedMessage("proof is not 32 bytes"),
            ),
            (
                format!("c=biws,r={nonce},p=@@@@"),
                MalformedMessage("proof is not base64"),
            ),
            (
                format!("c=biws,r={nonce},p="),
                MalformedMessage("proof is not 32 bytes"),
            ),
            // A wrong proof that is well formed.
            (format!("c=biws,r={nonce},p={}", "A".repeat(43) + "="), BadProof),
        ];
        for (data, want) in cases {
            let mut s = after_first();
            assert_eq!(s.client_final(data.as_bytes()), Err(want.clone()), "{data}");
            // Failed means finished.
            assert_eq!(s.client_final(C2), Err(AuthError::OutOfOrder));
        }
        // An ignored extension before the proof changes the AuthMessage, so the RFC proof no
        // longer matches, but it is syntactically accepted.
        // (m= is only special in the first attribute position, as in PostgreSQL.)
        for ext in ["x=ext", "m=ext"] {
            let data = format!("c=biws,r={nonce},{ext},{proof}");
            assert_eq!(after_first().client_final(data.as_bytes()), Err(BadProof));
        }
    }

    /// Every truncation and a batch of garbage inputs must give an error, never a panic.
    #[test]
    fn truncated_and_garbage_inputs_never_panic() {
        for len in 0..C2.len() {
            let r = after_first().client_final(&C2[..len]);
            assert!(r.is_err(), "truncated to {len} accepted");
        }
        for len in 0..=C1.len() {
            // Some prefixes are valid (a shorter nonce); none may panic.
            let _ = rfc_server(false).client_first("SCRAM-SHA-256", &C1[..len]);
        }
        // Deterministic pseudo-random bytes (xorshift), biased toward SCRAM syntax bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"nyp,=rcsivem\xff\x00AZ+/";
        for _ in 0..2000 {
            let mut buf = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for i in 0..(x % 40) {
                let k = usize::try_from((x >> (i % 48)) % 17).unwrap();
                buf.push(alphabet[k]);
            }
            let _ = rfc_server(false).client_first("SCRAM-SHA-256", &buf);
            assert!(after_first().client_final(&buf).is_err());
        }
    }
}
