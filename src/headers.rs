//! Header rules for a proxy: what must not cross a hop, and what a proxy adds.
//!
//! They are applied while heads are written and read, not by editing header maps: a
//! request's forwarded head is written from the client's map, leaving out what must not
//! cross and adding what a proxy adds ([`Forward`]), and a response's hop-by-hop headers
//! are never put in its map (the upstream client reads them, see [`is_hop_by_hop`]).
//! Editing the maps cost a hashed lookup or insert per rule, on every request.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::mirror::MIRROR_HEADER;

/// What the rules do with a request header, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Crosses as it is.
    Pass,
    /// Describes one connection, not the message (RFC 9110, 7.6.1), plus
    /// `Proxy-Connection` (a de-facto one) and the proxy credentials meant for us.
    /// `Upgrade` is one too; a forwarded upgrade gets ours.
    HopByHop,
    /// Replaced by ours: `Host`, `X-Forwarded-Host`, `X-Forwarded-Proto`.
    Replaced,
    /// A list ours is appended to: `X-Forwarded-For`, `Via`.
    Appended,
    /// `Content-Length`: the upstream client writes the framing the body is sent with.
    Framing,
    /// `Cookie`: goes as one line. HTTP/2 clients send each cookie as a field of its own,
    /// which must be joined with `; ` for HTTP/1.1 (RFC 9113, 8.2.3).
    Cookie,
}

/// One match on the name's text (its length first); comparing it with each name in turn
/// cost several times as much.
fn rule(name: &HeaderName) -> Rule {
    match name.as_str() {
        "connection"
        | "keep-alive"
        | "proxy-connection"
        | "proxy-authenticate"
        | "proxy-authorization"
        | "te"
        | "trailer"
        | "transfer-encoding"
        | "upgrade" => Rule::HopByHop,
        "host" | "x-forwarded-host" | "x-forwarded-proto" => Rule::Replaced,
        "x-forwarded-for" | "via" => Rule::Appended,
        "content-length" => Rule::Framing,
        "cookie" => Rule::Cookie,
        _ => Rule::Pass,
    }
}

/// Whether a header describes one connection only, and must not be forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    rule(name) == Rule::HopByHop
}

/// Whether a header says how a message's body is delimited: `Content-Length` or
/// `Transfer-Encoding`. Whoever writes a message writes these for the framing it uses.
pub fn is_framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING
}

/// What a message's `Connection` headers say.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// `close`: the connection ends after this message.
    pub close: bool,
    /// `upgrade`: the `Upgrade` header is meant.
    pub upgrade: bool,
    /// Other headers named, which are hop-by-hop too. `None` but for the odd message; a
    /// set, so that a head naming thousands costs no more than its length.
    named: Option<HashSet<HeaderName>>,
}

impl ConnectionOptions {
    /// The options of every `Connection` header in `headers`.
    pub fn of(headers: &HeaderMap) -> ConnectionOptions {
        let mut options = ConnectionOptions::default();
        for value in headers.get_all(header::CONNECTION) {
            options.add(value.as_bytes());
        }
        options
    }

    /// Adds one `Connection` value's comma-separated options. Split as bytes: a value
    /// that is not text (a byte over 0x7F somewhere on the line) must not hide the headers
    /// it names.
    pub fn add(&mut self, value: &[u8]) {
        // Nearly every response from a keep-alive server says only this.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            return;
        }
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            // The usual tokens first, by their text: making a name costs more than the rest.
            if token.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            } else if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if let Ok(name) = HeaderName::from_bytes(token) {
                // Hop-by-hop headers go anyway; only the others need naming.
                if !is_hop_by_hop(&name) {
                    self.named.get_or_insert_default().insert(name);
                }
            }
        }
    }

    /// Whether `name` was named, and must go.
    #[inline]
    pub fn names(&self, name: &HeaderName) -> bool {
        self.named.as_ref().is_some_and(|named| named.contains(name))
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How a request's head changes on its way to a server.
///
/// Hop-by-hop headers and those the client's `Connection` named are left out, then
/// `Host`, `X-Forwarded-Host` and `X-Forwarded-Proto` are ours, and ours is appended to
/// `X-Forwarded-For` and `Via`: in that order, so that a client cannot strip ours by naming
/// them in `Connection`.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The host the request is for, sent as `Host` and `X-Forwarded-Host`. `None` for an
    /// HTTP/1.0 request that named none: see [`put_fields`](Self::put_fields).
    pub host: Option<HeaderValue>,
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// Our `Via` entry.
    pub via: &'static str,
    /// The protocol of an upgrade that is forwarded, sent with `Connection: upgrade`.
    pub upgrade: Option<HeaderValue>,
    /// The client's `Connection` options.
    pub connection: ConnectionOptions,
    /// A copy for a route's shadow: marked with `x-switchyard-mirror: 1`, written after
    /// everything else so that no header of the client's can take the mark off.
    pub shadow_copy: bool,
}

impl Forward {
    /// Writes the forwarded header lines of a request whose own headers are `headers`,
    /// going to `server`. A request is always forwarded as HTTP/1.1, which needs a `Host`:
    /// when the client sent none (HTTP/1.0 may), the server's address is the `Host`, as
    /// a client connecting to it directly would send, and no `X-Forwarded-Host` is sent.
    pub fn put_fields(&self, out: &mut Vec<u8>, headers: &HeaderMap, server: SocketAddr) {
        let (mut forwarded_for, mut via, mut cookies) = (false, false, false);
        for (name, value) in headers {
            if self.connection.names(name) {
                continue;
            }
            match rule(name) {
                Rule::Pass => put_field(out, name.as_str(), value.as_bytes()),
                Rule::HopByHop | Rule::Replaced | Rule::Framing => {}
                Rule::Appended if name == X_FORWARDED_FOR => forwarded_for = true,
                Rule::Appended => via = true,
                // Every value of a name comes at once: the first is where the line goes.
                Rule::Cookie if !cookies => {
                    cookies = true;
                    put_line(out, name, headers.get_all(name).iter().map(HeaderValue::as_bytes), b"; ");
                }
                Rule::Cookie => {}
            }
        }
        match &self.host {
            Some(host) => {
                put_field(out, "host", host.as_bytes());
                put_field(out, "x-forwarded-host", host.as_bytes());
            }
            None => {
                let _ = write!(out, "host: {server}\r\n");
            }
        }
        put_list(out, &X_FORWARDED_FOR, forwarded_for.then_some(headers), self.client_ip.as_bytes());
        put_field(out, "x-forwarded-proto", b"http");
        put_list(out, &header::VIA, via.then_some(headers), self.via.as_bytes());
        if let Some(protocol) = &self.upgrade {
            put_field(out, "connection", b"upgrade");
            put_field(out, "upgrade", protocol.as_bytes());
        }
        if self.shadow_copy {
            put_field(out, MIRROR_HEADER.as_str(), b"1");
        }
    }
}

/// Writes one `name: value` line.
#[inline]
pub fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `values` as one `name` line, `separator` between them.
fn put_line<'v>(out: &mut Vec<u8>, name: &HeaderName, values: impl IntoIterator<Item = &'v [u8]>, separator: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a list header as one line: the values `headers` has of it, then `ours`.
fn put_list(out: &mut Vec<u8>, name: &HeaderName, headers: Option<&HeaderMap>, ours: &[u8]) {
    let theirs = headers.into_iter().flat_map(|h| h.get_all(name)).map(HeaderValue::as_bytes);
    put_line(out, name, theirs.chain([ours]), b", ");
}

/// The size of a request head as limits count it: each header's name, value and the
/// four bytes of `: ` and CRLF.
pub fn head_size(headers: &HeaderMap) -> usize {
    headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];

    fn map(fields: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("a name");
            h.append(name, HeaderValue::from_bytes(value).expect("a value"));
        }
        h
    }

    fn forward(headers: &HeaderMap) -> Forward {
        Forward {
            host: Some(HeaderValue::from_static("agent.example.com")),
            client_ip: HeaderValue::from_static("10.0.0.9"),
            via: "1.1 switchyard",
            upgrade: None,
            connection: ConnectionOptions::of(headers),
            shadow_copy: false,
        }
    }

    /// The server the forwarded lines are written for.
    const SERVER: ([u8; 4], u16) = ([127, 0, 0, 1], 9);

    /// The lines `forward` writes for `headers`, as (name, value) in order.
    fn forwarded(forward: &Forward, headers: &HeaderMap) -> Vec<(String, String)> {
        let mut out = Vec::new();
        forward.put_fields(&mut out, headers, SERVER.into());
        let text = String::from_utf8(out).expect("text");
        assert!(text.ends_with("\r\n"), "{text:?}");
        text.lines()
            .map(|line| {
                let (name, value) = line.split_once(": ").expect("a header line");
                (name.to_string(), value.to_string())
            })
            .collect()
    }

    fn names(lines: &[(String, String)]) -> Vec<&str> {
        lines.iter().map(|(n, _)| n.as_str()).collect()
    }

    const OURS: [&str; 5] = ["host", "x-forwarded-host", "x-forwarded-for", "x-forwarded-proto", "via"];

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_left_out_and_ours_added() {
        let h = map(&[
            ("connection", b"keep-alive, X-Secret"),
            ("keep-alive", b"timeout=5"),
            ("x-secret", b"1"),
            ("te", b"trailers"),
            ("upgrade", b"websocket"),
            ("x-kept", b"1"),
        ]);
        let lines = forwarded(&forward(&h), &h);
        assert_eq!(names(&lines), [&["x-kept"][..], &OURS].concat());
    }

    #[test]
    fn every_hop_by_hop_header_goes_alone_or_named_in_any_case() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
            let h = map(&[(name, b"a"), (name, b"b"), ("x-kept", b"1")]);
            assert_eq!(names(&forwarded(&forward(&h), &h)), [&["x-kept"][..], &OURS].concat(), "{name}");
        }
        for name in ["host", "x-connection", "x-forwarded-for", "via", "content-length"] {
            assert!(!is_hop_by_hop(&HeaderName::from_bytes(name.as_bytes()).expect("a name")), "{name}");
        }
        let h =
            map(&[("connection", b"Keep-Alive"), ("connection", b"X-One ,close"), ("x-one", b"1"), ("x-kept", b"1")]);
        assert_eq!(names(&forwarded(&forward(&h), &h)), [&["x-kept"][..], &OURS].concat());
        // A line that is not text still names its headers.
        let h = map(&[("connection", b"X-Secret, caf\xe9"), ("x-secret", b"1"), ("x-kept", b"1")]);
        assert_eq!(names(&forwarded(&forward(&h), &h)), [&["x-kept"][..], &OURS].concat());
    }

    #[test]
    fn forwarding_headers_are_ours_and_lists_are_appended_to() {
        let h = map(&[
            ("host", b"client.example"),
            ("x-forwarded-for", b"1.1.1.1"),
            ("x-forwarded-for", b"2.2.2.2"),
            ("x-forwarded-host", b"evil.example"),
            ("x-forwarded-proto", b"https"),
            ("via", b"1.1 edge"),
        ]);
        let lines = forwarded(&forward(&h), &h);
        let value = |name: &str| {
            let values: Vec<_> = lines.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
            assert_eq!(values.len(), 1, "{name} once: {lines:?}");
            values[0].to_string()
        };
        assert_eq!(value("host"), "agent.example.com");
        assert_eq!(value("x-forwarded-host"), "agent.example.com");
        assert_eq!(value("x-forwarded-for"), "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(value("x-forwarded-proto"), "http");
        assert_eq!(value("via"), "1.1 edge, 1.1 switchyard");
        assert_eq!(lines.len(), OURS.len());
    }

    #[test]
    fn a_client_cannot_strip_ours_by_naming_them() {
        let h = map(&[
            ("connection", b"x-forwarded-for, via, host"),
            ("x-forwarded-for", b"1.1.1.1"),
            ("via", b"1.1 edge"),
        ]);
        let lines = forwarded(&forward(&h), &h);
        assert_eq!(names(&lines), OURS);
        // The client's own values were named, and went; ours stay.
        assert!(lines.contains(&("x-forwarded-for".into(), "10.0.0.9".into())), "{lines:?}");
        assert!(lines.contains(&("via".into(), "1.1 switchyard".into())), "{lines:?}");
    }

    #[test]
    fn a_forwarded_upgrade_and_a_request_without_a_host() {
        let h = map(&[("connection", b"Upgrade"), ("upgrade", b"websocket"), ("sec-websocket-key", b"k")]);
        let mut upgrade = forward(&h);
        upgrade.upgrade = Some(HeaderValue::from_static("websocket"));
        upgrade.host = None;
        let lines = forwarded(&upgrade, &h);
        assert_eq!(
            names(&lines),
            ["sec-websocket-key", "host", "x-forwarded-for", "x-forwarded-proto", "via", "connection", "upgrade"]
        );
        assert_eq!(lines[1].1, "127.0.0.1:9", "HTTP/1.1 needs a Host: the server's address");
        assert_eq!(lines[5].1, "upgrade");
        assert_eq!(lines[6].1, "websocket");
    }

    #[test]
    fn cookies_go_as_one_line() {
        let h = map(&[("cookie", b"a=1"), ("x-a", b"1"), ("cookie", b"b=2"), ("cookie", b"c=3")]);
        let lines = forwarded(&forward(&h), &h);
        assert_eq!(lines.iter().filter(|(n, _)| n == "cookie").count(), 1, "{lines:?}");
        assert_eq!(lines[0], ("cookie".to_string(), "a=1; b=2; c=3".to_string()));
        assert_eq!(lines[1], ("x-a".to_string(), "1".to_string()));

        let one = map(&[("cookie", b"a=1")]);
        assert_eq!(forwarded(&forward(&one), &one)[0].1, "a=1");
        let named = map(&[("cookie", b"a=1"), ("cookie", b"b=2"), ("connection", b"cookie")]);
        assert!(!names(&forwarded(&forward(&named), &named)).contains(&"cookie"), "named in Connection");
    }

    #[test]
    fn connection_options_are_read_case_insensitively() {
        assert_eq!(ConnectionOptions::of(&map(&[("connection", b"Keep-Alive")])), ConnectionOptions::default());
        let options = ConnectionOptions::of(&map(&[("connection", b"keep-alive, Upgrade"), ("connection", b"CLOSE")]));
        assert!(options.upgrade && options.close);
        assert!(options.named.is_none(), "hop-by-hop names need no naming: {options:?}");
        let options = ConnectionOptions::of(&map(&[("connection", b"X-One, x-one,, X-Two ,bad name")]));
        assert!(!options.upgrade && !options.close);
        assert_eq!(options.named.as_ref().map(HashSet::len), Some(2), "{options:?}");
        assert!(options.names(&HeaderName::from_static("x-one")));
        assert!(options.names(&HeaderName::from_static("x-two")));
        assert!(!options.names(&HeaderName::from_static("x-three")));
        assert!(!options.names(&HeaderName::from_static("bad")));
    }
}
