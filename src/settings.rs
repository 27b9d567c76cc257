//! Session settings as the proxy tracks them, for a client (what its session should see) and
//! for a server connection (what is set on it), and the SQL that turns one into the other.

use std::collections::{BTreeMap, BTreeSet};

use crate::proto::frontend::quote_literal;

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

/// SQL that brings a server connection from `applied` (plus `stale` names, whose value on the
/// server is unknown) to `wanted`: one simple-query string, empty when nothing differs.
pub fn settings_sql(applied: &Settings, stale: &BTreeSet<String>, wanted: &Settings) -> String {
    let mut config = Vec::new();
    let mut sql = String::new();
    for (name, value) in wanted {
        if applied.get(name) == Some(value) && !stale.contains(name) {
            continue;
        }
        match value {
            SettingValue::Text(v) => config.push(format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(v)
            )),
            SettingValue::Sql(v) => {
                sql.push_str(&format!("SET {} TO {v};", quote_ident(name)));
            }
        }
    }
    let mut out = String::new();
    if !config.is_empty() {
        out.push_str("SELECT ");
        out.push_str(&config.join(", "));
        out.push(';');
    }
    out.push_str(&sql);
    let leftovers = applied
        .keys()
        .chain(stale.iter())
        .filter(|n| !wanted.contains_key(*n));
    for name in leftovers.collect::<BTreeSet<_>>() {
        out.push_str("RESET ");
        out.push_str(&quote_ident(name));
        out.push(';');
    }
    out
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
            "SELECT pg_catalog.set_config('a', '1', false), pg_catalog.set_config('c', 'x''y', false);\
             SET \"t\" TO '5s';RESET \"b\";RESET \"z\";"
        );
        assert_eq!(settings_sql(&wanted, &BTreeSet::new(), &wanted), "");
    }
}
