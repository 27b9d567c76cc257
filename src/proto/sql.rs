//! The few SQL statements the proxy must recognise to keep session state right under
//! transaction pooling: SET / RESET / RESET ALL / DISCARD ALL / DEALLOCATE. A cheap prefix check
//! on a single statement, not a SQL parser: anything it does not recognise is `None` and is
//! relayed untouched.

use crate::proto::set_config::{self, ConfigCall, Resolved};
use crate::settings::SettingValue;

/// A recognised session-state statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// `SET [SESSION] name {TO|=} value`: the value as SQL text, to replay as is.
    Set {
        /// Lowercased setting name.
        name: String,
        /// The value: a `SET`'s value expression verbatim, or a `set_config` call's text.
        value: SettingValue,
    },
    /// `RESET name` or `SET name {TO|=} DEFAULT`.
    Reset {
        /// Lowercased setting name.
        name: String,
    },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`.
    DiscardAll,
    /// `DEALLOCATE [PREPARE] name`, or `ALL` when `None`.
    Deallocate(Option<String>),
    /// `UNLISTEN channel`, or `*` when `None` (it also ends what the client listens on
    /// through the proxy's notification hub).
    Unlisten(Option<String>),
    /// `LISTEN channel` inside a transaction block, served by the proxy's notification hub
    /// (never from `classify`: the relay records it).
    Listen(String),
    /// `SELECT set_config(…)` with parameters: a `Set` or `Reset` once a Bind brings them
    /// (`proto::set_config`).
    SetConfig(ConfigCall),
    /// `SAVEPOINT name`.
    Savepoint(String),
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`: undoes what ran since.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
}

/// Classifies one statement; `None` when it is anything else (including several statements,
/// `SET LOCAL`, `SET TRANSACTION`, `SET CONSTRAINTS`, `SET SESSION CHARACTERISTICS`: those
/// last only as long as the transaction). `SET ROLE` and `SET SESSION AUTHORIZATION` (and
/// their RESETs) are the settings `role` and `session_authorization`.
pub fn classify(sql: &str) -> Option<SessionCommand> {
    let (first, after) = split_word(skip_comments(sql)?);
    if first.eq_ignore_ascii_case("select") {
        // Almost every statement: decided from the next word's first bytes.
        let next = after.trim_ascii_start().as_bytes();
        let starts = |w: &[u8]| next.get(..w.len()).is_some_and(|n| n.eq_ignore_ascii_case(w));
        if !(starts(b"set_config") || starts(b"pg_catalog") || starts(b"/*") || starts(b"--")) {
            return None;
        }
        let call = set_config::call(sql)?;
        if call.has_params() {
            return Some(SessionCommand::SetConfig(call));
        }
        return match call.resolve_literal() {
            Resolved::Session(cmd) => Some(cmd),
            Resolved::Local | Resolved::Unknown => None,
        };
    }
    if first.eq_ignore_ascii_case("unlisten") {
        return match listen_command(sql)? {
            ListenCommand::Unlisten(channel) => Some(SessionCommand::Unlisten(channel)),
            ListenCommand::Listen(_) => None,
        };
    }
    const FIRST: [&str; 7] = [
        "set",
        "reset",
        "discard",
        "deallocate",
        "savepoint",
        "rollback",
        "release",
    ];
    if !FIRST.iter().any(|k| first.eq_ignore_ascii_case(k)) {
        return None;
    }
    let stmt = single_statement(sql)?;
    let mut w = Words::new(stmt);
    // Most statements are none of these: decided from the first word, without allocating.
    let first = w.keyword()?;
    let first = FIRST.into_iter().find(|k| first.eq_ignore_ascii_case(k))?;
    match first {
        "savepoint" => savepoint_name(&mut w, false).map(SessionCommand::Savepoint),
        "release" => savepoint_name(&mut w, true).map(SessionCommand::Release),
        "rollback" => {
            // ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name
            let mut kw = w.keyword()?;
            if kw.eq_ignore_ascii_case("work") || kw.eq_ignore_ascii_case("transaction") {
                kw = w.keyword()?;
            }
            if !kw.eq_ignore_ascii_case("to") {
                return None;
            }
            savepoint_name(&mut w, true).map(SessionCommand::RollbackTo)
        }
        "set" => {
            let mut name = w.ident()?;
            if name == "session" {
                name = w.ident()?;
                if name == "authorization" {
                    // SET SESSION AUTHORIZATION user | DEFAULT
                    return identity_value(SESSION_AUTHORIZATION, w.rest(), "default");
                }
            }
            if name == "role" {
                // SET ROLE name | NONE, or the generic SET role {TO|=} value.
                let rest = w.rest().trim_start();
                let value = match rest.strip_prefix('=') {
                    Some(v) => v,
                    None => match split_word(rest) {
                        (kw, v) if kw.eq_ignore_ascii_case("to") => v,
                        _ => rest,
                    },
                };
                return identity_value(ROLE, value, "none");
            }
            if matches!(
                name.as_str(),
                "local" | "transaction" | "constraints" | "characteristics" | "authorization" | "time"
            ) {
                return None;
            }
            let rest = w.rest().trim_start();
            let value = if let Some(v) = rest.strip_prefix('=') {
                v
            } else {
                let (kw, v) = split_word(rest);
                if !kw.eq_ignore_ascii_case("to") {
                    return None;
                }
                v
            }
            .trim();
            if value.is_empty() {
                return None;
            }
            if value.eq_ignore_ascii_case("default") {
                return Some(SessionCommand::Reset { name });
            }
            Some(SessionCommand::Set {
                name,
                value: SettingValue::Sql(value.to_string()),
            })
        }
        "reset" => {
            let mut name = w.ident()?;
            if name == "session" {
                if w.ident()? != "authorization" {
                    return None;
                }
                name = SESSION_AUTHORIZATION.to_string();
            }
            if !w.rest().trim().is_empty() {
                return None;
            }
            match name.as_str() {
                "all" => Some(SessionCommand::ResetAll),
                "time" => None,
                _ => Some(SessionCommand::Reset { name }),
            }
        }
        "discard" => {
            let what = w.keyword()?;
            (what.eq_ignore_ascii_case("all") && w.rest().trim().is_empty())
                .then_some(SessionCommand::DiscardAll)
        }
        "deallocate" => {
            let mut name = w.ident_quoted()?;
            if name == ("prepare".to_string(), false) {
                name = w.ident_quoted()?;
            }
            if !w.rest().trim().is_empty() {
                return None;
            }
            let all = name == ("all".to_string(), false);
            Some(SessionCommand::Deallocate((!all).then_some(name.0)))
        }
        _ => None,
    }
}

/// A savepoint's name, the statement's last word: folded like an identifier. With
/// `keyword_optional`, after an optional `SAVEPOINT` (`RELEASE [SAVEPOINT] name`).
fn savepoint_name(w: &mut Words, keyword_optional: bool) -> Option<String> {
    if keyword_optional {
        let mut probe = Words::new(w.rest());
        if probe
            .keyword()
            .is_some_and(|k| k.eq_ignore_ascii_case("savepoint"))
        {
            *w = probe;
        }
    }
    let name = w.ident_quoted()?.0;
    (w.rest().trim().is_empty() && !name.is_empty()).then(|| truncate_identifier(name))
}

/// `LISTEN channel`, `UNLISTEN channel` or `UNLISTEN *`, alone in a query text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenCommand {
    /// `LISTEN channel`: the channel name as the backend sees it (folded, truncated).
    Listen(String),
    /// `UNLISTEN channel`, or `UNLISTEN *` when `None`.
    Unlisten(Option<String>),
}

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer ones are truncated.
const MAX_IDENTIFIER: usize = 63;

/// Recognises one `LISTEN` / `UNLISTEN` statement; `None` for anything else (including several
/// statements). Cheap for other texts: decided from the first word.
pub fn listen_command(sql: &str) -> Option<ListenCommand> {
    let (first, _) = split_word(skip_comments(sql)?);
    let listen = if first.eq_ignore_ascii_case("listen") {
        true
    } else if first.eq_ignore_ascii_case("unlisten") {
        false
    } else {
        return None;
    };
    let stmt = single_statement(sql)?;
    let mut w = Words::new(stmt);
    w.keyword()?;
    if !listen && w.rest().trim() == "*" {
        return Some(ListenCommand::Unlisten(None));
    }
    let channel = w.channel()?;
    if !w.rest().trim().is_empty() {
        return None;
    }
    Some(if listen {
        ListenCommand::Listen(channel)
    } else {
        ListenCommand::Unlisten(Some(channel))
    })
}

/// `name` cut to what PostgreSQL keeps of an identifier: 63 bytes, on a character boundary.
fn truncate_identifier(mut name: String) -> String {
    if name.len() > MAX_IDENTIFIER {
        let mut end = MAX_IDENTIFIER;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// The setting behind `SET SESSION AUTHORIZATION`; changing it also resets `role`.
pub const SESSION_AUTHORIZATION: &str = "session_authorization";
/// The setting behind `SET ROLE`.
pub const ROLE: &str = "role";

/// `SET ROLE` / `SET SESSION AUTHORIZATION` with `value`: `reset_word` (NONE, DEFAULT) is a
/// reset, anything else a value replayed as `SET "name" TO value`.
fn identity_value(name: &str, value: &str, reset_word: &str) -> Option<SessionCommand> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.eq_ignore_ascii_case(reset_word) {
        return Some(SessionCommand::Reset { name: name.into() });
    }
    Some(SessionCommand::Set {
        name: name.into(),
        value: SettingValue::Sql(value.to_string()),
    })
}

/// Whether `sql` is one statement that ends a transaction block: COMMIT, END, ROLLBACK or
/// ABORT, but not `ROLLBACK TO SAVEPOINT`, `COMMIT PREPARED` or `ROLLBACK PREPARED`.
/// Case-insensitive, comments skipped, no allocation.
pub fn ends_transaction_block(sql: &str) -> bool {
    let Some(stmt) = single_statement(sql) else {
        return false;
    };
    let (first, rest) = split_word(stmt);
    let (second, _) = split_word(skip_comments(rest).unwrap_or(""));
    ["commit", "end", "rollback", "abort"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k))
        && !["to", "prepared"].iter().any(|k| second.eq_ignore_ascii_case(k))
}

/// The statement without leading comments/whitespace and one trailing `;`; `None` if another
/// statement follows (a `;` outside quotes before the end).
fn single_statement(sql: &str) -> Option<&str> {
    let s = skip_comments(sql)?;
    let end = statement_end(s);
    let (stmt, tail) = s.split_at(end);
    let tail = tail.strip_prefix(';').unwrap_or(tail);
    tail.trim().is_empty().then_some(stmt.trim_end())
}

/// The text after leading whitespace and comments; `None` for an unterminated `/*`.
fn skip_comments(sql: &str) -> Option<&str> {
    let mut s = sql.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/")?.1.trim_start();
        } else {
            return Some(s);
        }
    }
}

/// Index of the first `;` outside quotes, or the length.
fn statement_end(s: &str) -> usize {
    let mut quote: Option<char> = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => return i,
            _ => {}
        }
    }
    s.len()
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    s.split_at(end)
}

struct Words<'a> {
    rest: &'a str,
}

impl<'a> Words<'a> {
    fn new(s: &'a str) -> Self {
        Words { rest: s }
    }

    /// An unquoted word, lowercased.
    /// An unquoted word, as written (compare it case-insensitively).
    fn keyword(&mut self) -> Option<&'a str> {
        let (w, rest) = split_word(self.rest);
        self.rest = rest;
        (!w.is_empty()).then_some(w)
    }

    /// An identifier: unquoted (lowercased, dots allowed for `ext.setting`) or "quoted".
    fn ident(&mut self) -> Option<String> {
        self.ident_quoted().map(|(name, _)| name)
    }

    /// An identifier and whether it was quoted (`"ALL"` is a name, `ALL` a keyword).
    fn ident_quoted(&mut self) -> Option<(String, bool)> {
        let s = self.rest.trim_start();
        if let Some(q) = s.strip_prefix('"') {
            // A doubled quote inside stands for one quote.
            let mut name = String::new();
            let mut chars = q.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if chars.peek().is_some_and(|&(_, n)| n == '"') {
                        chars.next();
                        name.push('"');
                        continue;
                    }
                    self.rest = q.get(i + 1..)?;
                    return Some((name, true));
                }
                name.push(c);
            }
            return None;
        }
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(s.len());
        let (w, rest) = s.split_at(end);
        self.rest = rest;
        (!w.is_empty()).then(|| (w.to_ascii_lowercase(), false))
    }

    /// A channel name: a "quoted" identifier, or an unquoted one (letters, digits, `_`, `$`;
    /// not starting with a digit or `$`), lowercased; truncated as the backend does.
    fn channel(&mut self) -> Option<String> {
        let s = self.rest.trim_start();
        if s.starts_with('"') {
            let (name, _) = self.ident_quoted()?;
            return (!name.is_empty()).then(|| truncate_identifier(name));
        }
        let first = s.chars().next()?;
        if !(first.is_alphabetic() || first == '_') {
            return None;
        }
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        let (w, rest) = s.split_at(end);
        self.rest = rest;
        Some(truncate_identifier(w.to_ascii_lowercase()))
    }

    fn rest(&self) -> &'a str {
        self.rest
    }
}

#[cfg(test)]
mod tests {
    use super::SessionCommand::*;
    use super::*;

    fn set(name: &str, value: &str) -> Option<SessionCommand> {
        Some(Set {
            name: name.into(),
            value: SettingValue::Sql(value.into()),
        })
    }

    #[test]
    fn recognises_listen_statements() {
        use super::ListenCommand::*;
        assert_eq!(listen_command("LISTEN jobs"), Some(Listen("jobs".into())));
        assert_eq!(
            listen_command(" listen Jobs_2$ ;"),
            Some(Listen("jobs_2$".into()))
        );
        assert_eq!(
            listen_command("/* c */ LISTEN \"Mixed \"\"Case\"\"\""),
            Some(Listen("Mixed \"Case\"".into()))
        );
        assert_eq!(
            listen_command("unlisten jobs"),
            Some(Unlisten(Some("jobs".into())))
        );
        assert_eq!(listen_command("UNLISTEN *"), Some(Unlisten(None)));
        assert_eq!(listen_command("UNLISTEN \"*\""), Some(Unlisten(Some("*".into()))));
        let long = "a".repeat(70);
        assert_eq!(
            listen_command(&format!("LISTEN {long}")),
            Some(Listen("a".repeat(63)))
        );
        let wide = "é".repeat(40);
        assert_eq!(
            listen_command(&format!("LISTEN \"{wide}\"")),
            Some(Listen("é".repeat(31)))
        );
        for not in [
            "LISTEN",
            "LISTEN *",
            "LISTEN a b",
            "LISTEN a; LISTEN b",
            "LISTEN 1a",
            "LISTEN \"\"",
            "LISTENER x",
            "select 1",
            "LISTEN a.b",
        ] {
            assert_eq!(listen_command(not), None, "{not}");
        }
    }

    #[test]
    fn recognises_savepoint_statements() {
        let sp = |n: &str| Some(Savepoint(n.into()));
        assert_eq!(classify("SAVEPOINT a"), sp("a"));
        assert_eq!(classify(" savepoint \"B c\";"), sp("B c"));
        assert_eq!(classify("ROLLBACK TO SAVEPOINT a"), Some(RollbackTo("a".into())));
        assert_eq!(classify("rollback to A"), Some(RollbackTo("a".into())));
        assert_eq!(
            classify("ROLLBACK TRANSACTION TO SAVEPOINT x1"),
            Some(RollbackTo("x1".into()))
        );
        assert_eq!(classify("RELEASE SAVEPOINT a"), Some(Release("a".into())));
        assert_eq!(classify("release a"), Some(Release("a".into())));
        for not in [
            "ROLLBACK",
            "ROLLBACK PREPARED 'x'",
            "SAVEPOINT a; SELECT 1",
            "SAVEPOINT",
            "ROLLBACK TO",
        ] {
            assert_eq!(classify(not), None, "{not}");
        }
    }

    #[test]
    fn recognises_session_statements() {
        assert_eq!(
            classify("SET statement_timeout = '5s'"),
            set("statement_timeout", "'5s'")
        );
        assert_eq!(
            classify("  set Search_Path to public, \"My Schema\";"),
            set("search_path", "public, \"My Schema\"")
        );
        assert_eq!(
            classify("SET SESSION work_mem TO 65536"),
            set("work_mem", "65536")
        );
        assert_eq!(classify("-- c\nset myext.flag = on"), set("myext.flag", "on"));
        assert_eq!(classify("SET x TO DEFAULT"), Some(Reset { name: "x".into() }));
        assert_eq!(
            classify("RESET search_path"),
            Some(Reset {
                name: "search_path".into()
            })
        );
        assert_eq!(classify("reset all;"), Some(ResetAll));
        assert_eq!(classify("DISCARD ALL"), Some(DiscardAll));
        assert_eq!(classify("DEALLOCATE s1"), Some(Deallocate(Some("s1".into()))));
        assert_eq!(
            classify("deallocate prepare \"S 2\""),
            Some(Deallocate(Some("S 2".into())))
        );
        assert_eq!(classify("DEALLOCATE ALL"), Some(Deallocate(None)));
        assert_eq!(classify("SET ROLE admin"), set("role", "admin"));
        assert_eq!(classify("set role = 'x'"), set("role", "'x'"));
        assert_eq!(classify("SET SESSION ROLE \"Ad\""), set("role", "\"Ad\""));
        assert_eq!(classify("SET ROLE NONE"), Some(Reset { name: "role".into() }));
        assert_eq!(classify("RESET ROLE;"), Some(Reset { name: "role".into() }));
        assert_eq!(
            classify("SET SESSION AUTHORIZATION bob"),
            set("session_authorization", "bob")
        );
        let reset_auth = Some(Reset {
            name: "session_authorization".into(),
        });
        assert_eq!(classify("SET SESSION AUTHORIZATION DEFAULT"), reset_auth);
        assert_eq!(classify("reset session authorization"), reset_auth);
        assert_eq!(
            classify("DEALLOCATE \"all\""),
            Some(Deallocate(Some("all".into())))
        );
        assert_eq!(
            classify("DEALLOCATE \"a\"\"b\""),
            Some(Deallocate(Some("a\"b".into())))
        );
    }

    #[test]
    fn leaves_everything_else_alone() {
        for sql in [
            "SET LOCAL statement_timeout = 1",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SET TIME ZONE 'UTC'",
            "SET a = 1; SELECT 1",
            "SELECT 'SET a = 1'",
            "DISCARD PLANS",
            "RESET SESSION foo",
            "SET",
            "SET a",
        ] {
            assert_eq!(classify(sql), None, "{sql}");
        }
        assert_eq!(classify("SET a = 'x;y'"), set("a", "'x;y'"));
    }

    #[test]
    fn recognises_the_end_of_a_transaction_block() {
        for sql in [
            "ROLLBACK",
            "rollback;",
            "/* app */ Rollback work",
            "abort",
            "COMMIT",
            "end transaction;",
        ] {
            assert!(ends_transaction_block(sql), "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "rollback /* x */ to a",
            "COMMIT PREPARED 'x'",
            "select 1",
            "rollback; select 1",
            "",
        ] {
            assert!(!ends_transaction_block(sql), "{sql}");
        }
    }
}
