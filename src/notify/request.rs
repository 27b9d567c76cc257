//! The LISTEN / UNLISTEN requests the hub serves, recognised from the client's buffered bytes
//! before they reach a server connection: a simple `Query`, or the extended-protocol
//! sequence drivers send for a one-off statement without parameters (psycopg 3, pgjdbc):
//! `Parse` (unnamed) `Bind` (unnamed portal) [`Describe` portal] `Execute` `Sync`.
//! Anything else (parameters, a named statement or portal, no Sync at the end, several
//! statements in one query) goes to a server connection as usual.

use bytes::BytesMut;

use crate::proto::backend::{self, PgError};
use crate::proto::frame::{parse_header, HEADER_LEN};
use crate::proto::sql::{listen_command, ListenCommand};
use crate::proto::Reader;

/// Longest request looked at (query text and the messages around it).
pub const LIMIT: usize = 2048;

/// How the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A simple Query.
    Simple,
    /// Parse, Bind, Execute, Sync; `describe` if a Describe of the portal came before the
    /// Execute.
    Extended {
        /// A Describe (portal) is answered with NoData.
        describe: bool,
    },
}

/// A recognised request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks.
    pub cmd: ListenCommand,
    /// How it was asked (how it is answered).
    pub form: Form,
    /// Bytes it takes at the start of the buffer.
    pub len: usize,
}

/// What the start of a client's buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A whole request.
    Request(Request),
    /// May be one: more bytes must be read to tell.
    Partial,
    /// Not one.
    No,
}

/// Looks for a LISTEN / UNLISTEN request at the start of `buf`. Cheap for other requests:
/// decided from the first bytes of the query text.
pub fn find(buf: &[u8]) -> Found {
    match step(buf) {
        Ok(found) => found,
        Err(Stop) => Found::No,
    }
}

/// Not a request the hub serves.
struct Stop;

fn step(buf: &[u8]) -> Result<Found, Stop> {
    let Some(first) = Message::at(buf, 0)? else {
        return Ok(Found::Partial);
    };
    let text_at = match first.tag {
        b'Q' => 0,
        b'P' => 1, // the unnamed statement's empty name
        _ => return Err(Stop),
    };
    if first.tag == b'P' && buf.get(HEADER_LEN).is_some_and(|&b| b != 0) {
        return Err(Stop);
    }
    let head = buf
        .get(HEADER_LEN + text_at..buf.len().min(first.end))
        .unwrap_or_default();
    if !may_be_listen(head) {
        return Err(Stop);
    }
    let Some(body) = first.body(buf) else {
        return Ok(Found::Partial);
    };
    let mut r = Reader::new(body);
    if first.tag == b'P' {
        r.cstr("statement name").map_err(|_| Stop)?;
    }
    let text = r.cstr("query").map_err(|_| Stop)?;
    let cmd = std::str::from_utf8(text)
        .ok()
        .and_then(listen_command)
        .ok_or(Stop)?;
    if first.tag == b'Q' {
        if !r.rest().is_empty() {
            return Err(Stop);
        }
        return Ok(Found::Request(Request {
            cmd,
            form: Form::Simple,
            len: first.end,
        }));
    }
    // Parse: no parameter types. Then Bind, [Describe], Execute, Sync.
    if r.i16("parameter types").map_err(|_| Stop)? != 0 || !r.rest().is_empty() {
        return Err(Stop);
    }
    let mut at = first.end;
    let mut describe = false;
    for (tag, optional) in [(b'B', false), (b'D', true), (b'E', false), (b'S', false)] {
        match take(buf, &mut at, tag)? {
            None => return Ok(Found::Partial),
            Some(true) => describe |= tag == b'D',
            Some(false) if optional => {}
            Some(false) => return Err(Stop),
        }
    }
    Ok(Found::Request(Request {
        cmd,
        form: Form::Extended { describe },
        len: at,
    }))
}

/// Takes the message at `at` if it has `tag` (`Some(false)`: another message is there;
/// `None`: not all of it is there yet).
fn take(buf: &[u8], at: &mut usize, tag: u8) -> Result<Option<bool>, Stop> {
    let Some(m) = Message::at(buf, *at)? else {
        return Ok(None);
    };
    if m.tag != tag {
        return Ok(Some(false));
    }
    let Some(body) = m.body(buf) else {
        return Ok(None);
    };
    if !expected_body(tag, body) {
        return Err(Stop);
    }
    *at = m.end;
    Ok(Some(true))
}

/// Whether the body of a Bind / Describe / Execute / Sync fits a one-off statement without
/// parameters on the unnamed portal.
fn expected_body(tag: u8, body: &[u8]) -> bool {
    let mut r = Reader::new(body);
    match tag {
        // Unnamed portal, unnamed statement, format codes, no parameters, result formats.
        b'B' => (|| -> Option<bool> {
            if !r.cstr("portal").ok()?.is_empty() || !r.cstr("statement").ok()?.is_empty() {
                return Some(false);
            }
            let formats = usize::try_from(r.i16("formats").ok()?).ok()?;
            r.bytes(formats * 2, "formats").ok()?;
            if r.i16("parameters").ok()? != 0 {
                return Some(false);
            }
            let results = usize::try_from(r.i16("result formats").ok()?).ok()?;
            r.bytes(results * 2, "result formats").ok()?;
            Some(r.rest().is_empty())
        })()
        .unwrap_or(false),
        b'D' => body == b"P\0",
        b'E' => body.len() == 5 && body.first() == Some(&0),
        b'S' => body.is_empty(),
        _ => false,
    }
}

/// One message's place in the buffer.
struct Message {
    tag: u8,
    start: usize,
    end: usize,
}

impl Message {
    /// The message starting at `at`: `None` if its header is not all there; `Stop` if it
    /// passes `LIMIT`.
    fn at(buf: &[u8], at: usize) -> Result<Option<Message>, Stop> {
        let rest = buf.get(at..).unwrap_or_default();
        let Some(h) = parse_header(rest, LIMIT).map_err(|_| Stop)? else {
            return Ok(None);
        };
        let end = at + h.total_len();
        if end > LIMIT {
            return Err(Stop);
        }
        Ok(Some(Message {
            tag: h.tag,
            start: at,
            end,
        }))
    }

    /// Its body, if all of it is there.
    fn body<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        buf.get(self.start + HEADER_LEN..self.end)
    }
}

/// Whether a query text starting with `head` may be a LISTEN or UNLISTEN (comments first, or
/// too little read yet, count as maybe).
fn may_be_listen(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let rest = head.get(start..).unwrap_or_default();
    if rest.starts_with(b"--") || rest.starts_with(b"/*") || rest == b"-" || rest == b"/" {
        return true;
    }
    [b"listen".as_slice(), b"unlisten".as_slice()].iter().any(|word| {
        let n = rest.len().min(word.len());
        rest.get(..n)
            .zip(word.get(..n))
            .is_some_and(|(a, b)| a.eq_ignore_ascii_case(b))
    })
}

/// What precedes the command's own answer: ParseComplete, BindComplete and (for a Describe)
/// NoData in the extended form; nothing for a simple query.
pub fn answer_head(out: &mut BytesMut, form: Form) {
    if let Form::Extended { describe } = form {
        crate::proto::frame::write_message(out, b'1', |_| {});
        crate::proto::frame::write_message(out, b'2', |_| {});
        if describe {
            crate::proto::frame::write_message(out, b'n', |_| {});
        }
    }
}

/// The whole answer: the head, then CommandComplete with `tag` or the error, then
/// ReadyForQuery with `status`.
pub fn answer(out: &mut BytesMut, form: Form, result: Result<&str, &PgError>, status: u8) {
    answer_head(out, form);
    match result {
        Ok(tag) => backend::command_complete(out, tag),
        Err(e) => e.write_error(out),
    }
    backend::ready_for_query(out, status);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BufMut;

    fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        crate::proto::frame::write_message(out, tag, |o| o.put_slice(body));
    }

    fn extended(text: &str, describe: bool) -> BytesMut {
        let mut b = BytesMut::new();
        let mut parse = vec![0u8];
        parse.extend_from_slice(text.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        msg(&mut b, b'P', &parse);
        msg(&mut b, b'B', &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        if describe {
            msg(&mut b, b'D', b"P\0");
        }
        msg(&mut b, b'E', &[0, 0, 0, 0, 0]);
        msg(&mut b, b'S', b"");
        b
    }

    #[test]
    fn simple_and_extended_forms() {
        let mut q = BytesMut::new();
        msg(&mut q, b'Q', b"LISTEN jobs\0");
        let len = q.len();
        q.put_slice(b"Q\0\0");
        assert_eq!(
            find(&q),
            Found::Request(Request {
                cmd: ListenCommand::Listen("jobs".into()),
                form: Form::Simple,
                len
            })
        );
        for describe in [false, true] {
            let b = extended("UNLISTEN *", describe);
            assert_eq!(
                find(&b),
                Found::Request(Request {
                    cmd: ListenCommand::Unlisten(None),
                    form: Form::Extended { describe },
                    len: b.len()
                })
            );
            // Every prefix may still be one.
            for cut in 0..b.len() {
                assert_eq!(find(&b[..cut]), Found::Partial, "cut at {cut}");
            }
        }
    }

    #[test]
    fn other_requests_are_not() {
        let mut q = BytesMut::new();
        msg(&mut q, b'Q', b"SELECT 1\0");
        assert_eq!(find(&q), Found::No);
        assert_eq!(find(b"Q\0\0\0\x0dSEL"), Found::No);
        assert_eq!(find(&extended("LISTEN a; SELECT 1", false)), Found::No);
        // A Flush instead of Sync, a named portal, parameters.
        let mut b = extended("LISTEN a", false);
        let n = b.len();
        b.truncate(n - 5);
        msg(&mut b, b'H', b"");
        assert_eq!(find(&b), Found::No);
        let mut b = BytesMut::new();
        msg(&mut b, b'P', b"\0LISTEN a\0\0\0");
        msg(&mut b, b'B', b"p\0\0\0\0\0\0\0\0");
        assert_eq!(find(&b), Found::No);
        let mut b = BytesMut::new();
        msg(&mut b, b'P', b"\0LISTEN a\0\0\0");
        msg(&mut b, b'B', &[0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0]);
        assert_eq!(find(&b), Found::No);
        let mut b = BytesMut::new();
        msg(&mut b, b'P', b"s1\0LISTEN a\0\0\0");
        assert_eq!(find(&b), Found::No);
    }
}
