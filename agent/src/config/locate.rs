//! Finds the line of a dotted key (`outbound[1].balancer`) in TOML text, for error messages.

/// The 1-based line where `key` is written in `text`, if it is written there.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let key = Key::parse(key)?;
    let mut array_count = 0usize;
    let mut in_target = key.table.is_empty();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let header = line
            .strip_prefix("[[")
            .and_then(|l| l.split("]]").next())
            .or_else(|| line.strip_prefix('[').and_then(|l| l.split(']').next()));
        if let Some(name) = header {
            let name = name.trim();
            if key.array_root.as_deref() == Some(name) && line.starts_with("[[") {
                array_count += 1;
            }
            // A bare top-level name ("inbound") may name a table header.
            if key.table.is_empty() && name == key.leaf {
                return Some(n + 1);
            }
            in_target = name == key.table && key.index.is_none_or(|i| array_count == i + 1);
            if in_target && key.leaf.is_empty() {
                return Some(n + 1);
            }
            continue;
        }
        if in_target && !key.leaf.is_empty() {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim().trim_matches('"') == key.leaf {
                    return Some(n + 1);
                }
            }
        }
    }
    None
}

/// A dotted key split for the search: `outbound[1].retry.attempts` is the key `attempts` of
/// table `outbound.retry` under the second `[[outbound]]`.
struct Key {
    array_root: Option<String>,
    index: Option<usize>,
    table: String,
    leaf: String,
}

impl Key {
    fn parse(key: &str) -> Option<Self> {
        let (array_root, index, flat) = match key.find('[') {
            Some(open) => {
                let close = key[open..].find(']')? + open;
                let root = key[..open].to_owned();
                let index = key[open + 1..close].parse().ok();
                let flat = format!("{root}{}", &key[close + 1..]);
                (Some(root), index, flat)
            }
            None => (None, None, key.to_owned()),
        };
        let (table, leaf) = match flat.rsplit_once('.') {
            Some((t, l)) => (t.to_owned(), l.to_owned()),
            None if index.is_some() => (flat, String::new()),
            None => (String::new(), flat),
        };
        Some(Self {
            array_root,
            index,
            table,
            leaf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = r#"
[agent]
node = "a"

[proxy]
max_conections = 5

[[outbound]]
service = "a"

[[outbound]]
service = "b"
balancer = "fastest"
[outbound.retry]
attemps = 3
"#;

    #[test]
    fn finds_keys_in_tables_and_arrays() {
        assert_eq!(line_of(TEXT, "proxy.max_conections"), Some(6));
        assert_eq!(line_of(TEXT, "outbound[1].balancer"), Some(13));
        assert_eq!(line_of(TEXT, "outbound[0].service"), Some(9));
        assert_eq!(line_of(TEXT, "outbound[1].retry.attemps"), Some(15));
        assert_eq!(line_of(TEXT, "nothing.here"), None);
        assert_eq!(line_of(TEXT, "proxy"), Some(5));
        assert_eq!(line_of(TEXT, "outbound[1]"), Some(11));
    }
}
