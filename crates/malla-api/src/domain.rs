//! Domain names in egress rules (Calico's `destination.domains` and `allowedEgressDomains`,
//! ClusterNetworkPolicy's `domainNames`): what a pattern may be, and which names it matches.
//!
//! A pattern is a name (`api.example.com`) or a wildcard whose only `*` is its first label
//! (`*.example.com`), as upstream's `DomainName` type allows: labels of letters, digits, `-`
//! and `_`, neither starting nor ending with `-`, at most 63 bytes; at least two labels; no
//! trailing dot; at most 253 bytes. `*` stands for one or more whole labels: `*.example.com`
//! matches `a.example.com` and `a.b.example.com`, never `example.com`. Names compare without
//! case and without a trailing dot (answers carry one).

/// Why `pattern` is not a domain name pattern, or Ok.
pub fn check(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a domain name must not be empty".into());
    }
    if pattern.len() > 253 {
        return Err(format!("{pattern:?} is longer than 253 bytes"));
    }
    if pattern.ends_with('.') {
        return Err(format!("{pattern:?} must not end with a dot"));
    }
    let rest = pattern.strip_prefix("*.").unwrap_or(pattern);
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "{pattern:?} needs at least two labels after any leading \"*.\""
        ));
    }
    for l in labels {
        if l.contains('*') {
            return Err(format!(
                "{pattern:?}: a wildcard may only be the whole first label (\"*.example.com\")"
            ));
        }
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return Err(format!(
                "{pattern:?}: label {l:?} is not 1 to 63 of [A-Za-z0-9_-] without a leading or trailing '-'"
            ));
        }
    }
    Ok(())
}

/// A name as compared: lower case, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether the (valid) `pattern` matches `name` (any case, trailing dot or not).
pub fn matches(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => name.eq_ignore_ascii_case(pattern),
    }
}

/// Checks a list of patterns (`field`: where it is, for the error), 1 to `max` of them.
pub fn check_list(field: &str, list: &[String], max: usize) -> Result<(), (String, String)> {
    if list.is_empty() || list.len() > max {
        return Err((field.to_string(), format!("must hold 1 to {max} names")));
    }
    for (i, p) in list.iter().enumerate() {
        check(p).map_err(|e| (format!("{field}[{i}]"), e))?;
        if list[..i].iter().any(|q| q.eq_ignore_ascii_case(p)) {
            return Err((format!("{field}[{i}]"), format!("{p:?} is listed twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        for ok in [
            "api.example.com",
            "*.example.com",
            "a_b.c-d.test",
            "*.allowed.test",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "example.com.",
            "*.example.com.",
            "com",
            "*.com",
            "a.*.example.com",
            "*a.example.com",
            "**.example.com",
            "*",
            "-a.example.com",
            "a-.example.com",
            "a..example.com",
            "a b.example.com",
            &format!("{}.com", "a".repeat(64)),
            &format!("{}com", "a.".repeat(130)),
        ] {
            assert!(check(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("api.example.com", "API.example.com."));
        assert!(!matches("api.example.com", "x.api.example.com"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com."));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "aexample.com"));
        assert!(!matches("*.example.com", ".example.com"));
        assert!(!matches("*.example.com", "a.example.org"));
        assert_eq!(normalize("A.Example.COM."), "a.example.com");
    }

    #[test]
    fn lists() {
        assert!(check_list("f", &[], 25).is_err());
        let e = check_list("f", &["a.test".into(), "A.test".into()], 25).unwrap_err();
        assert_eq!(e.0, "f[1]");
        let e = check_list("f", &["a.test".into(), "b.".into()], 25).unwrap_err();
        assert_eq!(e.0, "f[1]");
    }
}
