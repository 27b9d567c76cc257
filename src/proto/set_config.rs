//! `SELECT set_config(name, value, is_local)` alone in a query text: how row-level-security
//! code sets its per-request context. With `is_local = false` it is a session setting that
//! the proxy carries like `SET` (replayed on the client's next server connection); with
//! `true` it lasts only as long as the transaction. The arguments may be string literals or,
//! in a Parse, parameters whose values the Bind brings. Any other use of `set_config` (among
//! other statements, with computed arguments) pins the client (`proto::effects`).

use crate::proto::sql::SessionCommand;
use crate::proto::{ProtoError, Reader};
use crate::settings::SettingValue;

/// One argument as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    /// A string literal's value.
    Text(String),
    /// `true` / `false`.
    Bool(bool),
    /// `$n` (1-based).
    Param(usize),
    /// `NULL`.
    Null,
}

/// A recognised `set_config` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCall {
    name: Arg,
    value: Arg,
    local: Arg,
}

/// What a call does once its arguments are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A session setting, carried like `SET` / `RESET`.
    Session(SessionCommand),
    /// `is_local` is true: it ends with the transaction.
    Local,
    /// An argument the proxy cannot read: the setting cannot be carried.
    Unknown,
}

impl ConfigCall {
    /// Whether an argument is a parameter (the call is resolved at Bind).
    pub fn has_params(&self) -> bool {
        [&self.name, &self.value, &self.local]
            .iter()
            .any(|a| matches!(a, Arg::Param(_)))
    }

    /// The call with literal arguments only.
    pub fn resolve_literal(&self) -> Resolved {
        self.resolve(|_| None)
    }

    /// The call with a Bind's parameter values (`param(n)`: `Some(None)` for NULL, `None` when
    /// it cannot be read).
    pub fn resolve<'a>(&self, param: impl Fn(usize) -> Option<Option<&'a [u8]>>) -> Resolved {
        let arg = |a: &Arg| -> Option<Option<Value>> {
            Some(match a {
                Arg::Text(s) => Some(Value::Text(s.clone())),
                Arg::Bool(b) => Some(Value::Bool(*b)),
                Arg::Null => None,
                Arg::Param(n) => param(*n)?.map(|bytes| Value::Bytes(bytes.to_vec())),
            })
        };
        let (Some(name), Some(value), Some(local)) = (arg(&self.name), arg(&self.value), arg(&self.local))
        else {
            return Resolved::Unknown;
        };
        // set_config(NULL, ...) is an error; NULL is_local means false.
        let local = match local {
            None => false,
            Some(v) => match v.as_bool() {
                Some(b) => b,
                None => return Resolved::Unknown,
            },
        };
        if local {
            return Resolved::Local;
        }
        let Some(name) = name.and_then(Value::into_text) else {
            return Resolved::Unknown;
        };
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Resolved::Unknown;
        }
        match value {
            // A NULL value resets the setting to its default.
            None => Resolved::Session(SessionCommand::Reset { name }),
            Some(v) => match v.into_text() {
                Some(v) => Resolved::Session(SessionCommand::Set {
                    name,
                    value: SettingValue::Text(v),
                }),
                None => Resolved::Unknown,
            },
        }
    }
}

enum Value {
    Text(String),
    Bool(bool),
    /// A parameter's bytes: text, in either format (text's binary form is its text).
    Bytes(Vec<u8>),
}

impl Value {
    fn into_text(self) -> Option<String> {
        match self {
            Value::Text(s) => Some(s),
            Value::Bool(_) => None,
            Value::Bytes(b) => String::from_utf8(b).ok().filter(|s| !s.contains('\0')),
        }
    }

    fn as_bool(&self) -> Option<bool> {
        let text = match self {
            Value::Bool(b) => return Some(*b),
            Value::Text(s) => s.as_str(),
            // A binary boolean is one byte.
            Value::Bytes(b) if b.len() == 1 && b.first().is_some_and(|c| *c <= 1) => {
                return b.first().map(|c| *c == 1);
            }
            Value::Bytes(b) => std::str::from_utf8(b).ok()?,
        };
        match text.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "on" | "1" | "y" | "yes" => Some(true),
            "f" | "false" | "off" | "0" | "n" | "no" => Some(false),
            _ => None,
        }
    }
}

/// `SELECT [pg_catalog.]set_config(a, b, c) [[AS] alias] [;]`, each argument a string
/// literal, `$n`, `true`, `false` or `NULL`, optionally cast (`::text`). `None` for anything
/// else.
pub fn call(sql: &str) -> Option<ConfigCall> {
    let mut t = Tokens {
        s: sql.as_bytes(),
        pos: 0,
    };
    if !t.word()?.eq_ignore_ascii_case("select") {
        return None;
    }
    let mut f = t.word()?;
    if f.eq_ignore_ascii_case("pg_catalog") {
        t.punct(b'.')?;
        f = t.word()?;
    }
    if !f.eq_ignore_ascii_case("set_config") {
        return None;
    }
    t.punct(b'(')?;
    let name = t.arg()?;
    t.punct(b',')?;
    let value = t.arg()?;
    t.punct(b',')?;
    let local = t.arg()?;
    t.punct(b')')?;
    // An alias, then at most one `;`.
    if t.peek().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') && t.word()?.eq_ignore_ascii_case("as")
    {
        t.word()?;
    }
    if t.peek() == Some(b';') {
        t.pos += 1;
    }
    t.peek().is_none().then_some(ConfigCall { name, value, local })
}

/// The Bind parameter `n` (1-based) from a whole Bind body: `Some(None)` for NULL, `None`
/// when it is missing or the body is malformed.
pub fn bind_param(body: &[u8], n: usize) -> Option<Option<&[u8]>> {
    bind_param_checked(body, n).ok().flatten()
}

fn bind_param_checked(body: &[u8], n: usize) -> Result<Option<Option<&[u8]>>, ProtoError> {
    let mut r = Reader::new(body);
    r.cstr("portal name")?;
    r.cstr("statement name")?;
    let formats = usize::try_from(r.i16("format count")?).map_err(|_| ProtoError::Invalid("format count"))?;
    r.bytes(formats * 2, "formats")?;
    let count =
        usize::try_from(r.i16("parameter count")?).map_err(|_| ProtoError::Invalid("parameter count"))?;
    if n == 0 || n > count {
        return Ok(None);
    }
    for i in 1..=count {
        let len = r.i32("parameter length")?;
        let value = match usize::try_from(len) {
            Ok(len) => Some(r.bytes(len, "parameter")?),
            Err(_) => None,
        };
        if i == n {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

struct Tokens<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Tokens<'a> {
    /// The next byte after blanks and comments; `None` at the end (or in an unterminated
    /// comment).
    fn peek(&mut self) -> Option<u8> {
        loop {
            match (self.s.get(self.pos).copied(), self.s.get(self.pos + 1).copied()) {
                (Some(c), _) if c.is_ascii_whitespace() => self.pos += 1,
                (Some(b'-'), Some(b'-')) => {
                    while let Some(c) = self.s.get(self.pos).copied() {
                        self.pos += 1;
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    let end = self.s.get(self.pos + 2..)?.windows(2).position(|w| w == b"*/")?;
                    self.pos += 2 + end + 2;
                }
                (c, _) => return c,
            }
        }
    }

    fn punct(&mut self, p: u8) -> Option<()> {
        (self.peek()? == p).then(|| self.pos += 1)
    }

    /// An unquoted word.
    fn word(&mut self) -> Option<&'a str> {
        self.peek()?;
        let rest = self.s.get(self.pos..)?;
        let len = rest
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
            .unwrap_or(rest.len());
        let word = std::str::from_utf8(rest.get(..len)?).ok()?;
        self.pos += len;
        (!word.is_empty()).then_some(word)
    }

    fn arg(&mut self) -> Option<Arg> {
        let arg = match self.peek()? {
            b'\'' => Arg::Text(self.literal()?),
            b'$' => {
                self.pos += 1;
                let rest = self.s.get(self.pos..)?;
                let len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
                let n = std::str::from_utf8(rest.get(..len)?).ok()?.parse().ok()?;
                self.pos += len;
                Arg::Param(n)
            }
            _ => {
                let w = self.word()?;
                if w.eq_ignore_ascii_case("true") {
                    Arg::Bool(true)
                } else if w.eq_ignore_ascii_case("false") {
                    Arg::Bool(false)
                } else if w.eq_ignore_ascii_case("null") {
                    Arg::Null
                } else {
                    return None;
                }
            }
        };
        // An optional cast to a plain type name.
        if self.peek() == Some(b':') {
            if self.s.get(self.pos..self.pos + 2) != Some(b"::") {
                return None;
            }
            self.pos += 2;
            let ty = self.word()?;
            if !["text", "varchar", "bool", "boolean"]
                .iter()
                .any(|k| ty.eq_ignore_ascii_case(k))
            {
                return None;
            }
        }
        Some(arg)
    }

    /// A standard string literal (`'…'`, quotes doubled). A backslash makes it `None`: its
    /// meaning depends on `standard_conforming_strings`.
    fn literal(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.pos)?;
            self.pos += 1;
            match c {
                b'\\' => return None,
                b'\'' if self.s.get(self.pos) == Some(&b'\'') => {
                    self.pos += 1;
                    out.push(b'\'');
                }
                b'\'' => break,
                c => out.push(c),
            }
        }
        String::from_utf8(out).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(sql: &str) -> Resolved {
        call(sql).map_or(Resolved::Unknown, |c| c.resolve_literal())
    }

    fn set(name: &str, value: &str) -> Resolved {
        Resolved::Session(SessionCommand::Set {
            name: name.into(),
            value: SettingValue::Text(value.into()),
        })
    }

    #[test]
    fn recognises_literal_calls() {
        assert_eq!(
            session("SELECT set_config('app.tenant', '42', false)"),
            set("app.tenant", "42")
        );
        assert_eq!(
            session(" select pg_catalog.set_config( 'App.User' , 'o''brien' , FALSE ) AS x ;"),
            set("app.user", "o'brien")
        );
        assert_eq!(
            session("/* rls */ SELECT set_config('a.b'::text, 'x'::text, 'f'::boolean) ctx"),
            set("a.b", "x")
        );
        assert_eq!(
            session("SELECT set_config('a.b', NULL, false)"),
            Resolved::Session(SessionCommand::Reset { name: "a.b".into() })
        );
        assert_eq!(session("SELECT set_config('a.b', 'x', true)"), Resolved::Local);
        assert_eq!(session("SELECT set_config('a.b', 'x', 'on')"), Resolved::Local);
        for not in [
            "SELECT set_config('a.b', 'x', false), 1",
            "SELECT set_config('a.b', 'x', false); SELECT 1",
            "SELECT set_config('a.b', 'x\\y', false)",
            "SELECT set_config('a.b', E'x', false)",
            "SELECT set_config('a.b', current_user, false)",
            "SELECT set_config('a.b', 'x' || 'y', false)",
            "SELECT 1 FROM t WHERE set_config('a.b', 'x', false) = 'x'",
            "SELECT set_config('a.b', 'x')",
            "SELECT set_config('a.b', 'x', false",
            "SELECT set_config('a.b', 'x', 'maybe')",
            "SELECT set_config('a.b', 'x', false)::int",
        ] {
            assert_eq!(session(not), Resolved::Unknown, "{not}");
        }
    }

    /// A Bind body: no portal or statement name, text formats, these parameters.
    fn bind(params: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn resolves_parameters_from_the_bind() {
        let Some(c) = call("SELECT set_config($1, $2, $3)") else {
            panic!("not recognised");
        };
        assert!(c.has_params());
        let resolve = |params: &[Option<&[u8]>]| {
            let body = bind(params);
            c.resolve(|n| bind_param(&body, n))
        };
        assert_eq!(
            resolve(&[Some(b"app.tenant"), Some(b"7"), Some(b"false")]),
            set("app.tenant", "7")
        );
        assert_eq!(
            resolve(&[Some(b"app.tenant"), Some(b"7"), Some(&[0])]),
            set("app.tenant", "7")
        );
        assert_eq!(
            resolve(&[Some(b"app.tenant"), Some(b"7"), Some(b"t")]),
            Resolved::Local
        );
        assert_eq!(
            resolve(&[Some(b"app.tenant"), None, None]),
            Resolved::Session(SessionCommand::Reset {
                name: "app.tenant".into()
            })
        );
        assert_eq!(resolve(&[Some(b"app.tenant"), Some(b"7")]), Resolved::Unknown);
        assert_eq!(resolve(&[None, Some(b"7"), Some(b"f")]), Resolved::Unknown);
        assert_eq!(
            resolve(&[Some(&[0xff]), Some(b"7"), Some(b"f")]),
            Resolved::Unknown
        );
        assert_eq!(c.resolve(|n| bind_param(&[0, 0, 1], n)), Resolved::Unknown);
    }
}
