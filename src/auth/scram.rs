//! SCRAM-SHA-256 building blocks (RFC 5802 / RFC 7677), as PostgreSQL uses them.
//!
//! Owns: the key-derivation wrappers (over the `hmac`, `sha2` and `pbkdf2` crates — never
//! hand-rolled crypto), constant-time comparison, nonce generation, and parsing/building of
//! the four SCRAM messages.
//! Must not touch: exchange state (that is `scram_server` / `scram_client`), I/O, logging.
//!
//! Every parser here runs on untrusted bytes: it returns [`AuthError`] and never panics
//! (no unwrap, no slice indexing, only slice patterns and `get`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::AuthError;

/// The only SASL mechanism we offer.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Random bytes in a nonce before base64, as PostgreSQL's `SCRAM_RAW_NONCE_LEN`.
pub const NONCE_RAW_LEN: usize = 18;

/// HMAC-SHA-256 of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length (long keys are hashed), so this cannot fail; the
    // `let else` only exists because the generic `KeyInit` API is fallible.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of any length")
    };
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SaltedPassword := PBKDF2-HMAC-SHA-256(password, salt, iterations). `password` must
/// already have gone through [`saslprep`].
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

/// ClientKey := HMAC(SaltedPassword, "Client Key").
pub fn client_key(salted_password: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(salted_password, b"Client Key")
}

/// ServerKey := HMAC(SaltedPassword, "Server Key").
pub fn server_key(salted_password: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(salted_password, b"Server Key")
}

/// StoredKey := SHA-256(ClientKey).
pub fn stored_key(client_key: &[u8; 32]) -> [u8; 32] {
    sha256(client_key)
}

/// Byte-wise XOR, used both to build (ClientKey ^ ClientSignature) and to undo a proof.
pub fn xor32(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = *a;
    for (o, b) in out.iter_mut().zip(b) {
        *o ^= b;
    }
    out
}

/// Constant-time equality (lengths are not secret: unequal lengths return `false` at once).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// SASLprep (RFC 4013) of a password, as PostgreSQL's `pg_saslprep` would feed it to PBKDF2.
///
/// ASCII passwords are returned unchanged, exactly as PostgreSQL does (it skips SASLprep
/// for pure ASCII). For non-ASCII passwords we use the raw UTF-8 bytes, which is also what
/// PostgreSQL does whenever SASLprep fails (prohibited or unassigned characters, bad bidi).
/// This differs from PostgreSQL only for non-ASCII passwords that SASLprep would *change*
/// (not in NFKC form, non-ASCII spaces, soft hyphens and other mapped-to-nothing code
/// points); such a password works proxy-side but a verifier made by PostgreSQL for it will
/// not match. Full SASLprep needs Unicode tables we do not carry.
pub fn saslprep(password: &str) -> &[u8] {
    password.as_bytes()
}

/// A fresh random nonce: [`NONCE_RAW_LEN`] bytes from the thread-local CSPRNG, base64
/// (so printable and free of ',').
pub fn generate_nonce() -> String {
    let mut raw = [0u8; NONCE_RAW_LEN];
    rand::fill(&mut raw[..]);
    B64.encode(raw)
}

/// Standard padded base64, as PostgreSQL writes it.
pub fn b64_encode(data: &[u8]) -> String {
    B64.encode(data)
}

/// Strict standard base64 decoding.
pub fn b64_decode(data: &[u8], what: &'static str) -> Result<Vec<u8>, AuthError> {
    B64.decode(data).map_err(|_| AuthError::MalformedMessage(what))
}

/// The GS2 channel-binding flag of a client-first-message (`p=` is rejected when parsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gs2Flag {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but thinks the server does not.
    SupportedNotUsed,
}

impl Gs2Flag {
    /// The full GS2 header; we reject authzid, so it is always one of these two.
    pub fn header(self) -> &'static [u8] {
        match self {
            Gs2Flag::NotSupported => b"n,,",
            Gs2Flag::SupportedNotUsed => b"y,,",
        }
    }
}

/// A parsed client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    /// Channel-binding flag of the GS2 header.
    pub gs2: Gs2Flag,
    /// client-first-message-bare (after the GS2 header), which enters the AuthMessage.
    pub bare: &'a [u8],
    /// The client nonce (`r=`).
    pub nonce: &'a str,
}

/// A parsed server-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    /// Client nonce + server nonce.
    pub nonce: &'a str,
    /// Decoded salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count (> 0; the client applies its own upper bound).
    pub iterations: u32,
}

/// A parsed client-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// Decoded `c=` channel-binding data (must equal the GS2 header).
    pub channel_binding: Vec<u8>,
    /// The combined nonce (`r=`).
    pub nonce: &'a str,
    /// The client proof (`p=`).
    pub proof: [u8; 32],
    /// client-final-message-without-proof, which enters the AuthMessage.
    pub without_proof: &'a [u8],
}

/// A parsed server-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFinal {
    /// `v=`: the server signature.
    Verifier([u8; 32]),
    /// `e=`: the server's error text.
    Error(String),
}

/// Splits `a=x,b=y` into `(b'a', b"x"), (b'b', b"y")`; each attribute name must be a letter.
fn split_attrs(data: &[u8]) -> Result<Vec<(u8, &[u8])>, AuthError> {
    data.split(|&b| b == b',')
        .map(|part| match part {
            [name, b'=', value @ ..] if name.is_ascii_alphabetic() => Ok((*name, value)),
            _ => Err(AuthError::MalformedMessage(
                "expected an attribute of the form x=value",
            )),
        })
        .collect()
}

/// RFC 5802: `printable = %x21-2B / %x2D-7E` (printable ASCII except ','), at least one.
fn parse_nonce(value: &[u8]) -> Result<&str, AuthError> {
    let printable = |b: &u8| (0x21..=0x7e).contains(b) && *b != b',';
    if value.is_empty() || !value.iter().all(printable) {
        return Err(AuthError::MalformedMessage(
            "nonce is empty or not printable ASCII",
        ));
    }
    std::str::from_utf8(value).map_err(|_| AuthError::MalformedMessage("nonce is not ASCII"))
}

/// Takes the attribute at `idx`, requiring name `want`; `missing` says what was expected.
fn attr<'a>(
    attrs: &[(u8, &'a [u8])],
    idx: usize,
    want: u8,
    missing: &'static str,
) -> Result<&'a [u8], AuthError> {
    match attrs.get(idx) {
        Some(&(name, value)) if name == want => Ok(value),
        Some(&(b'm', _)) => Err(AuthError::UnsupportedExtension),
        _ => Err(AuthError::MalformedMessage(missing)),
    }
}

/// Parses a client-first-message as PostgreSQL's backend does: GS2 flag `n` or `y` (`p`
/// is [`AuthError::ChannelBindingUnsupported`]), no authzid, `n=` (ignored: PostgreSQL uses
/// the startup packet's user), `r=`, then optional extensions which are ignored.
pub fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, AuthError> {
    let (gs2, rest) = match data {
        [b'n', b',', rest @ ..] => (Gs2Flag::NotSupported, rest),
        [b'y', b',', rest @ ..] => (Gs2Flag::SupportedNotUsed, rest),
        [b'p', ..] => return Err(AuthError::ChannelBindingUnsupported),
        _ => return Err(AuthError::MalformedMessage("invalid GS2 channel-binding flag")),
    };
    let bare = match rest {
        [b',', bare @ ..] => bare,
        [b'a', b'=', ..] => return Err(AuthError::AuthzidUnsupported),
        _ => return Err(AuthError::MalformedMessage("invalid GS2 header")),
    };
    let attrs = split_attrs(bare)?;
    // The user name may be in any encoding the client likes; it is never used, so it is
    // not validated beyond the attribute syntax.
    attr(&attrs, 0, b'n', "expected n= user name")?;
    let nonce = parse_nonce(attr(&attrs, 1, b'r', "expected r= nonce")?)?;
    Ok(ClientFirst { gs2, bare, nonce })
}

/// Builds client-first-message-bare `n=<user>,r=<nonce>` (user name escaped per RFC 5802).
pub fn build_client_first_bare(user: &str, nonce: &str) -> String {
    let user = user.replace('=', "=3D").replace(',', "=2C");
    format!("n={user},r={nonce}")
}

/// Parses a server-first-message `r=<nonce>,s=<salt>,i=<iterations>[,extensions]`.
pub fn parse_server_first(data: &[u8]) -> Result<ServerFirst<'_>, AuthError> {
    let attrs = split_attrs(data)?;
    let nonce = parse_nonce(attr(&attrs, 0, b'r', "expected r= nonce")?)?;
    let salt = b64_decode(attr(&attrs, 1, b's', "expected s= salt")?, "salt is not base64")?;
    if salt.is_empty() {
        return Err(AuthError::MalformedMessage("empty salt"));
    }
    let iterations = parse_iterations(attr(&attrs, 2, b'i', "expected i= iteration count")?)?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// A positive decimal u32 with no sign or spaces (`str::parse` would accept a leading '+').
pub(crate) fn parse_iterations(value: &[u8]) -> Result<u32, AuthError> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(AuthError::MalformedMessage("iteration count is not a number"));
    }
    let n = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(AuthError::MalformedMessage("iteration count is too large"))?;
    if n == 0 {
        return Err(AuthError::IterationCount(0));
    }
    Ok(n)
}

/// Builds a server-first-message.
pub fn build_server_first(nonce: &str, salt: &[u8], iterations: u32) -> String {
    format!("r={nonce},s={},i={iterations}", b64_encode(salt))
}

/// Parses a client-final-message `c=<cb>,r=<nonce>[,extensions],p=<proof>` as PostgreSQL
/// does: the proof must be the last attribute and decode to 32 bytes.
pub fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, AuthError> {
    let attrs = split_attrs(data)?;
    let cb = attr(&attrs, 0, b'c', "expected c= channel binding")?;
    let channel_binding = b64_decode(cb, "channel binding is not base64")?;
    let nonce = parse_nonce(attr(&attrs, 1, b'r', "expected r= nonce")?)?;
    // PostgreSQL skips extensions up to the first p= and then requires the end of input.
    let first_p = attrs.iter().position(|&(name, _)| name == b'p');
    let last_idx = attrs.len().checked_sub(1);
    let proof = match (first_p, attrs.last()) {
        (Some(i), Some(&(_, proof))) if i >= 2 && Some(i) == last_idx => proof,
        (Some(_), _) => return Err(AuthError::MalformedMessage("garbage after the proof")),
        (None, _) => return Err(AuthError::MalformedMessage("expected p= proof")),
    };
    let proof = b64_decode(proof, "proof is not base64")?;
    let proof = <[u8; 32]>::try_from(proof.as_slice())
        .map_err(|_| AuthError::MalformedMessage("proof is not 32 bytes"))?;
    // The proof is the last attribute, so everything before the last ',' is the rest.
    let without_proof = data
        .iter()
        .rposition(|&b| b == b',')
        .and_then(|comma| data.get(..comma))
        .ok_or(AuthError::MalformedMessage("expected p= proof"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        proof,
        without_proof,
    })
}

/// Builds client-final-message-without-proof `c=<base64 gs2 header>,r=<nonce>`.
pub fn build_client_final_without_proof(gs2: Gs2Flag, nonce: &str) -> String {
    format!("c={},r={nonce}", b64_encode(gs2.header()))
}

/// Appends `,p=<proof>` to client-final-message-without-proof.
pub fn build_client_final(without_proof: &str, proof: &[u8; 32]) -> String {
    format!("{without_proof},p={}", b64_encode(proof))
}

/// Parses a server-final-message: `e=<text>` or `v=<signature>[,extensions]`.
pub fn parse_server_final(data: &[u8]) -> Result<ServerFinal, AuthError> {
    if let [b'e', b'=', text @ ..] = data {
        // Keep the whole rest: the error text is only reported, never interpreted.
        return Ok(ServerFinal::Error(String::from_utf8_lossy(text).into_owned()));
    }
    let attrs = split_attrs(data)?;
    let sig = attr(&attrs, 0, b'v', "expected v= server signature")?;
    let sig = b64_decode(sig, "server signature is not base64")?;
    <[u8; 32]>::try_from(sig.as_slice())
        .map(ServerFinal::Verifier)
        .map_err(|_| AuthError::MalformedMessage("server signature is not 32 bytes"))
}

/// Builds a server-final-message carrying the server signature.
pub fn build_server_final(signature: &[u8; 32]) -> String {
    format!("v={}", b64_encode(signature))
}

/// AuthMessage := client-first-message-bare + "," + server-first-message + "," +
/// client-final-message-without-proof.
pub fn auth_message(client_first_bare: &[u8], server_first: &[u8], without_proof: &[u8]) -> Vec<u8> {
    [client_first_bare, server_first, without_proof].join(&b","[..])
}

#[cfg(test)]
mod tests;
