//! Client authentication I/O: drives the pure exchanges in `auth/` over the client connection.
//! Unknown users go through the same exchange against a fake verifier and fail at the proof,
//! so the answer never reveals which users exist.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::io::{Gone, MAX_AUTH_MESSAGE};
use super::ClientError;
use crate::auth::md5;
use crate::auth::scram_server::ScramServer;
use crate::auth::secret::{ScramVerifier, Secret};
use crate::config::{AuthMethod, User};
use crate::proto::backend::{self, auth_code};
use crate::proto::frontend;
use crate::relay::ClientIo;

/// What authentication learned that later steps can use.
#[derive(Debug, Default)]
pub struct Authenticated {
    /// SCRAM keys recovered from the client's proof (ClientKey, ServerKey), for pass-through.
    pub scram_keys: Option<([u8; 32], [u8; 32])>,
}

type Outcome = Result<Result<Authenticated, ClientError>, Gone>;

/// Runs the exchange for `user_name` (`user` is its config, `None` if unknown).
pub async fn authenticate<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    user_name: &str,
    user: Option<&Arc<User>>,
    default_auth: AuthMethod,
    proxy_secret: &[u8],
) -> Outcome {
    let fake = || ScramVerifier::fake_for(user_name, proxy_secret);
    match user {
        Some(u) => match (u.auth, &u.secret, &u.scram) {
            (AuthMethod::Trust, _, _) => Ok(Ok(Authenticated::default())),
            (AuthMethod::Md5, Some(secret @ (Secret::Plain(_) | Secret::Md5(_))), _) => {
                md5_exchange(io, user_name, Some(secret)).await
            }
            (AuthMethod::ScramSha256 | AuthMethod::Md5, _, Some(v)) => {
                scram_exchange(io, user_name, v.clone(), false).await
            }
            // Config validation rejects the remaining combinations; fail closed anyway.
            (AuthMethod::ScramSha256 | AuthMethod::Md5, _, None) => {
                scram_exchange(io, user_name, fake(), true).await
            }
        },
        None => match default_auth {
            AuthMethod::Md5 => md5_exchange(io, user_name, None).await,
            AuthMethod::ScramSha256 | AuthMethod::Trust => scram_exchange(io, user_name, fake(), true).await,
        },
    }
}

fn failed(user: &str) -> Outcome {
    Ok(Err(ClientError::AuthFailed(user.to_string())))
}

/// Reads the client's next authentication message, which must be 'p'.
async fn read_password_message<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
) -> Result<Result<bytes::BytesMut, ClientError>, Gone> {
    match io.read_message(MAX_AUTH_MESSAGE).await? {
        Ok((b'p', body)) => Ok(Ok(body)),
        Ok((tag, _)) => Ok(Err(ClientError::AuthProtocol(format!(
            "expected a password message, got message type {:?}",
            char::from(tag)
        )))),
        Err(e) => Ok(Err(e.into())),
    }
}

async fn md5_exchange<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    user_name: &str,
    secret: Option<&Secret>,
) -> Outcome {
    let salt: [u8; 4] = rand::random();
    backend::auth(&mut io.out, auth_code::MD5, &salt);
    io.flush().await?;
    let body = match read_password_message(io).await? {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let response = match frontend::parse_password(&body) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.into())),
    };
    match secret {
        Some(s) if md5::verify(s, user_name, &salt, response) => Ok(Ok(Authenticated::default())),
        _ => failed(user_name),
    }
}

async fn scram_exchange<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    user_name: &str,
    verifier: ScramVerifier,
    doomed: bool,
) -> Outcome {
    let server_key = verifier.server_key;
    let mut scram = ScramServer::new(verifier, doomed);
    backend::auth(&mut io.out, auth_code::SASL, ScramServer::mechanisms());
    io.flush().await?;

    let body = match read_password_message(io).await? {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let server_first = match frontend::parse_sasl_initial(&body) {
        Ok((mech, data)) => match scram.client_first(mech, data) {
            Ok(reply) => reply,
            Err(e) => return Ok(Err(ClientError::AuthProtocol(e.to_string()))),
        },
        Err(e) => return Ok(Err(e.into())),
    };
    backend::auth(&mut io.out, auth_code::SASL_CONTINUE, &server_first);
    io.flush().await?;

    let body = match read_password_message(io).await? {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    match scram.client_final(&body) {
        Ok((server_final, client_key)) => {
            backend::auth(&mut io.out, auth_code::SASL_FINAL, &server_final);
            Ok(Ok(Authenticated {
                scram_keys: Some((client_key, server_key)),
            }))
        }
        Err(e) => {
            tracing::debug!(user = user_name, error = %e, "SCRAM exchange failed");
            failed(user_name)
        }
    }
}
