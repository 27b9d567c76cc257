//! The backend login exchange: answer whatever authentication the backend asks for with the
//! credentials we have, then collect ParameterStatus and BackendKeyData until ReadyForQuery.

use super::conn::ServerConn;
use super::{LoginCredentials, ServerError, ServerTarget};
use crate::auth::md5;
use crate::auth::scram_client::{ScramClient, ScramCredential};
use crate::proto::backend::{parse_auth, parse_backend_key, parse_parameter_status, AuthRequest, PgError};
use crate::proto::frontend;

const SCRAM: &str = "SCRAM-SHA-256";

pub(super) async fn login(
    conn: &mut ServerConn,
    target: &ServerTarget,
    creds: &LoginCredentials,
) -> Result<(), ServerError> {
    frontend::startup(
        &mut conn.wbuf,
        &[("user", &target.user), ("database", &target.dbname)],
    );
    conn.flush_wbuf().await?;
    let mut scram: Option<ScramClient> = None;
    loop {
        let (tag, body) = conn.read_message().await?;
        match tag {
            b'R' => match parse_auth(&body)? {
                AuthRequest::Ok => {}
                AuthRequest::Cleartext => {
                    let pw = password(creds, "a cleartext password")?;
                    frontend::password(&mut conn.wbuf, pw.as_bytes());
                    conn.flush_wbuf().await?;
                }
                AuthRequest::Md5(salt) => {
                    let hash = match creds {
                        LoginCredentials::Md5Hash(h) => h.clone(),
                        _ => md5::password_hash(&target.user, password(creds, "an md5 password")?),
                    };
                    frontend::password(&mut conn.wbuf, md5::client_response(&hash, &salt).as_bytes());
                    conn.flush_wbuf().await?;
                }
                AuthRequest::Sasl(mechs) => {
                    if !mechs.iter().any(|m| m == SCRAM) {
                        return Err(ServerError::AuthUnsupported(format!("SASL {}", mechs.join(", "))));
                    }
                    let cred = match creds {
                        LoginCredentials::Password(p) => ScramCredential::Password(p.clone()),
                        LoginCredentials::ScramKeys {
                            client_key,
                            server_key,
                        } => ScramCredential::Keys {
                            client_key: *client_key,
                            server_key: *server_key,
                        },
                        LoginCredentials::Md5Hash(_) | LoginCredentials::None => {
                            return Err(ServerError::AuthUnsupported(
                                "SCRAM-SHA-256 (no plaintext password or SCRAM key is known; set server_password)"
                                    .into(),
                            ))
                        }
                    };
                    let client = ScramClient::new(cred);
                    frontend::sasl_initial(&mut conn.wbuf, SCRAM, &client.client_first());
                    conn.flush_wbuf().await?;
                    scram = Some(client);
                }
                AuthRequest::SaslContinue(data) => {
                    let client = scram.as_mut().ok_or(ServerError::Unexpected('R'))?;
                    let reply = client.server_first(&data).map_err(ServerError::Scram)?;
                    frontend::sasl_response(&mut conn.wbuf, &reply);
                    conn.flush_wbuf().await?;
                }
                AuthRequest::SaslFinal(data) => {
                    let client = scram.as_mut().ok_or(ServerError::Unexpected('R'))?;
                    client.server_final(&data).map_err(ServerError::Scram)?;
                }
                AuthRequest::Other(code) => {
                    return Err(ServerError::AuthUnsupported(format!(
                        "authentication method {code}"
                    )))
                }
            },
            b'S' => {
                let (name, value) = parse_parameter_status(&body)?;
                conn.params.insert(name, value);
            }
            b'K' => conn.backend_key = parse_backend_key(&body)?,
            b'E' => return Err(ServerError::LoginRefused(PgError::parse(&body)?)),
            b'N' | b'v' => {}
            b'Z' => return Ok(()),
            other => return Err(ServerError::Unexpected(char::from(other))),
        }
    }
}

fn password<'a>(creds: &'a LoginCredentials, what: &str) -> Result<&'a str, ServerError> {
    match creds {
        LoginCredentials::Password(p) => Ok(p),
        LoginCredentials::ScramKeys { .. } => Err(ServerError::AuthUnsupported(format!(
            "{what} (only a SCRAM key from pass-through is known; set server_password)"
        ))),
        LoginCredentials::Md5Hash(_) | LoginCredentials::None => Err(ServerError::AuthUnsupported(format!(
            "{what} (no plaintext password configured; set server_password)"
        ))),
    }
}
