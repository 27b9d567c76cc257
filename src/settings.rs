//! Session settings as the proxy tracks them, for a client (what its session should see) and
//! for a server connection (what is set on it), and the SQL that turns one into the other.

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::frontend::quote_literal;
use crate::proto::sql::{ROLE, SESSION_AUTHORIZATION};

/// A setting's value as the proxy can replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingValue {
    /// A value as a startup packet, `-c` or ParameterStatus gives it: applied with
    /// `set_config(name, value, false)`, which parses it the same way.
    Text(String),
    /// The value expression of a client's own `SET name TO …`, replayed verbatim.
    Sql(String),
}

/// Settings by lowercased name.
pub type Settings = BTreeMap<String, SettingValue>;

/// The settings a backend lets a session change, by lowercased name: `pg_settings` without
/// its `internal` (read-only) ones. Which parameters the backend reports differs by version
/// and extension; only those in this set are ever replayed from a ParameterStatus.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayable(BTreeSet<String>);

impl Replayable {
    /// From a comma-separated list of names.
    pub fn parse(list: &str) -> Replayable {
        Replayable(
            list.split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect(),
        )
    }

    /// Whether `name` (lowercased) may be replayed.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Whether `name` survives `RESET ALL` (PostgreSQL's `GUC_NO_RESET_ALL` settings a client
/// can set): only `DISCARD ALL` or their own RESET bring these back.
pub fn survives_reset_all(name: &str) -> bool {
    name == ROLE || name == SESSION_AUTHORIZATION
}

/// SQL that brings a server connection from `applied` (plus `stale` names, whose value on the
/// server is unknown) to `wanted`: one simple-query string, empty when nothing differs.
///
/// The order follows privileges: the session user first (changing it also resets the role),
/// then the role back to the session user's if it changes, then the other settings (reset,
/// then set, with the session user's rights, as the client had when it set them before a
/// `SET ROLE`), and the client's role last.
pub fn settings_sql(applied: &Settings, stale: &BTreeSet<String>, wanted: &Settings) -> String {
    let differs = |name: &str| stale.contains(name) || applied.get(name) != wanted.get(name);
    let auth_changes = differs(SESSION_AUTHORIZATION);
    let role_changes = auth_changes || differs(ROLE);
    let mut out = String::new();
    if auth_changes {
        match wanted.get(SESSION_AUTHORIZATION) {
            Some(v) => push_set(&mut out, SESSION_AUTHORIZATION, v),
            None => push_reset(&mut out, SESSION_AUTHORIZATION),
        }
    } else if role_changes && (applied.contains_key(ROLE) || stale.contains(ROLE)) {
        push_reset(&mut out, ROLE);
    }
    let leftovers = applied
        .keys()
        .chain(stale.iter())
        .filter(|n| !wanted.contains_key(*n) && !survives_reset_all(n));
    for name in leftovers.collect::<BTreeSet<_>>() {
        push_reset(&mut out, name);
    }
    let mut config = Vec::new();
    for (name, value) in wanted {
        if survives_reset_all(name) || !differs(name) {
            continue;
        }
        match value {
            SettingValue::Text(v) => config.push(format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(v)
            )),
            SettingValue::Sql(_) => push_set(&mut out, name, value),
        }
    }
    if !config.is_empty() {
        out.push_str("SELECT ");
        out.push_str(&config.join(", "));
        out.push(';');
    }
    if role_changes {
        if let Some(v) = wanted.get(ROLE) {
            push_set(&mut out, ROLE, v);
        }
    }
    out
}

fn push_set(out: &mut String, name: &str, value: &SettingValue) {
    match value {
        SettingValue::Text(v) => out.push_str(&format!(
            "SELECT pg_catalog.set_config({}, {}, false);",
            quote_literal(name),
            quote_literal(v)
        )),
        SettingValue::Sql(v) => out.push_str(&format!("SET {} TO {v};", quote_ident(name))),
    }
}

fn push_reset(out: &mut String, name: &str) {
    out.push_str("RESET ");
    out.push_str(&quote_ident(name));
    out.push(';');
}

/// Quotes an identifier with double quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> SettingValue {
        SettingValue::Text(v.to_string())
    }

    #[test]
    fn sets_changes_and_resets_leftovers() {
        let applied: Settings = [("a".to_string(), text("1")), ("b".to_string(), text("2"))].into();
        let wanted: Settings = [
            ("a".to_string(), text("1")),
            ("c".to_string(), text("x'y")),
            ("t".to_string(), SettingValue::Sql("'5s'".into())),
        ]
        .into();
        let stale: BTreeSet<String> = ["a".to_string(), "z".to_string()].into();
        assert_eq!(
            settings_sql(&applied, &stale, &wanted),
            "RESET \"b\";RESET \"z\";SET \"t\" TO '5s';\
             SELECT pg_catalog.set_config('a', '1', false), pg_catalog.set_config('c', 'x''y', false);"
        );
        assert_eq!(settings_sql(&wanted, &BTreeSet::new(), &wanted), "");
    }

    fn sql(v: &str) -> SettingValue {
        SettingValue::Sql(v.to_string())
    }

    fn settings(pairs: &[(&str, SettingValue)]) -> Settings {
        pairs.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
    }

    #[test]
    fn role_goes_last_and_session_user_first() {
        let none = BTreeSet::new();
        // A superuser-only setting made before SET ROLE is replayed with the session user's
        // rights, then the role.
        let wanted = settings(&[("role", sql("app")), ("session_replication_role", sql("replica"))]);
        assert_eq!(
            settings_sql(&Settings::new(), &none, &wanted),
            "SET \"session_replication_role\" TO replica;SET \"role\" TO app;"
        );
        // Leaving a role: back to the session user before anything else.
        let applied = settings(&[("role", sql("app")), ("work_mem", sql("'8MB'"))]);
        assert_eq!(
            settings_sql(&applied, &none, &Settings::new()),
            "RESET \"role\";RESET \"work_mem\";"
        );
        // A new session user resets the role; the role is set again after it.
        let applied = settings(&[("role", sql("app"))]);
        let wanted = settings(&[("role", sql("app")), ("session_authorization", sql("bob"))]);
        assert_eq!(
            settings_sql(&applied, &none, &wanted),
            "SET \"session_authorization\" TO bob;SET \"role\" TO app;"
        );
        let applied = settings(&[("role", sql("app")), ("session_authorization", sql("bob"))]);
        assert_eq!(
            settings_sql(&applied, &none, &Settings::new()),
            "RESET \"session_authorization\";"
        );
        // Same role, nothing else: nothing to do.
        assert_eq!(settings_sql(&wanted, &none, &wanted), "");
    }
}
