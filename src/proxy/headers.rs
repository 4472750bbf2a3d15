//! Header rules for a proxy: what must not cross a hop, and what a proxy must add.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110, 7.6.1), plus
/// `Proxy-Connection` (a de-facto one) and the proxy credentials meant for us. `Upgrade`
/// goes too; the tunnel code puts it back when it forwards an upgrade. `Connection` comes
/// first: [`strip_hop_by_hop`] reads it before removing it.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, and every header the `Connection` header names.
///
/// Runs on every request and every response, most of which carry none of these, or only
/// `Connection: keep-alive`. A lookup in the map hashes the name, so rather than look up
/// every hop-by-hop name, one scan of the names present (compared in their interned form)
/// marks the few to remove, with no allocation.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Connection-named headers first, while `Connection` (bit 0) is still there to read. A
    // token naming a hop-by-hop header (`keep-alive`, `upgrade`) is marked already if its
    // header is present, and needs no lookup of its own.
    if present & 1 != 0 {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|token| !HOP_BY_HOP.iter().any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes())))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The name's place in [`HOP_BY_HOP`]: one match on the name's text (its length first),
/// where comparing it with each of the nine names cost several times as much.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], name);
    Some(i)
}

/// Whether a `Connection` header lists `token` (case-insensitively).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The comma-separated tokens of every `Connection` header, trimmed of spaces and tabs.
/// Split as bytes: a value that is not text (a byte over 0x7F somewhere on the line) must
/// not hide the header names it lists from [`strip_hop_by_hop`].
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(header::CONNECTION).iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')).map(|t| t.trim_ascii())
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends `value` to a list header, or sets it when absent. One lookup either way (the
/// entry), since this runs twice on every request.
pub fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    let mut entry = match headers.entry(name) {
        header::Entry::Vacant(vacant) => {
            vacant.insert(value.clone());
            return;
        }
        header::Entry::Occupied(occupied) => occupied,
    };
    let mut joined = Vec::with_capacity(64);
    for v in entry.iter() {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value.as_bytes());
    // The parts were valid values, so the list is one too; but a client's bytes must never
    // panic us: keep ours alone rather than forward a list we could not build.
    entry.insert(HeaderValue::from_bytes(&joined).unwrap_or_else(|_| value.clone()));
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
    fn each_hop_by_hop_name_is_found_at_its_place() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-connection")), None);
    }

    #[test]
    fn every_hop_by_hop_header_goes_alone_or_named_in_any_case() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_static("a"));
            h.append(name, HeaderValue::from_static("b"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"], "{name}");
        }
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-One ,close"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        // A line that is not text still names its headers.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_bytes(b"X-Secret, caf\xe9").expect("a valid value"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        // Nothing to remove: the map is left as it was.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("agent"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
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
