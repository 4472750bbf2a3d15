//! Header rules for a proxy: what must not cross a hop, and what a proxy must add.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110, 7.6.1), plus
/// `Proxy-Connection` (a de-facto one) and the proxy credentials meant for us.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and every header the `Connection` header names.
/// `Upgrade` goes too; the tunnel code puts it back when it forwards an upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Connection-named headers first, while `Connection` is still there to read.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> =
            connection_tokens(headers).filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok()).collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Whether a `Connection` header lists `token` (case-insensitively).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated tokens of every `Connection` header, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends `value` to a list header, or sets it when absent.
pub fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    let mut existing = headers.get_all(name).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(name.clone(), value.clone());
        return;
    }
    let mut joined = Vec::with_capacity(64);
    for v in existing {
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(value.as_bytes());
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        // Cannot happen (the parts were valid values), but a client's bytes must never
        // panic us: keep ours alone rather than forward a list we could not build.
        Err(_) => {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// The size of a request head as limits count it: each header's name, value and the
/// four bytes of `: ` and CRLF.
pub fn head_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn lists_are_appended_to() {
        let mut h = HeaderMap::new();
        let me = HeaderValue::from_static("10.0.0.9");
        append_to_list(&mut h, &X_FORWARDED_FOR, &me);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        append_to_list(&mut h, &X_FORWARDED_FOR, &me);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn connection_tokens_are_found_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(connection_has(&h, "upgrade"));
        assert!(!connection_has(&h, "close"));
    }
}
