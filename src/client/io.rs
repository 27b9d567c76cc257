//! Reading and writing whole messages on the client connection outside the relay (startup,
//! authentication, errors the proxy answers itself).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ClientError;
use crate::proto::frame::{parse_header, HEADER_LEN};
use crate::proto::{startup, ProtoError};
use crate::relay::ClientIo;

/// Largest message accepted during authentication (SASL messages are a few hundred bytes).
pub const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// The client went away (EOF or I/O error); nothing more can be said to it.
#[derive(Debug)]
pub struct Gone;

/// Reads an untagged startup packet: its body.
pub async fn read_startup<C: AsyncRead + Unpin>(
    stream: &mut C,
) -> Result<Result<Vec<u8>, ClientError>, Gone> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(|_| Gone)?;
    if len == [b'X', 0, 0, 0] {
        // A Terminate before any startup packet (node-postgres's `connect(); end()` can write
        // it first): the client is leaving before it began. PostgreSQL closes without a
        // word (its length check only logs); so does pgsluice.
        return Err(Gone);
    }
    let body_len = match startup::body_len(u32::from_be_bytes(len)) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e.into())),
    };
    let mut body = vec![0u8; body_len];
    stream.read_exact(&mut body).await.map_err(|_| Gone)?;
    Ok(Ok(body))
}

impl<C: AsyncRead + AsyncWrite + Unpin> ClientIo<C> {
    /// Reads more bytes into `inbuf`; `Gone` on EOF.
    pub async fn fill(&mut self) -> Result<(), Gone> {
        if self.inbuf.capacity() - self.inbuf.len() < 4096 {
            self.inbuf.reserve(16 * 1024);
        }
        match self.stream.read_buf(&mut self.inbuf).await {
            Ok(0) | Err(_) => Err(Gone),
            Ok(n) => {
                self.read_bytes += n as u64;
                Ok(())
            }
        }
    }

    /// Reads one whole message of at most `max_body` bytes: (tag, body).
    pub async fn read_message(
        &mut self,
        max_body: usize,
    ) -> Result<Result<(u8, BytesMut), ProtoError>, Gone> {
        loop {
            match parse_header(&self.inbuf, max_body) {
                Err(e) => return Ok(Err(e)),
                Ok(Some(h)) if self.inbuf.len() >= h.total_len() => {
                    let mut msg = self.inbuf.split_to(h.total_len());
                    let body = msg.split_off(HEADER_LEN);
                    return Ok(Ok((h.tag, body)));
                }
                Ok(_) => self.fill().await?,
            }
        }
    }

    /// Writes everything in `out`. Cancel-safe: `out` keeps exactly what is not written yet,
    /// so a flush dropped midway (racing a checkout, say) loses and repeats nothing.
    pub async fn flush(&mut self) -> Result<(), Gone> {
        while !self.out.is_empty() {
            match self.stream.write_buf(&mut self.out).await {
                Ok(0) | Err(_) => return Err(Gone),
                Ok(_) => {}
            }
        }
        Ok(())
    }
}

/// A fresh client I/O wrapper.
pub fn client_io<C>(stream: C, max_body: usize) -> ClientIo<C> {
    ClientIo {
        stream,
        inbuf: BytesMut::with_capacity(16 * 1024),
        out: BytesMut::with_capacity(16 * 1024),
        max_body,
        read_bytes: 0,
    }
}
