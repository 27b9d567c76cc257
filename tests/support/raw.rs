//! A raw protocol client for edge cases drivers never produce.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection speaking bytes.
pub struct Raw {
    /// The socket.
    pub s: TcpStream,
    buf: BytesMut,
}

/// One backend message.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Type byte.
    pub tag: u8,
    /// Body.
    pub body: Vec<u8>,
}

impl Msg {
    /// For an ErrorResponse/NoticeResponse: the field with this type.
    pub fn field(&self, t: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&k, r)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let end = r.iter().position(|&b| b == 0)?;
            if k == t {
                return Some(String::from_utf8_lossy(&r[..end]).into_owned());
            }
            rest = &r[end + 1..];
        }
        None
    }

    /// SQLSTATE of an error.
    pub fn code(&self) -> String {
        self.field(b'C').unwrap_or_default()
    }
}

impl Raw {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Sends bytes.
    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Reads exactly n raw bytes (for the SSL answer).
    pub async fn read_raw(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await.expect("connection closed");
        }
        self.buf.split_to(n).to_vec()
    }

    async fn fill(&mut self) -> Option<()> {
        let n = tokio::time::timeout(Duration::from_secs(30), self.s.read_buf(&mut self.buf))
            .await
            .expect("timed out reading from the proxy")
            .ok()?;
        (n > 0).then_some(())
    }

    /// Reads one message; None on EOF.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let m = self.buf.split_to(len + 1);
                    return Some(Msg {
                        tag: m[0],
                        body: m[5..].to_vec(),
                    });
                }
            }
            self.fill().await?;
        }
    }

    /// Reads messages until one with `tag` (returned with everything before it).
    pub async fn recv_until(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("EOF before {:?}; got {out:?}", tag as char));
            let done = m.tag == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Asserts the proxy closes the connection with nothing more to say.
    pub async fn expect_closed(&mut self) {
        let next = self.recv().await;
        assert!(next.is_none(), "expected EOF, got {next:?}");
    }

    /// Sends a StartupMessage with protocol `version` and `params`.
    pub async fn startup(&mut self, version: u32, params: &[(&str, &str)]) {
        self.send(&startup_packet(version, params)).await;
    }

    /// Logs in with cleartext-free trust (the config must use auth = "trust"): startup and read
    /// until ReadyForQuery.
    pub async fn login_trust(&mut self, user: &str, db: &str) -> Vec<Msg> {
        self.startup(196608, &[("user", user), ("database", db)]).await;
        self.recv_until(b'Z').await
    }
}

/// A StartupMessage.
pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(version);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.to_vec()
}

/// A tagged frontend message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    msg(b'Q', &body)
}

/// Parse (unnamed statement, no parameter types).
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind (unnamed portal, no parameters, text results).
pub fn bind(stmt: &str) -> Vec<u8> {
    let mut b = vec![0];
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

/// Execute (unnamed portal, all rows).
pub fn execute() -> Vec<u8> {
    msg(b'E', &[0, 0, 0, 0, 0])
}

/// Sync.
pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}
