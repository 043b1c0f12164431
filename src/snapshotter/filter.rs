//! containerd's filter syntax for `List` (Walk): `fieldpath[op value][,…]`, where a request's
//! filter strings are alternatives (any may match) and the comma-separated selectors of one
//! string must all match. Field paths are `name`, `parent`, `kind` and `labels.KEY` (a segment
//! may be quoted: `labels."containerd.io/snapshot.ref"`); operators are `==`, `!=` and `~=`
//! (regular expression); a selector without an operator asks that the field be present and
//! non-empty. Values may be bare or quoted (`"…"` with backslash escapes, or `/…/`).
//!
//! containerd itself lists a remote snapshotter's snapshots with
//! `labels."containerd.io/snapshot.ref"==TARGET,parent=="PARENT"` to find the one it was told
//! exists, so this must be exact.

use super::meta::Snapshot;
use super::SnapshotterError;

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed list of filters: matches when any alternative matches.
#[derive(Debug, Default)]
pub struct Filter {
    alternatives: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses a request's filter strings (empty strings are ignored; no filters match all).
    pub fn parse(filters: &[String]) -> Result<Filter, SnapshotterError> {
        let mut alternatives = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let selectors = split_outside_quotes(f, ',')
                .into_iter()
                .map(|s| parse_selector(&s).map_err(|e| SnapshotterError::Filter(f.clone(), e)))
                .collect::<Result<Vec<_>, _>>()?;
            alternatives.push(selectors);
        }
        Ok(Filter { alternatives })
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|sel| sel.matches(s)))
    }
}

impl Selector {
    fn matches(&self, s: &Snapshot) -> bool {
        let value: Option<&str> = match self.path.as_slice() {
            [f] if f == "name" => Some(&s.name),
            [f] if f == "parent" => Some(&s.parent),
            [f] if f == "kind" => Some(s.kind.as_str()),
            [f, key @ ..] if f == "labels" && !key.is_empty() => {
                s.labels.get(&key.join(".")).map(String::as_str)
            }
            _ => None,
        };
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty()),
            // containerd compares a missing field as absent: `==` fails, `!=` holds.
            Op::Equal(want) => value == Some(want.as_str()),
            Op::NotEqual(want) => value != Some(want.as_str()),
            Op::Matches(re) => value.is_some_and(|v| re.is_match(v)),
        }
    }
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    let s = s.trim();
    let (path, op) = match find_operator(s) {
        None => (s, None),
        Some((at, op)) => (&s[..at], Some((op, s[at + 2..].trim()))),
    };
    let path = split_outside_quotes(path.trim(), '.')
        .into_iter()
        .map(|seg| unquote(seg.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if path.iter().any(String::is_empty) {
        return Err(format!("empty field in {s:?}"));
    }
    let op = match op {
        None => Op::Present,
        Some((op, value)) => {
            let value = unquote(value)?;
            match op {
                "==" => Op::Equal(value),
                "!=" => Op::NotEqual(value),
                _ => Op::Matches(regex::Regex::new(&value).map_err(|e| e.to_string())?),
            }
        }
    };
    Ok(Selector { path, op })
}

/// The first `==`, `!=` or `~=` outside quotes: its byte position and text.
fn find_operator(s: &str) -> Option<(usize, &str)> {
    let bytes = s.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == b'\\' && q == b'"' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' => quote = Some(b),
            None if i + 1 < bytes.len()
                && bytes[i + 1] == b'='
                && matches!(b, b'=' | b'!' | b'~') =>
            {
                return Some((i, &s[i..i + 2]));
            }
            None => {}
        }
        i += 1;
    }
    None
}

/// Splits at `sep` where it is outside `"…"` and `/…/` quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in s.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' => quote = Some('"'),
            // A regex value starts right after `~=`.
            None if c == '/' && current.ends_with("~=") => quote = Some('/'),
            None if c == sep => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            None => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

fn unquote(s: &str) -> Result<String, String> {
    let quoted = |open: char| s.len() >= 2 && s.starts_with(open) && s.ends_with(open);
    if quoted('/') {
        return Ok(s[1..s.len() - 1].to_string());
    }
    if !quoted('"') {
        if s.contains('"') {
            return Err(format!("unbalanced quote in {s:?}"));
        }
        return Ok(s.to_string());
    }
    let mut out = String::new();
    let mut chars = s[1..s.len() - 1].chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(c) => out.push(c),
            None => return Err(format!("dangling escape in {s:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::meta::Kind;
    use super::*;

    fn snapshot(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: 1,
            name: name.into(),
            parent: parent.into(),
            kind,
            created: chrono::Utc::now(),
            updated: chrono::Utc::now(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            lazy: None,
            usage: None,
        }
    }

    fn matches(filters: &[&str], s: &Snapshot) -> bool {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        Filter::parse(&filters).unwrap().matches(s)
    }

    #[test]
    fn containerds_remote_snapshot_lookup() {
        let target = "sha256:0123abcd";
        let s = snapshot(
            target,
            "default/4/parent",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", target)],
        );
        let f =
            format!(r#"labels."containerd.io/snapshot.ref"=={target},parent=="default/4/parent""#);
        assert!(matches(&[&f], &s));
        let other_parent = format!(r#"labels."containerd.io/snapshot.ref"=={target},parent=="""#);
        assert!(!matches(&[&other_parent], &s));
        let no_parent = snapshot(
            target,
            "",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", target)],
        );
        assert!(matches(&[&other_parent], &no_parent));
    }

    #[test]
    fn operators_presence_and_alternatives() {
        let s = snapshot("k1", "p", Kind::Active, &[("a.b", "x,y"), ("empty", "")]);
        assert!(matches(&[], &s));
        assert!(matches(&["kind==active"], &s));
        assert!(!matches(&["kind==committed"], &s));
        assert!(matches(&["kind==committed", "name==k1"], &s));
        assert!(matches(&["kind!=view,name~=^k[0-9]$"], &s));
        assert!(matches(&["name~=/^k/"], &s));
        assert!(matches(&[r#"labels."a.b"=="x,y""#], &s));
        assert!(matches(&["labels.a.b"], &s));
        assert!(!matches(&["labels.empty"], &s));
        assert!(!matches(&["labels.missing"], &s));
        assert!(matches(&["labels.missing!=z"], &s));
        assert!(matches(&["parent"], &s));
        assert!(!matches(&["bogus==k1"], &s));
    }

    #[test]
    fn bad_filters_are_errors() {
        for bad in [r#"name=="unterminated"#, "name~=(", "labels..x==1"] {
            assert!(Filter::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
