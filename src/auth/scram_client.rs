//! The SCRAM-SHA-256 client the proxy uses to log in to PostgreSQL.
//!
//! Owns: the client side of the exchange (client-first → server-first → client-final →
//! server-final), with either a password or pass-through keys, and the check of the
//! server's signature.
//! Must not touch: the wire framing (the caller sends SASLInitialResponse with mechanism
//! `SCRAM-SHA-256` and our bytes), the choice of credential, or I/O.

use super::scram::{
    auth_message, build_client_final, build_client_final_without_proof, build_client_first_bare, client_key,
    ct_eq, generate_nonce, hmac_sha256, parse_server_final, parse_server_first, salted_password, saslprep,
    server_key, stored_key, xor32, Gs2Flag, ServerFinal,
};
use super::AuthError;

/// Upper bound on the server's iteration count when we must run PBKDF2 ourselves: a
/// hostile or misconfigured server could otherwise make each login burn minutes of CPU.
/// PostgreSQL's default is 4096; 10 million takes a few seconds.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// What the proxy proves to PostgreSQL.
#[derive(Clone, PartialEq, Eq)]
pub enum ScramCredential {
    /// A plaintext password: keys are derived from the server's salt and iteration count.
    Password(String),
    /// SCRAM pass-through: the ClientKey recovered from the client's proof plus the
    /// verifier's ServerKey (to check the server's signature). Works when the backend
    /// holds the same verifier (same salt and iterations) as the proxy.
    Keys {
        /// ClientKey, as returned by [`super::ScramServer::client_final`].
        client_key: [u8; 32],
        /// ServerKey from the user's verifier.
        server_key: [u8; 32],
    },
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScramCredential::Password(_) => f.write_str("ScramCredential::Password(<redacted>)"),
            ScramCredential::Keys { .. } => f.write_str("ScramCredential::Keys(<redacted>)"),
        }
    }
}

/// Where the exchange stands.
enum State {
    /// client-first is available; waiting for server-first.
    Initial,
    /// client-final sent; waiting for server-final, whose signature must equal this.
    SentClientFinal {
        /// HMAC(ServerKey, AuthMessage).
        server_signature: [u8; 32],
    },
    /// Succeeded or failed; no further step is valid.
    Finished,
}

/// One SCRAM-SHA-256 login to a PostgreSQL server.
pub struct ScramClient {
    /// Password or pass-through keys.
    credential: ScramCredential,
    /// client-first-message-bare we send, part of the AuthMessage.
    client_first_bare: String,
    /// Our nonce, which the server's must extend.
    nonce: String,
    /// Exchange progress.
    state: State,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient")
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange with a fresh random client nonce (18 bytes, base64, as libpq).
    pub fn new(credential: ScramCredential) -> Self {
        // The user name is sent empty, as libpq does: PostgreSQL takes it from the
        // startup packet and ignores this one.
        Self::with_parts(credential, "", generate_nonce())
    }

    /// [`ScramClient::new`] with a chosen user name and nonce, so tests can replay RFC
    /// vectors. The nonce must be printable ASCII without ','.
    pub(crate) fn with_parts(credential: ScramCredential, user: &str, nonce: String) -> Self {
        ScramClient {
            credential,
            client_first_bare: build_client_first_bare(user, &nonce),
            nonce,
            state: State::Initial,
        }
    }

    /// The client-first-message for SASLInitialResponse: `n,,n=,r=<nonce>` (no channel
    /// binding; the mechanism to name is `SCRAM-SHA-256`).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Handles the server-first bytes (from AuthenticationSASLContinue) and returns the
    /// client-final bytes (for SASLResponse). The server nonce must strictly extend ours.
    /// With a password, runs PBKDF2 with the server's salt and iteration count (error
    /// above [`MAX_ITERATIONS`]).
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let State::Initial = std::mem::replace(&mut self.state, State::Finished) else {
            return Err(AuthError::OutOfOrder);
        };
        let first = parse_server_first(data)?;
        // The server must keep our nonce (replay protection) and add its own part.
        if !first.nonce.starts_with(&self.nonce) || first.nonce.len() <= self.nonce.len() {
            return Err(AuthError::NonceMismatch);
        }
        let (client_key, server_key) = match &self.credential {
            ScramCredential::Password(password) => {
                if first.iterations > MAX_ITERATIONS {
                    return Err(AuthError::IterationCount(first.iterations));
                }
                let salted = salted_password(saslprep(password), &first.salt, first.iterations);
                (client_key(&salted), server_key(&salted))
            }
            ScramCredential::Keys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
        };
        let without_proof = build_client_final_without_proof(Gs2Flag::NotSupported, first.nonce);
        let auth_message = auth_message(self.client_first_bare.as_bytes(), data, without_proof.as_bytes());
        let client_signature = hmac_sha256(&stored_key(&client_key), &auth_message);
        let proof = xor32(&client_key, &client_signature);
        self.state = State::SentClientFinal {
            server_signature: hmac_sha256(&server_key, &auth_message),
        };
        Ok(build_client_final(&without_proof, &proof).into_bytes())
    }

    /// Handles the server-final bytes (from AuthenticationSASLFinal): `v=` must carry the
    /// expected server signature (compared in constant time); `e=` is an error.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), AuthError> {
        let State::SentClientFinal { server_signature } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return Err(AuthError::OutOfOrder);
        };
        match parse_server_final(data)? {
            ServerFinal::Error(text) => Err(AuthError::ServerError(text)),
            ServerFinal::Verifier(sig) if ct_eq(&sig, &server_signature) => Ok(()),
            ServerFinal::Verifier(_) => Err(AuthError::BadServerSignature),
        }
    }
}

#[cfg(test)]
mod tests;
