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
            if let Some(m) = take_message(&mut self.buf) {
                return Some(m);
            }
            self.fill().await?;
        }
    }

    /// Writes `bytes` while reading the answers (so a large pipeline cannot deadlock on full
    /// socket buffers), until `readies` ReadyForQuery messages: everything read, in order.
    pub async fn send_while_reading(&mut self, bytes: &[u8], readies: usize) -> Vec<Msg> {
        let (mut rd, mut wr) = self.s.split();
        let buf = &mut self.buf;
        let write = async {
            wr.write_all(bytes).await.unwrap();
        };
        let read = async {
            let mut out = Vec::new();
            let mut seen = 0;
            while seen < readies {
                while let Some(m) = take_message(buf) {
                    seen += usize::from(m.tag == b'Z');
                    out.push(m);
                    if seen == readies {
                        return out;
                    }
                }
                let n = tokio::time::timeout(Duration::from_secs(60), rd.read_buf(buf))
                    .await
                    .expect("timed out reading from the proxy")
                    .unwrap();
                assert!(n > 0, "EOF after {out:?}");
            }
            out
        };
        tokio::join!(write, read).1
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

/// Takes one whole message off the front of `buf`.
fn take_message(buf: &mut BytesMut) -> Option<Msg> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() <= len {
        return None;
    }
    let m = buf.split_to(len + 1);
    Some(Msg {
        tag: m[0],
        body: m[5..].to_vec(),
    })
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

/// Describe of a statement ('S') or portal ('P').
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    msg(b'D', &b)
}

/// Close of a statement ('S') or portal ('P').
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    msg(b'C', &b)
}

/// Flush.
pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

/// Bind `portal` to `stmt` with text parameters, text results.
pub fn bind_with(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(portal.as_bytes());
    b.push(0);
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes()); // all parameters in text
    b.extend_from_slice(&u16::try_from(params.len()).unwrap().to_be_bytes());
    for p in params {
        b.extend_from_slice(&i32::try_from(p.len()).unwrap().to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0u16.to_be_bytes()); // all results in text
    msg(b'B', &b)
}

/// Execute a named portal, all rows.
pub fn execute_portal(portal: &str) -> Vec<u8> {
    let mut b = portal.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&0u32.to_be_bytes());
    msg(b'E', &b)
}

/// Answers as text for assertion messages: tags, with the SQLSTATE and message of errors.
pub fn show(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|m| match m.tag {
            b'E' => format!("E({} {})", m.code(), m.field(b'M').unwrap_or_default()),
            t => (t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The type bytes of `msgs`, as a string ("12DCZ").
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// First column of every DataRow, as text.
pub fn values(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let b = &m.body;
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
            if len < 0 {
                "NULL".to_string()
            } else {
                String::from_utf8_lossy(&b[6..6 + usize::try_from(len).unwrap()]).into_owned()
            }
        })
        .collect()
}
