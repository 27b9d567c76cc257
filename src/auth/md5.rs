//! PostgreSQL's MD5 password scheme (AuthenticationMD5Password).
//!
//! Owns: the stored hash `"md5" + md5(password + user)`, the salted response
//! `"md5" + md5(hex(stored) + salt)`, and checking a client's response.
//! Must not touch: SCRAM (a SCRAM secret cannot answer MD5; the caller runs SCRAM instead,
//! as PostgreSQL does), the wire framing, or I/O.

use ::md5::{Digest as _, Md5};

use super::scram::ct_eq;
use super::secret::Secret;

/// Lowercase hex of the MD5 of the concatenation of `parts`.
pub fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The pg_authid MD5 hash of a password: `"md5" + hex(md5(password + user))`.
pub fn password_hash(user: &str, password: &str) -> String {
    format!("md5{}", md5_hex(&[password.as_bytes(), user.as_bytes()]))
}

/// The response to AuthenticationMD5Password: `"md5" + hex(md5(hex + salt))`, where `hex`
/// is `stored_md5_hash` without its `"md5"` prefix (a hash given without the prefix is
/// used as is).
pub fn client_response(stored_md5_hash: &str, salt: &[u8; 4]) -> String {
    let hex = stored_md5_hash.strip_prefix("md5").unwrap_or(stored_md5_hash);
    format!("md5{}", md5_hex(&[hex.as_bytes(), salt]))
}

/// Checks a client's PasswordMessage `response` (one trailing NUL, as on the wire, is
/// ignored) against `secret` for `user` and the `salt` we sent. Works for plaintext and
/// MD5 secrets, comparing in constant time; always `false` for a SCRAM secret, which
/// cannot compute the expected response.
pub fn verify(secret: &Secret, user: &str, salt: &[u8; 4], response: &[u8]) -> bool {
    let expected = match secret {
        Secret::Plain(password) => client_response(&password_hash(user, password), salt),
        Secret::Md5(hash) => client_response(hash, salt),
        Secret::Scram(_) => return false,
    };
    let response = response.strip_suffix(b"\0").unwrap_or(response);
    ct_eq(expected.as_bytes(), response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::auth::ScramVerifier;

    // `printf secretalice | md5sum` → 4a0a68b43b6cd5cf266fa02f196e2371
    const ALICE_HASH: &str = "md54a0a68b43b6cd5cf266fa02f196e2371";
    // `printf '4a0a68b43b6cd5cf266fa02f196e2371\x01\x02\x03\x04' | md5sum`
    const ALICE_RESPONSE: &str = "md598a0412b9c31436fc53776e863350083";
    const SALT: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn known_values() {
        assert_eq!(md5_hex(&[]), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(&[b"secret", b"alice"]), &ALICE_HASH[3..]);
        assert_eq!(password_hash("alice", "secret"), ALICE_HASH);
        assert_eq!(client_response(ALICE_HASH, &SALT), ALICE_RESPONSE);
        assert_eq!(client_response(&ALICE_HASH[3..], &SALT), ALICE_RESPONSE);
    }

    #[test]
    fn verifies_plain_and_md5_secrets() {
        let plain = Secret::parse("secret").unwrap();
        let hashed = Secret::parse(ALICE_HASH).unwrap();
        for secret in [&plain, &hashed] {
            assert!(verify(secret, "alice", &SALT, ALICE_RESPONSE.as_bytes()));
            assert!(verify(
                secret,
                "alice",
                &SALT,
                b"md598a0412b9c31436fc53776e863350083\0"
            ));
            assert!(!verify(secret, "alice", &[1, 2, 3, 5], ALICE_RESPONSE.as_bytes()));
            assert!(!verify(secret, "alice", &SALT, &ALICE_RESPONSE.as_bytes()[..34]));
            assert!(!verify(secret, "alice", &SALT, b""));
            assert!(!verify(secret, "alice", &SALT, b"\xff\xfe"));
        }
        // The user name is part of the hash for plaintext secrets.
        assert!(!verify(&plain, "bob", &SALT, ALICE_RESPONSE.as_bytes()));
    }

    #[test]
    fn scram_secret_never_verifies() {
        let v = ScramVerifier::from_password("secret", b"salt", 16);
        assert!(!verify(
            &Secret::Scram(v),
            "alice",
            &SALT,
            ALICE_RESPONSE.as_bytes()
        ));
    }
}
