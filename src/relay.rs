//! The relay: one client ⇄ one server until the transaction (or session) ends.
//!
//! Frames by the 5-byte header and copies bytes through untouched, looking only at the tags
//! that decide when the server connection can go back to the pool: client Q/S/F and the
//! extended-protocol messages, server Z (and S/E, which it reads but forwards). Both directions
//! run in one poll loop, so a client streaming COPY data while the server streams rows can
//! never deadlock, and each burst read becomes one write. Large messages stream through: only
//! the header must be buffered, so memory does not grow with message size.
//!
//! Knows nothing about pools or metrics: it returns what happened.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

use crate::proto::backend::{parse_parameter_status, PgError, Severity};
use crate::proto::frame::{parse_header, HEADER_LEN};
use crate::proto::ProtoError;
use crate::server::ServerConn;

/// Bytes reserved per read.
const READ_CHUNK: usize = 32 * 1024;
/// Stop reading a side while this much is waiting to be written to the other (backpressure).
const HIGH_WATER: usize = 256 * 1024;
/// Server messages the relay inspects (E, S) are read whole up to this size; larger ones
/// stream through uninspected.
const INSPECT_LIMIT: usize = 64 * 1024;
/// Server messages are bounded only by the protocol.
const MAX_SERVER_BODY: usize = u32::MAX as usize;

/// When the server connection goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// At ReadyForQuery 'I' with nothing outstanding.
    Transaction,
    /// Only when the client leaves.
    Session,
}

/// What ended a relay.
#[derive(Debug)]
pub enum Outcome {
    /// Transaction boundary: the server is clean and can be released.
    Released,
    /// The client sent Terminate or closed its socket. `server_clean` says whether the server
    /// connection is idle with nothing outstanding.
    ClientGone {
        /// Safe to reuse as is.
        server_clean: bool,
    },
    /// The server connection failed. `error_sent` is the backend's FATAL, already forwarded to
    /// the client (lowered to ERROR in transaction mode); `None` if the client got nothing.
    ServerGone {
        /// What the backend said, if anything.
        error_sent: Option<PgError>,
        /// Client requests (Query/Sync/FunctionCall) still waiting for ReadyForQuery.
        pending: u32,
        /// The last transaction status the client saw ('I', 'T', 'E').
        tx_status: u8,
        /// Body bytes of a client message that was partly forwarded; the rest must be dropped.
        client_skip: usize,
        /// Extended-protocol messages were forwarded after the last Sync.
        unsynced: bool,
    },
    /// The client broke the protocol or sent an oversized message.
    ClientProtocol(ProtoError),
}

/// The client's side of a session: its stream and buffers, kept across transactions.
#[derive(Debug)]
pub struct ClientIo<C> {
    /// The client's stream.
    pub stream: C,
    /// Bytes read from the client, not yet forwarded.
    pub inbuf: BytesMut,
    /// Bytes to write to the client.
    pub out: BytesMut,
    /// Largest client message body accepted.
    pub max_body: usize,
}

/// Relays until the outcome. ParameterStatus changes the backend reports on the way (a SET of
/// a reported setting, its rollback, RESET) are appended to `reported`, lowercased name first,
/// so the caller can keep the client's and the server connection's view of settings right.
pub async fn relay<C>(
    client: &mut ClientIo<C>,
    server: &mut ServerConn,
    mode: Mode,
    reported: &mut Vec<(String, String)>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State {
        mode,
        pending: 0,
        unsynced: false,
        c_skip: 0,
        s_skip: 0,
        tx_status: b'I',
        fatal: None,
        reported,
    };
    poll_fn(|cx| st.poll(cx, client, server)).await
}

struct State<'r> {
    mode: Mode,
    /// Client requests forwarded whose ReadyForQuery has not come back.
    pending: u32,
    /// Extended-protocol messages forwarded after the last Sync.
    unsynced: bool,
    /// Body bytes of a client message still streaming through.
    c_skip: usize,
    /// Body bytes of a server message still streaming through.
    s_skip: usize,
    tx_status: u8,
    fatal: Option<PgError>,
    reported: &'r mut Vec<(String, String)>,
}

enum Scan {
    Continue,
    Release,
}

impl State<'_> {
    fn quiet(&self) -> bool {
        self.pending == 0 && !self.unsynced && self.c_skip == 0 && self.s_skip == 0 && self.tx_status == b'I'
    }

    fn server_gone(&mut self) -> Poll<Outcome> {
        Poll::Ready(Outcome::ServerGone {
            error_sent: self.fatal.take(),
            pending: self.pending,
            tx_status: self.tx_status,
            client_skip: self.c_skip,
            unsynced: self.unsynced,
        })
    }

    fn poll<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Poll<Outcome> {
        loop {
            // Frame what was read: client → server buffer, server → client buffer.
            if !client.inbuf.is_empty() {
                match self.scan_client(client, server) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Poll::Ready(Outcome::ClientGone {
                            server_clean: self.quiet() && server.wbuf.is_empty(),
                        });
                    }
                    Err(e) => return Poll::Ready(Outcome::ClientProtocol(e)),
                }
            }
            if !server.rbuf.is_empty() {
                match self.scan_server(client, server) {
                    Ok(Scan::Release) => return Poll::Ready(Outcome::Released),
                    Ok(Scan::Continue) => {}
                    Err(_) => return self.server_gone(),
                }
            }
            let mut progress = false;
            // Flush towards the server.
            while !server.wbuf.is_empty() {
                match Pin::new(&mut server.stream).poll_write(cx, &server.wbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return self.server_gone(),
                    Poll::Ready(Ok(n)) => {
                        server.wbuf.advance(n);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            // Flush towards the client.
            while !client.out.is_empty() {
                match Pin::new(&mut client.stream).poll_write(cx, &client.out) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Outcome::ClientGone { server_clean: false });
                    }
                    Poll::Ready(Ok(n)) => {
                        client.out.advance(n);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            // Read more, unless the other side is not keeping up (backpressure).
            if server.wbuf.len() < HIGH_WATER {
                reserve_read(&mut client.inbuf);
                match poll_read_buf(Pin::new(&mut client.stream), cx, &mut client.inbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Outcome::ClientGone {
                            server_clean: self.quiet() && server.wbuf.is_empty(),
                        });
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Pending => {}
                }
            }
            if client.out.len() < HIGH_WATER {
                reserve_read(&mut server.rbuf);
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.rbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return self.server_gone(),
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Moves complete client messages (and streamed body bytes) to the server's write buffer.
    /// Returns false when the client sent Terminate.
    fn scan_client<C>(
        &mut self,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Result<bool, ProtoError> {
        let inbuf = &mut client.inbuf;
        loop {
            if self.c_skip > 0 {
                let n = self.c_skip.min(inbuf.len());
                if n == 0 {
                    return Ok(true);
                }
                server.wbuf.extend_from_slice(&inbuf[..n]);
                inbuf.advance(n);
                self.c_skip -= n;
                continue;
            }
            let Some(h) = parse_header(inbuf, client.max_body)? else {
                return Ok(true);
            };
            match h.tag {
                b'Q' | b'F' => self.pending += 1,
                b'S' => {
                    self.pending += 1;
                    self.unsynced = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.unsynced = true,
                b'd' | b'c' | b'f' => {}
                b'X' => {
                    inbuf.clear();
                    return Ok(false);
                }
                _ => return Err(ProtoError::Invalid("frontend message type")),
            }
            let n = h.total_len().min(inbuf.len());
            server.wbuf.extend_from_slice(&inbuf[..n]);
            inbuf.advance(n);
            self.c_skip = h.total_len() - n;
        }
    }

    /// Moves complete server messages to the client's buffer, noting ReadyForQuery, parameter
    /// changes and FATAL errors. Stops right after the ReadyForQuery that makes the server
    /// releasable, leaving anything after it in the server's buffer.
    fn scan_server<C>(
        &mut self,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Result<Scan, ProtoError> {
        loop {
            if self.s_skip > 0 {
                let n = self.s_skip.min(server.rbuf.len());
                if n == 0 {
                    return Ok(Scan::Continue);
                }
                client.out.extend_from_slice(&server.rbuf[..n]);
                server.rbuf.advance(n);
                self.s_skip -= n;
                continue;
            }
            let Some(h) = parse_header(&server.rbuf, MAX_SERVER_BODY)? else {
                return Ok(Scan::Continue);
            };
            let inspect = matches!(h.tag, b'Z' | b'S' | b'E') && h.body_len <= INSPECT_LIMIT;
            if h.tag == b'Z' && h.body_len != 1 {
                return Err(ProtoError::Invalid("ReadyForQuery length"));
            }
            if inspect {
                let Some(body) = server.rbuf.get(HEADER_LEN..h.total_len()) else {
                    let missing = h.total_len().saturating_sub(server.rbuf.len());
                    server.rbuf.reserve(missing);
                    return Ok(Scan::Continue);
                };
                match h.tag {
                    b'Z' => {
                        self.tx_status = body.first().copied().unwrap_or(b'I');
                        self.pending = self
                            .pending
                            .checked_sub(1)
                            .ok_or(ProtoError::Invalid("unsolicited ReadyForQuery"))?;
                    }
                    b'S' => {
                        let (name, value) = parse_parameter_status(body)?;
                        self.reported.push((name.to_ascii_lowercase(), value.clone()));
                        server.params.insert(name, value);
                    }
                    _ => {
                        let err = PgError::parse(body)?;
                        if err.is_fatal() {
                            if self.mode == Mode::Transaction {
                                // The client's connection outlives this server connection.
                                err.clone()
                                    .with_severity(Severity::Error)
                                    .write_error(&mut client.out);
                            } else {
                                client.out.extend_from_slice(&server.rbuf[..h.total_len()]);
                            }
                            server.rbuf.advance(h.total_len());
                            self.fatal = Some(err);
                            continue;
                        }
                    }
                }
                client.out.extend_from_slice(&server.rbuf[..h.total_len()]);
                server.rbuf.advance(h.total_len());
                if h.tag == b'Z' && self.mode == Mode::Transaction && self.quiet() && server.wbuf.is_empty() {
                    return Ok(Scan::Release);
                }
                continue;
            }
            let n = h.total_len().min(server.rbuf.len());
            client.out.extend_from_slice(&server.rbuf[..n]);
            server.rbuf.advance(n);
            self.s_skip = h.total_len() - n;
        }
    }
}

/// Ensures room for a read; `reserve` reuses the allocation once earlier bytes were consumed,
/// so a steady stream does not allocate.
fn reserve_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}
