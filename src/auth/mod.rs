//! Authentication primitives: secrets, SCRAM-SHA-256 (server and client side) and MD5.
//!
//! Owns: parsing configured secrets, the SCRAM wire messages and state machines, the MD5
//! password scheme, and the [`AuthError`] type they share.
//! Must not touch: sockets, tokio, the protocol framing (`proto`), configuration files or
//! logging. Everything here is pure and synchronous so it can be tested byte for byte; the
//! caller moves the bytes between these state machines and the wire.
//!
//! Error messages never contain secret material (passwords, keys, proofs), so they are safe
//! to log. They may contain short, escaped fragments chosen by the peer (e.g. a server's `e=`).

pub mod md5;
pub mod scram;
pub mod scram_client;
pub mod scram_server;
pub mod secret;

pub use scram_client::{ScramClient, ScramCredential};
pub use scram_server::ScramServer;
pub use secret::{ScramVerifier, Secret};

/// Why an authentication step or a secret was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A SCRAM message did not follow RFC 5802 syntax; the text says which part.
    #[error("malformed SCRAM message: {0}")]
    MalformedMessage(&'static str),
    /// The client asked for a SASL mechanism we do not offer (we offer only SCRAM-SHA-256).
    #[error("client selected an unsupported SASL authentication mechanism")]
    UnsupportedMechanism,
    /// The client selected channel binding (`p=`), i.e. SCRAM-SHA-256-PLUS, which we do not offer.
    #[error("client requires SCRAM channel binding, which is not supported")]
    ChannelBindingUnsupported,
    /// The `c=` attribute of client-final does not echo the GS2 header of client-first.
    #[error("SCRAM channel-binding data does not match the client-first-message")]
    ChannelBindingMismatch,
    /// The client sent an authorization identity (`a=`), which PostgreSQL does not support.
    #[error("client uses an authorization identity, which is not supported")]
    AuthzidUnsupported,
    /// A mandatory extension (`m=`) was requested.
    #[error("SCRAM peer requires an unsupported extension")]
    UnsupportedExtension,
    /// The nonce in a message does not continue the exchange's nonce.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The server's iteration count is zero or above what we are willing to compute.
    #[error("SCRAM iteration count {0} is out of range")]
    IterationCount(u32),
    /// The client proof did not verify (wrong password, or unknown user).
    #[error("password authentication failed")]
    BadProof,
    /// The server's signature (`v=`) did not verify: the server does not know the secret.
    #[error("SCRAM server signature is invalid")]
    BadServerSignature,
    /// The server ended the exchange with `e=`.
    #[error("server rejected SCRAM authentication: {0:?}")]
    ServerError(String),
    /// A method was called in the wrong state (e.g. `client_final` before `client_first`).
    #[error("SCRAM exchange step called out of order")]
    OutOfOrder,
    /// A configured secret looked like a SCRAM verifier but could not be parsed.
    #[error("invalid secret: {0}")]
    BadSecretFormat(&'static str),
}
