//! Configured user secrets: plaintext, PostgreSQL MD5 hashes and SCRAM-SHA-256 verifiers.
//!
//! Owns: recognising which kind a configured password string is, the pg_authid verifier
//! format (parse and print), deriving verifiers from passwords, and the fake verifiers
//! used for unknown users.
//! Must not touch: the authentication exchanges themselves (`scram_server`, `md5`), config
//! file handling, or logging. `Debug` is hand-written so a secret can never be printed.

use std::fmt;
use std::str::FromStr;

use super::scram::{
    b64_decode, b64_encode, client_key, hmac_sha256, parse_iterations, salted_password, saslprep, server_key,
    stored_key,
};
use super::AuthError;

/// Prefix of a SCRAM-SHA-256 verifier in pg_authid.
const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// Iteration count PostgreSQL uses by default (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Salt length PostgreSQL uses (`SCRAM_DEFAULT_SALT_LEN`).
pub const SALT_LEN: usize = 16;

/// A user's configured secret, in one of the forms PostgreSQL stores in pg_authid.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A plaintext password.
    Plain(String),
    /// An MD5 hash: `"md5"` followed by 32 lowercase hex digits, md5(password + user).
    Md5(String),
    /// A SCRAM-SHA-256 verifier.
    Scram(ScramVerifier),
}

impl Secret {
    /// Classifies a configured password string.
    ///
    /// `md5` + exactly 32 hex digits is [`Secret::Md5`] (upper-case digits are accepted and
    /// lower-cased; PostgreSQL would take them as a plaintext password, which is surely not
    /// what a config author meant). A string starting `SCRAM-SHA-256$` must be a valid
    /// verifier, else this is an error rather than a silent plaintext password (PostgreSQL
    /// falls back to plaintext; for a config file, a typo should be reported). Anything
    /// else is [`Secret::Plain`].
    pub fn parse(s: &str) -> Result<Secret, AuthError> {
        if s.starts_with(SCRAM_PREFIX) {
            return s.parse().map(Secret::Scram);
        }
        if let Some(hex) = s.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Secret::Md5(format!("md5{}", hex.to_ascii_lowercase())));
            }
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    /// The kind of secret, for logs and errors: `"plain"`, `"md5"` or `"scram-sha-256"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5(_) => "md5",
            Secret::Scram(_) => "scram-sha-256",
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret::{}(<redacted>)", self.kind())
    }
}

/// A SCRAM-SHA-256 verifier: what the server needs to check a client without knowing the
/// password.
///
/// `stored_key` and `server_key` are password-equivalent for the proxy's purposes (with
/// pass-through, `server_key` lets one impersonate the server), so `Debug` omits them.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count (> 0).
    pub iterations: u32,
    /// The salt (raw bytes, not base64).
    pub salt: Vec<u8>,
    /// StoredKey = SHA-256(ClientKey).
    pub stored_key: [u8; 32],
    /// ServerKey = HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Derives the verifier for `password` (after [`saslprep`]) with the given salt.
    /// An `iterations` of 0 is treated as 1 (what PBKDF2 computes for it anyway), so the
    /// result always prints as a valid verifier.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let iterations = iterations.max(1);
        let salted = salted_password(saslprep(password), salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: stored_key(&client_key(&salted)),
            server_key: server_key(&salted),
        }
    }

    /// A verifier for `password` with a random 16-byte salt and 4096 iterations, as
    /// PostgreSQL's defaults. Costs one PBKDF2 run (a few milliseconds): call it once at
    /// config load, not per login.
    pub fn generate(password: &str) -> ScramVerifier {
        let mut salt = [0u8; SALT_LEN];
        rand::fill(&mut salt[..]);
        ScramVerifier::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// A deterministic fake verifier for a user that does not exist, so that probing user
    /// names sees a normal exchange (same salt every time for the same name) that fails at
    /// the proof. All parts come from HMAC under `proxy_secret`, which must be a private
    /// per-installation key: without it the salt would reveal that the user is fake.
    /// Nobody knows a ClientKey hashing to this StoredKey, and the server side is run with
    /// `doomed = true` anyway.
    pub fn fake_for(user: &str, proxy_secret: &[u8]) -> ScramVerifier {
        let keyed = |label: &[u8]| hmac_sha256(proxy_secret, &[label, user.as_bytes()].concat());
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: keyed(b"salt").iter().take(SALT_LEN).copied().collect(),
            stored_key: keyed(b"stored"),
            server_key: keyed(b"server"),
        }
    }
}

/// Decodes a base64 key that must be exactly 32 bytes.
fn parse_key(s: &str) -> Result<[u8; 32], AuthError> {
    let bytes =
        b64_decode(s.as_bytes(), "").map_err(|_| AuthError::BadSecretFormat("SCRAM key is not base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| AuthError::BadSecretFormat("SCRAM key is not 32 bytes"))
}

impl FromStr for ScramVerifier {
    type Err = AuthError;

    /// Parses pg_authid's `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    fn from_str(s: &str) -> Result<ScramVerifier, AuthError> {
        let bad = AuthError::BadSecretFormat;
        let rest = s
            .strip_prefix(SCRAM_PREFIX)
            .ok_or(bad("SCRAM verifier must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(bad(
            "SCRAM verifier must be SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>",
        ))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(bad("SCRAM verifier lacks <iterations>:<salt>"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(bad("SCRAM verifier lacks <StoredKey>:<ServerKey>"))?;
        let iterations = parse_iterations(iterations.as_bytes())
            .map_err(|_| bad("SCRAM iteration count must be a positive integer"))?;
        let salt = b64_decode(salt.as_bytes(), "").map_err(|_| bad("SCRAM salt is not base64"))?;
        if salt.is_empty() {
            return Err(bad("SCRAM salt is empty"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: parse_key(stored)?,
            server_key: parse_key(server)?,
        })
    }
}

impl fmt::Display for ScramVerifier {
    /// Prints the pg_authid format, which [`FromStr`] / [`Secret::parse`] read back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            b64_encode(&self.salt),
            b64_encode(&self.stored_key),
            b64_encode(&self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Computed independently with Python's hashlib.pbkdf2_hmac + hmac (see the test below).
    const PY_PASSWORD: &str = "correct horse battery staple";
    const PY_VERIFIER: &str = "SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==$\
        sDdkmwYOHpqttzAUji8D1XhWmPiwEHLAWeuI2tFwero=:LT6ydCkofkc2xERFXk9Z+sQJPJhD5Nzj51sVlU9/wJw=";

    #[test]
    fn parses_each_kind() {
        assert_eq!(Secret::parse("hunter2").unwrap(), Secret::Plain("hunter2".into()));
        assert_eq!(Secret::parse("").unwrap(), Secret::Plain(String::new()));
        let md5 = "md54a0a68b43b6cd5cf266fa02f196e2371";
        assert_eq!(Secret::parse(md5).unwrap(), Secret::Md5(md5.into()));
        let upper = "md54A0A68B43B6CD5CF266FA02F196E2371";
        assert_eq!(Secret::parse(upper).unwrap(), Secret::Md5(md5.into()));
        // Wrong length or non-hex: a plaintext password that happens to start with "md5".
        for plain in [
            "md5",
            "md54a0a68b43b6cd5cf266fa02f196e237",
            "md54a0a68b43b6cd5cf266fa02f196e2371a",
        ] {
            assert_eq!(Secret::parse(plain).unwrap().kind(), "plain", "{plain}");
        }
        assert_eq!(
            Secret::parse("md5zz0a68b43b6cd5cf266fa02f196e2371")
                .unwrap()
                .kind(),
            "plain"
        );
        // Not the exact prefix: plain.
        assert_eq!(Secret::parse("scram-sha-256$x").unwrap().kind(), "plain");
        match Secret::parse(PY_VERIFIER).unwrap() {
            Secret::Scram(v) => {
                assert_eq!(v.iterations, 4096);
                assert_eq!(v.salt.len(), 16);
            }
            other => panic!("expected scram, got {other:?}"),
        }
    }

    #[test]
    fn python_computed_verifier_matches_password() {
        // python3: sp = hashlib.pbkdf2_hmac("sha256", pw, salt, 4096);
        // ck = hmac(sp, "Client Key"); StoredKey = sha256(ck); ServerKey = hmac(sp, "Server Key")
        // with salt = 8f1e4a0c5b7d29e3a6c4f0d1b2e39a77.
        let v: ScramVerifier = PY_VERIFIER.parse().unwrap();
        assert_eq!(
            v,
            ScramVerifier::from_password(PY_PASSWORD, &v.salt, v.iterations)
        );
        assert_ne!(v, ScramVerifier::from_password("wrong", &v.salt, v.iterations));
        assert_eq!(v.to_string(), PY_VERIFIER);
    }

    #[test]
    fn malformed_verifiers_are_errors() {
        let key = "sDdkmwYOHpqttzAUji8D1XhWmPiwEHLAWeuI2tFwero=";
        let cases = [
            "SCRAM-SHA-256$".to_string(),
            "SCRAM-SHA-256$4096".to_string(),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw=={key}:{key}"),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==${key}"),
            format!("SCRAM-SHA-256$0:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}"),
            format!("SCRAM-SHA-256$+4096:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}"),
            format!("SCRAM-SHA-256$abc:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:not*base64${key}:{key}"),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==${key}:AAAA"),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==$AAAA:{key}"),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}$x"),
            format!("SCRAM-SHA-256$4096:jx5KDFt9KeOmxPDRsuOadw==${key}:{key}:x"),
        ];
        for case in &cases {
            let err = Secret::parse(case).unwrap_err();
            assert!(matches!(err, AuthError::BadSecretFormat(_)), "{case}: {err:?}");
        }
    }

    #[test]
    fn display_round_trips() {
        let v = ScramVerifier::generate("pässwörd");
        assert_eq!(v.iterations, DEFAULT_ITERATIONS);
        assert_eq!(v.salt.len(), SALT_LEN);
        let printed = v.to_string();
        assert!(printed.starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(Secret::parse(&printed).unwrap(), Secret::Scram(v.clone()));
        assert_eq!(v, ScramVerifier::from_password("pässwörd", &v.salt, 4096));
        // Two generated verifiers differ (random salt).
        assert_ne!(v.salt, ScramVerifier::generate("pässwörd").salt);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let plain = format!("{:?}", Secret::parse("hunter2").unwrap());
        assert!(!plain.contains("hunter2"), "{plain}");
        let md5 = format!(
            "{:?}",
            Secret::parse("md54a0a68b43b6cd5cf266fa02f196e2371").unwrap()
        );
        assert!(!md5.contains("4a0a68"), "{md5}");
        let scram = format!("{:?}", Secret::parse(PY_VERIFIER).unwrap());
        assert!(!scram.contains("sDdkmw") && !scram.contains("jx5KD"), "{scram}");
        let v = format!("{:?}", PY_VERIFIER.parse::<ScramVerifier>().unwrap());
        assert!(!v.contains("sDdkmw") && v.contains("4096"), "{v}");
    }

    #[test]
    fn fake_verifier_is_deterministic_per_user_and_secret() {
        let a = ScramVerifier::fake_for("alice", b"proxy secret");
        assert_eq!(a, ScramVerifier::fake_for("alice", b"proxy secret"));
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        assert_ne!(a.salt, ScramVerifier::fake_for("bob", b"proxy secret").salt);
        assert_ne!(a.salt, ScramVerifier::fake_for("alice", b"other secret").salt);
        assert_ne!(a.stored_key, a.server_key);
        // It prints and parses like a real one.
        assert_eq!(a.to_string().parse::<ScramVerifier>().unwrap(), a);
    }
}
