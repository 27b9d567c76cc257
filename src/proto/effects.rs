//! What a query text may leave on its server connection's session beyond the transaction:
//! state the proxy cannot replay on another connection, so the client must keep its
//! connection (be *pinned*) while the state exists. A small lexer over the text (comments,
//! quoted identifiers, string, escape-string and dollar quoting handled), no SQL parser: it
//! looks at each statement's leading keywords and at function-call names.
//!
//! Two kinds of finding:
//! - state whose end the proxy can observe (temporary tables, session advisory locks,
//!   `WITH HOLD` cursors, SQL-level prepared statements, LISTEN): the statement asks for a
//!   *probe* of the session after the transaction, and so do, for a pinned client, the
//!   statements that may end that state (`pg_advisory_unlock*`, `CLOSE`, `DEALLOCATE`,
//!   `DISCARD`, `DROP`, `UNLISTEN`);
//! - state it cannot observe (`LOAD`, `SET` inside a multi-statement string or a `DO` block,
//!   `set_config` other than alone with arguments the proxy can read, `proto::set_config`):
//!   the client stays pinned until `DISCARD ALL` or until it leaves.

use crate::proto::set_config::{self, Resolved};

/// Findings in one query text, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects(u8);

impl Effects {
    /// Nothing of interest.
    pub const NONE: Effects = Effects(0);
    /// May create observable session state: probe the session after the transaction.
    pub const STATE: Effects = Effects(1);
    /// May end observable session state: probe a pinned client's session after the
    /// transaction.
    pub const RELEASE: Effects = Effects(2);
    /// Leaves state the proxy cannot observe: pinned until DISCARD ALL.
    pub const UNTRACKED: Effects = Effects(4);
    /// Loads a library (`LOAD`): pinned, and the connection is not reused afterwards.
    pub const LOAD: Effects = Effects(8);
    /// The text was not read (too long, or a statement the proxy does not map): it may
    /// create observable state (with `STATE`), which only the probe will tell.
    pub const UNREAD: Effects = Effects(16);

    /// Whether any finding of `other` is in `self`.
    pub fn has(self, other: Effects) -> bool {
        self.0 & other.0 != 0
    }

    /// Leaves session state behind (what pins a client, or what `session_state = "reject"`
    /// refuses).
    pub fn leaves_state(self) -> bool {
        self.has(Effects::STATE | Effects::UNTRACKED | Effects::LOAD)
    }

    /// Nothing found.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Effects {
    type Output = Effects;
    fn bitor(self, rhs: Effects) -> Effects {
        Effects(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Effects {
    fn bitor_assign(&mut self, rhs: Effects) {
        self.0 |= rhs.0;
    }
}

/// Function names whose call may take a session-level advisory lock (the transaction-level
/// `pg_advisory_xact_lock*` ones are released at commit by the backend).
const ADVISORY_LOCK: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];
/// ... and release one.
const ADVISORY_UNLOCK: [&str; 3] = [
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
];

/// Examines a whole query text (a simple Query, which may hold several statements, or a
/// Parse, which holds one).
pub fn effects(sql: &[u8]) -> Effects {
    if !may_matter(sql) {
        return Effects::NONE;
    }
    let mut found = Effects::NONE;
    let mut lexer = Lexer::new(sql);
    let mut statements = 0usize;
    let mut sets = 0usize;
    loop {
        let s = statement(&mut lexer);
        if s.empty {
            if s.last {
                break;
            }
            continue;
        }
        statements += 1;
        found |= s.effects;
        if s.set {
            sets += 1;
        }
        if s.set_config {
            match set_config_kind(sql.get(s.text.clone()).unwrap_or_default()) {
                ConfigKind::Local => {}
                ConfigKind::Session => sets += 1,
                ConfigKind::Other => found |= Effects::UNTRACKED,
            }
        }
        if s.last {
            break;
        }
    }
    // One SET (or carried set_config) alone is tracked and replayed (proto::sql::classify);
    // among other statements it is not.
    if sets > 0 && statements > 1 {
        found |= Effects::UNTRACKED;
    }
    found
}

/// What a statement calling `set_config` is.
enum ConfigKind {
    /// A transaction-local call.
    Local,
    /// A session setting the proxy carries when the statement is alone in its text (one
    /// with parameters is decided at its Bind).
    Session,
    /// Anything else: not carried.
    Other,
}

fn set_config_kind(stmt: &[u8]) -> ConfigKind {
    let Some(call) = std::str::from_utf8(stmt).ok().and_then(set_config::call) else {
        return ConfigKind::Other;
    };
    if call.has_params() {
        return ConfigKind::Session;
    }
    match call.resolve_literal() {
        Resolved::Local => ConfigKind::Local,
        Resolved::Session(_) => ConfigKind::Session,
        Resolved::Unknown => ConfigKind::Other,
    }
}

/// Statements whose first word alone may make them matter.
const FIRST_WORDS: [&[u8]; 12] = [
    b"create",
    b"declare",
    b"prepare",
    b"listen",
    b"unlisten",
    b"close",
    b"deallocate",
    b"discard",
    b"drop",
    b"load",
    b"set",
    b"do",
];

/// The hot path's pre-check, one pass over the bytes: false only when the lexer would find
/// nothing (no interesting first word, no second statement, no `temp` word, no
/// `_advisory_`, `_try_advisory_` or `set_config` name). A text starting with a comment goes to the lexer.
fn may_matter(sql: &[u8]) -> bool {
    let start = sql
        .iter()
        .position(|c| !(c.is_ascii_whitespace() || *c == b'('))
        .unwrap_or(sql.len());
    let rest = sql.get(start..).unwrap_or_default();
    if matches!(rest.first(), Some(b'-' | b'/')) {
        return true;
    }
    let word_len = rest
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
        .unwrap_or(rest.len());
    let (first, rest) = rest.split_at(word_len);
    let initial = first.first().map(|c| c | 0x20);
    if FIRST_WORDS
        .iter()
        .any(|k| k.len() == first.len() && k.first() == initial.as_ref() && first.eq_ignore_ascii_case(k))
    {
        return true;
    }
    let at = |i: usize, word: &[u8]| {
        rest.get(i..i + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    // A second statement, or `pg_advisory_lock` and kin.
    for i in memchr::memchr2_iter(b'_', b';', rest) {
        let hit = if rest.get(i) == Some(&b';') {
            rest.get(i + 1..)
                .is_some_and(|tail| tail.iter().any(|c| !c.is_ascii_whitespace()))
        } else {
            at(i + 1, b"advisory_")
                || at(i + 1, b"try_advisory_")
                || (at(i + 1, b"config") && i.checked_sub(3).is_some_and(|s| at(s, b"set")))
        };
        if hit {
            return true;
        }
    }
    // "temp" as a word of its own (INTO TEMP t).
    for i in memchr::memchr2_iter(b't', b'T', rest) {
        let word_start = i
            .checked_sub(1)
            .and_then(|p| rest.get(p))
            .is_none_or(|p| !(p.is_ascii_alphanumeric() || *p == b'_'));
        if word_start && at(i, b"temp") {
            return true;
        }
    }
    false
}

/// One statement's findings.
struct Statement {
    effects: Effects,
    /// A session-level SET (not LOCAL / TRANSACTION / CONSTRAINTS / CHARACTERISTICS).
    set: bool,
    /// Calls `set_config(`.
    set_config: bool,
    /// Its text (without the `;`).
    text: std::ops::Range<usize>,
    /// No tokens.
    empty: bool,
    /// The text ended with it.
    last: bool,
}

fn statement(lx: &mut Lexer) -> Statement {
    let mut s = Statement {
        effects: Effects::NONE,
        set: false,
        set_config: false,
        text: lx.pos..lx.pos,
        empty: true,
        last: false,
    };
    let mut first: Option<Word> = None;
    let mut second: Option<Word> = None;
    let mut third: Option<Word> = None;
    let mut prev: Option<Word> = None;
    // Context for the leading keywords: "create [or replace] [global|local] temp".
    let mut index = 0usize;
    let mut create_temp = false;
    let mut on_commit_drop = 0u8;
    let mut with_hold = false;
    loop {
        let Some(tok) = lx.next() else {
            s.last = true;
            s.text.end = lx.text.len();
            break;
        };
        match tok {
            Token::Semicolon => {
                s.text.end = lx.pos.saturating_sub(1);
                break;
            }
            Token::Word(w) => {
                s.empty = false;
                index += 1;
                if index == 1 {
                    first = Some(w);
                } else if index == 2 {
                    second = Some(w);
                } else if index == 3 {
                    third = Some(w);
                }
                if let Some(f) = first {
                    if f.is("create") && index <= 5 && (w.is("temp") || w.is("temporary")) {
                        create_temp = true;
                    }
                    if f.is("declare") && prev.is_some_and(|p| p.is("with")) && w.is("hold") {
                        with_hold = true;
                    }
                }
                // ON COMMIT DROP, in order.
                on_commit_drop = match (on_commit_drop, w) {
                    (_, w) if w.is("on") => 1,
                    (1, w) if w.is("commit") => 2,
                    (2, w) if w.is("drop") => 3,
                    (3, _) => 3,
                    _ => 0,
                };
                if prev.is_some_and(|p| p.is("into")) && (w.is("temp") || w.is("temporary")) {
                    // SELECT ... INTO TEMP t
                    create_temp = true;
                }
                prev = Some(w);
                if w.text.len() == 10 && w.is("set_config") && lx.peek_open_paren() {
                    s.set_config = true;
                }
                if w.text.len() >= 16 && lx.peek_open_paren() {
                    if ADVISORY_LOCK.iter().any(|name| w.is(name)) {
                        s.effects |= Effects::STATE;
                    } else if ADVISORY_UNLOCK.iter().any(|name| w.is(name)) {
                        s.effects |= Effects::RELEASE;
                    }
                }
            }
            Token::DollarBody(body) => {
                s.empty = false;
                index += 1;
                if first.is_some_and(|f| f.is("do")) && body_sets(body) {
                    s.effects |= Effects::UNTRACKED;
                }
                prev = None;
            }
            Token::Other => {
                s.empty = false;
                index += 1;
                prev = None;
            }
        }
    }
    if (create_temp && on_commit_drop != 3) || with_hold {
        s.effects |= Effects::STATE;
    }
    if let Some(f) = first {
        let second_is = |k: &str| second.is_some_and(|w| w.is(k));
        if (f.is("prepare") && !second_is("transaction")) || f.is("listen") {
            s.effects |= Effects::STATE;
        }
        if ["close", "deallocate", "discard", "unlisten", "drop"]
            .iter()
            .any(|k| f.is(k))
        {
            s.effects |= Effects::RELEASE;
        }
        if f.is("load") {
            s.effects |= Effects::UNTRACKED | Effects::LOAD;
        }
        if f.is("set") && second_is("session") && third.is_some_and(|w| w.is("characteristics")) {
            // The session's default transaction mode: not a setting the proxy replays.
            s.effects |= Effects::UNTRACKED;
        } else if f.is("set")
            && !["local", "transaction", "constraints"]
                .iter()
                .any(|k| second_is(k))
        {
            s.set = true;
        }
    }
    s
}

/// Whether a DO block's body sets something for the session: a `SET` that starts a
/// statement (after `;`, `BEGIN`, `THEN`, `ELSE`, `LOOP` or at the start) and is not
/// `SET LOCAL`, or a `set_config(` call.
fn body_sets(body: &[u8]) -> bool {
    let mut lx = Lexer::new(body);
    let mut at_start = true;
    let mut pending_set = false;
    while let Some(tok) = lx.next() {
        match tok {
            Token::Word(w) => {
                if pending_set {
                    if !w.is("local") {
                        return true;
                    }
                    pending_set = false;
                }
                if at_start && w.is("set") {
                    pending_set = true;
                }
                if w.is("set_config") && lx.peek_open_paren() {
                    return true;
                }
                at_start = ["begin", "then", "else", "loop"].iter().any(|k| w.is(k));
            }
            Token::Semicolon => {
                if pending_set {
                    return true;
                }
                at_start = true;
            }
            Token::DollarBody(_) | Token::Other => {
                if pending_set {
                    return true;
                }
                at_start = false;
            }
        }
    }
    pending_set
}

/// A word (keyword or identifier) as written: compared case-insensitively. Quoted
/// identifiers compare exactly.
#[derive(Debug, Clone, Copy)]
struct Word<'a> {
    text: &'a [u8],
    quoted: bool,
}

impl Word<'_> {
    fn is(&self, k: &str) -> bool {
        if self.quoted {
            self.text == k.as_bytes()
        } else {
            self.text.eq_ignore_ascii_case(k.as_bytes())
        }
    }
}

enum Token<'a> {
    Word(Word<'a>),
    /// The body of a dollar-quoted string (`$tag$ … $tag$`).
    DollarBody(&'a [u8]),
    Semicolon,
    /// Anything else: punctuation, numbers, string literals, parameters.
    Other,
}

struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a [u8]) -> Self {
        Lexer { text, pos: 0 }
    }

    fn byte(&self, at: usize) -> Option<u8> {
        self.text.get(at).copied()
    }

    /// Whether the next non-blank, non-comment byte is `(`.
    fn peek_open_paren(&mut self) -> bool {
        self.skip_blank();
        self.byte(self.pos) == Some(b'(')
    }

    fn skip_blank(&mut self) {
        loop {
            match (self.byte(self.pos), self.byte(self.pos + 1)) {
                (Some(c), _) if c.is_ascii_whitespace() => self.pos += 1,
                (Some(b'-'), Some(b'-')) => {
                    while let Some(c) = self.byte(self.pos) {
                        self.pos += 1;
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    // Block comments nest.
                    self.pos += 2;
                    let mut depth = 1usize;
                    while depth > 0 {
                        match (self.byte(self.pos), self.byte(self.pos + 1)) {
                            (None, _) => return,
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Skips a quoted run ending at `quote` (doubled quotes stay inside); with `backslash`
    /// (E'…' strings) a backslash escapes the next byte.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        while let Some(c) = self.byte(self.pos) {
            self.pos += 1;
            if backslash && c == b'\\' {
                self.pos += 1;
            } else if c == quote {
                if self.byte(self.pos) == Some(quote) {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
    }

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_blank();
        let start = self.pos;
        let c = self.byte(start)?;
        self.pos += 1;
        let token = match c {
            b';' => Token::Semicolon,
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Token::Other
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                let end = self.pos.saturating_sub(1).max(start + 1);
                Token::Word(Word {
                    text: self.text.get(start + 1..end).unwrap_or_default(),
                    quoted: true,
                })
            }
            b'$' => self.dollar(start),
            c if c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 => {
                while self
                    .byte(self.pos)
                    .is_some_and(|c| c == b'_' || c == b'$' || c.is_ascii_alphanumeric() || c >= 0x80)
                {
                    self.pos += 1;
                }
                let text = self.text.get(start..self.pos).unwrap_or_default();
                if (text == b"e" || text == b"E") && self.byte(self.pos) == Some(b'\'') {
                    self.pos += 1;
                    self.skip_quoted(b'\'', true);
                    Token::Other
                } else {
                    Token::Word(Word { text, quoted: false })
                }
            }
            _ => Token::Other,
        };
        Some(token)
    }

    /// After a `$` at `start`: a parameter (`$1`), or a dollar-quoted string `$tag$…$tag$`.
    fn dollar(&mut self, start: usize) -> Token<'a> {
        let mut end = self.pos;
        while self.byte(end).is_some_and(|c| {
            c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 || (end > self.pos && c.is_ascii_digit())
        }) {
            end += 1;
        }
        if self.byte(end) != Some(b'$') {
            // $1, or a stray $.
            while self.byte(self.pos).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            return Token::Other;
        }
        let tag = self.text.get(start..=end).unwrap_or_default();
        let body_start = end + 1;
        let rest = self.text.get(body_start..).unwrap_or_default();
        match find(rest, tag) {
            Some(at) => {
                self.pos = body_start + at + tag.len();
                Token::DollarBody(rest.get(..at).unwrap_or_default())
            }
            None => {
                self.pos = self.text.len();
                Token::DollarBody(rest)
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(sql: &str) -> bool {
        effects(sql.as_bytes()).has(Effects::STATE)
    }

    fn release(sql: &str) -> bool {
        effects(sql.as_bytes()).has(Effects::RELEASE)
    }

    fn untracked(sql: &str) -> bool {
        effects(sql.as_bytes()).has(Effects::UNTRACKED)
    }

    #[test]
    fn ordinary_statements_find_nothing() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE t SET x = 1 WHERE id = 2",
            "INSERT INTO t VALUES ('create temp table x (a int)')",
            "SELECT 'pg_advisory_lock(1)', \"pg_advisory_lock\" FROM t",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_advisory_xact_lock_shared(1, 2)",
            "SELECT pg_try_advisory_xact_lock(7)",
            "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
            "create temporary table t on commit drop as select 1",
            "SET search_path = a, b",
            "SET LOCAL work_mem = '1MB'; SELECT 1",
            "-- create temp table x\nSELECT 1",
            "/* nested /* create temp table x */ load 'x' */ SELECT 1",
            "SELECT $$ ; SET a = 1; LOAD 'x' $$",
            "SELECT E'\\' ; load ''x'' ' AS a",
            "DO $$ BEGIN UPDATE t SET x = 1; PERFORM 1; END $$",
            "DO $body$ BEGIN SET LOCAL work_mem = '1MB'; END $body$",
            "PREPARE TRANSACTION 'x'",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT set_config('app.tenant', '42', false)",
            "select pg_catalog.set_config($1, $2, false)",
            "SELECT set_config('app.tenant', '42', true)",
            "SELECT current_setting('app.tenant')",
            "",
            ";;",
        ] {
            assert_eq!(effects(sql.as_bytes()), Effects::NONE, "{sql}");
        }
    }

    #[test]
    fn observable_state_asks_for_a_probe() {
        for sql in [
            "CREATE TEMP TABLE t (a int)",
            "create temporary table t (a int) on commit delete rows",
            "CREATE GLOBAL TEMPORARY TABLE t (a int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "SELECT 1 AS a INTO TEMP t",
            "select pg_advisory_lock(42)",
            "SELECT pg_catalog.pg_try_advisory_lock(1, 2)",
            "SELECT pg_try_advisory_lock_shared (5)",
            "SELECT \"pg_advisory_lock\"(1)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "declare c no scroll cursor with hold for select 1",
            "PREPARE q (int) AS SELECT $1",
            "LISTEN jobs",
            "BEGIN; SELECT pg_advisory_lock(1); COMMIT",
        ] {
            assert!(state(sql), "{sql}");
            assert!(!untracked(sql) && !release(sql), "{sql}");
        }
        for sql in [
            "select pg_advisory_unlock(42)",
            "SELECT pg_advisory_unlock_all()",
            "CLOSE ALL",
            "DEALLOCATE q",
            "DISCARD TEMP",
            "UNLISTEN *",
            "DROP TABLE t",
        ] {
            assert!(release(sql), "{sql}");
            assert!(!untracked(sql) && !state(sql), "{sql}");
        }
    }

    #[test]
    fn unobservable_state_pins() {
        for sql in [
            "LOAD 'auto_explain'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SET work_mem = '8MB'; SELECT 1",
            "SELECT 1; set search_path = x",
            "DO $$ BEGIN SET work_mem = '8MB'; END $$",
            "do $x$ begin if true then set role app; end if; end $x$",
            "DO $$ BEGIN PERFORM set_config('a.b', '1', false); END $$",
            "SELECT set_config('a.b', current_user, false)",
            "SELECT set_config('a.b', 'x', false), 1",
            "SELECT 1; SELECT set_config('a.b', 'x', false)",
            "UPDATE t SET x = set_config('a.b', 'x', false)",
        ] {
            assert!(untracked(sql), "{sql}");
        }
    }

    #[test]
    fn malformed_text_never_panics() {
        for sql in [
            "'unterminated",
            "\"unterminated",
            "$tag$ unterminated",
            "/* unterminated",
            "e'\\",
            "$",
            "$1",
            "$a",
            "SELECT pg_advisory_lock",
            "\u{e9}t\u{e9} $\u{e9}$ x $\u{e9}$",
        ] {
            let _ = effects(sql.as_bytes());
        }
    }
}
