//! Matching a request to a route: hosts (exact and `*.` wildcard, port ignored, case
//! insensitive) and path prefixes on whole segments, after the path has been normalised so
//! that `/public/..%2Fadmin` cannot slip past a route meant to guard `/admin`.

use std::borrow::Cow;

use crate::config::HostPattern;

/// Whether `host` (as the client sent it, maybe with a port) matches any of `patterns`.
/// An empty pattern list matches every host.
#[inline]
pub fn host_matches(patterns: &[HostPattern], host: &str) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    patterns.iter().any(|p| match p {
        HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
        HostPattern::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
    })
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
#[inline]
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rfind(':') {
        Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
        _ => host,
    }
}

/// Whether `path` lies under `prefix` on whole segments: `/api` matches `/api` and
/// `/api/x` but not `/apix`; a prefix ending in `/` matches everything below it.
#[inline]
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
}

/// Normalises a request path for matching and forwarding: decodes the escapes that can
/// change which resource is meant (`%2F`, `%5C` as separators; `%2E` as a dot), turns
/// backslashes into slashes, and removes `.` and `..` segments (RFC 3986, 5.2.4; `..` above
/// the root stays at the root). Every other escape is left as the client wrote it.
///
/// Borrows when the path is already normal, which is nearly always: no allocation then.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') {
        return Err(BadPath::NotAbsolute);
    }
    if !needs_work(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_separators(path)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// A quick scan for escapes, backslashes, or a segment that is `.` or `..` (or starts
/// with `..`). memchr jumps between the three bytes that matter, which are rare in real
/// paths, so the common case is a vectorised pass.
#[inline]
fn needs_work(path: &[u8]) -> bool {
    let mut from = 0;
    while let Some(found) = memchr::memchr3(b'%', b'\\', b'.', &path[from..]) {
        let i = from + found;
        if path[i] != b'.' {
            return true;
        }
        if path[i - 1] == b'/' && matches!(path.get(i + 1), None | Some(b'/') | Some(b'.')) {
            return true;
        }
        from = i + 1;
    }
    false
}

fn decode_separators(path: &str) -> Result<String, BadPath> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(BadPath::BadEscape)?;
                let hi = (hex[0] as char).to_digit(16).ok_or(BadPath::BadEscape)?;
                let lo = (hex[1] as char).to_digit(16).ok_or(BadPath::BadEscape)?;
                match hi * 16 + lo {
                    0x2f | 0x5c => out.push('/'),
                    0x2e => out.push('.'),
                    _ => out.push_str(&path[i..i + 3]),
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // Copy the run up to the next special byte in one go.
                let end = bytes[i..].iter().position(|&b| b == b'%' || b == b'\\').map_or(bytes.len(), |p| i + p);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(s: &str) -> HostPattern {
        HostPattern::Exact(s.into())
    }

    #[test]
    fn hosts_match_exactly_or_by_suffix_ignoring_port_and_case() {
        let patterns = [exact("agent.example.com"), HostPattern::Suffix(".agents.internal".into())];
        assert!(host_matches(&patterns, "agent.example.com"));
        assert!(host_matches(&patterns, "Agent.Example.COM:8080"));
        assert!(host_matches(&patterns, "a.agents.internal"));
        assert!(host_matches(&patterns, "x.y.agents.internal:443"));
        assert!(!host_matches(&patterns, "agents.internal"));
        assert!(!host_matches(&patterns, "evil-agent.example.com"));
        assert!(!host_matches(&patterns, "agent.example.com.evil"));
        assert!(host_matches(&[], "anything"));
    }

    #[test]
    fn ports_are_stripped_from_names_and_ipv6_literals() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/v1"));
        assert!(!prefix_matches("/api/", "/api"));
    }

    #[test]
    fn paths_are_normalised() {
        let n = |p| normalize_path(p).expect("valid").into_owned();
        assert_eq!(n("/a/b/c"), "/a/b/c");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/public/..%2Fadmin"), "/admin");
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(n("/public%5C..%5Cadmin"), "/admin");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/%20b"), "/a/%20b");
        assert_eq!(n("/.well-known/x"), "/.well-known/x");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/.."), "/");
        assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
        assert_eq!(normalize_path("/a%zz"), Err(BadPath::BadEscape));
        assert_eq!(normalize_path("/a%2"), Err(BadPath::BadEscape));
        assert_eq!(normalize_path("*"), Err(BadPath::NotAbsolute));
    }

    proptest! {
        #[test]
        fn normal_paths_have_no_dot_segments_and_are_fixed_points(path in "/[a-z./%25\\\\]{0,30}") {
            if let Ok(normal) = normalize_path(&path) {
                prop_assert!(normal.starts_with('/'));
                prop_assert!(!normal.split('/').any(|s| s == "." || s == ".."), "{}", normal);
                let again = normalize_path(&normal).expect("a normal path stays valid");
                prop_assert_eq!(again.as_ref(), normal.as_ref());
            }
        }
    }
}
