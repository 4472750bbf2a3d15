//! What an answer means, for comparing a shadow's with the primary's.
//!
//! Model output is never byte-identical, so bodies are compared by what they are:
//!
//! | content type              | compared by                                             |
//! |---------------------------|---------------------------------------------------------|
//! | `application/json`, `+json` | structure: keys and value types, minus `ignore_json_fields` |
//! | `text/event-stream`       | the number of events and their types (`event:` fields)  |
//! | anything else             | an xxh3 hash of the bytes                               |
//!
//! A [`Digest`] reads a body as it streams and keeps only what is compared: a running hash,
//! an event count, or (for JSON, which must be parsed whole) the bytes. Only the first
//! `limit` bytes are read; a longer body is compared by those, except JSON, which cannot
//! be parsed from a prefix and is then left unchecked.
//!
//! Headers are compared by name and value, minus those that differ between any two
//! responses (hop-by-hop, `date`, `content-length`) and `ignore_headers`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use xxhash_rust::xxh3::Xxh3Default;

/// Headers that differ between any two responses, or describe the transfer rather than
/// the answer: never compared.
const NEVER_COMPARED: [HeaderName; 10] = [
    header::CONNECTION,
    header::DATE,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

/// The longest `event:` type kept; longer ones are compared by their start.
const MAX_TYPE: usize = 64;
/// Distinct event types counted by name; more are counted together as `…`.
const MAX_TYPES: usize = 16;

/// How a body is compared, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Json,
    EventStream,
}

impl Kind {
    pub fn of(headers: &HeaderMap) -> Kind {
        let Some(value) = headers.get(header::CONTENT_TYPE) else { return Kind::Plain };
        let essence = value.as_bytes().split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        let ends_with = |suffix: &[u8]| {
            essence.len() >= suffix.len() && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        };
        if essence.eq_ignore_ascii_case(b"text/event-stream") {
            Kind::EventStream
        } else if essence.eq_ignore_ascii_case(b"application/json") || ends_with(b"+json") {
            Kind::Json
        } else {
            Kind::Plain
        }
    }
}

/// A body reduced to what is compared.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// The hash of the bytes read, how many, and whether there were more.
    Plain { hash: u64, len: u64, truncated: bool },
    /// JSON's skeleton: every leaf replaced by its type name, every array by its distinct
    /// element skeletons.
    Json(Value),
    /// Events dispatched, by type, and the hash of their types in order.
    Events { count: u32, types: BTreeMap<String, u32>, order: u64, truncated: bool },
    /// Not compared, and why (JSON over the limit; an answer switchyard made itself).
    Unchecked(&'static str),
}

impl Shape {
    fn describe(&self) -> String {
        match self {
            Shape::Plain { len, truncated, .. } => {
                format!("{len}{} bytes", if *truncated { "+" } else { "" })
            }
            Shape::Json(_) => "JSON".into(),
            Shape::Events { count, types, truncated, .. } => {
                let mut out = format!("{count}{} events (", if *truncated { "+" } else { "" });
                for (i, (t, n)) in types.iter().enumerate() {
                    let _ = write!(out, "{}{t} {n}", if i > 0 { ", " } else { "" });
                }
                out.push(')');
                out
            }
            Shape::Unchecked(why) => (*why).into(),
        }
    }
}

/// Reads a body frame by frame, keeping only what its [`Kind`] compares.
#[derive(Debug)]
pub struct Digest {
    limit: u64,
    /// Bytes offered so far, including any past the limit.
    len: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    Plain(Box<Hasher>),
    Json(Vec<u8>),
    Events(Box<Events>),
}

impl Digest {
    pub fn new(kind: Kind, limit: u64) -> Digest {
        let state = match kind {
            Kind::Plain => State::Plain(Box::default()),
            Kind::Json => State::Json(Vec::new()),
            Kind::EventStream => State::Events(Box::default()),
        };
        Digest { limit, len: 0, state }
    }

    /// Takes the next piece of the body.
    pub fn feed(&mut self, data: &[u8]) {
        let room = usize::try_from(self.limit.saturating_sub(self.len)).unwrap_or(usize::MAX);
        self.len += data.len() as u64;
        let data = &data[..data.len().min(room)];
        if !data.is_empty() {
            match &mut self.state {
                State::Plain(hash) => hash.update(data),
                State::Json(bytes) => bytes.extend_from_slice(data),
                State::Events(events) => events.feed(data),
            }
        }
        if let (true, State::Json(bytes)) = (self.len > self.limit, &mut self.state) {
            // It will not be parsed: give the memory back at once.
            *bytes = Vec::new();
        }
    }

    /// Whether [`finish`](Self::finish) is work for a blocking thread: a JSON body to parse
    /// that is larger than a few pages.
    pub fn is_heavy(&self) -> bool {
        matches!(&self.state, State::Json(bytes) if bytes.len() > 64 * 1024)
    }

    /// Whether more than `limit` bytes were offered: reading further changes nothing.
    pub fn over(&self) -> bool {
        self.len > self.limit
    }

    /// The body's shape; `ignore` names JSON fields left out of the structure (a name
    /// anywhere, or a dotted path from the root such as `usage.total_tokens`).
    pub fn finish(self, ignore: &[String]) -> Shape {
        let truncated = self.over();
        match self.state {
            State::Plain(hash) => Shape::Plain { hash: hash.digest(), len: self.len.min(self.limit), truncated },
            State::Json(_) if truncated => Shape::Unchecked("JSON over max_body, not parsed"),
            State::Json(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) => Shape::Json(skeleton(&value, ignore, "")),
                // Declared JSON but is not: compared as bytes.
                Err(_) => Shape::Plain { hash: xxhash_rust::xxh3::xxh3_64(&bytes), len: bytes.len() as u64, truncated },
            },
            State::Events(events) => {
                Shape::Events { count: events.count, types: events.types, order: events.order.digest(), truncated }
            }
        }
    }
}

/// A running xxh3 hash (the crate's hasher has no `Debug`).
#[derive(Default)]
struct Hasher(Xxh3Default);

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn digest(&self) -> u64 {
        self.0.digest()
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hasher({:016x})", self.0.digest())
    }
}

/// An SSE stream's events, counted as they end (a blank line after at least one `data`
/// field dispatches one, as a browser's EventSource does).
#[derive(Debug, Default)]
struct Events {
    /// The start of the current line: enough to tell `event:` and `data` lines apart and
    /// keep the type.
    line: Vec<u8>,
    line_len: usize,
    /// The last byte seen was a CR: a LF right after it ends nothing more.
    after_cr: bool,
    kind: Option<String>,
    has_data: bool,
    count: u32,
    types: BTreeMap<String, u32>,
    order: Hasher,
}

impl Events {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.after_cr && data[0] == b'\n' {
                data = &data[1..];
                self.after_cr = false;
                continue;
            }
            self.after_cr = false;
            match memchr::memchr2(b'\n', b'\r', data) {
                Some(i) => {
                    self.keep(&data[..i]);
                    self.after_cr = data[i] == b'\r';
                    self.end_line();
                    data = &data[i + 1..];
                }
                None => {
                    self.keep(data);
                    data = &[];
                }
            }
        }
    }

    fn keep(&mut self, part: &[u8]) {
        let room = (b"event: ".len() + MAX_TYPE).saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        self.line_len += part.len();
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let empty = self.line_len == 0;
        self.line_len = 0;
        if empty {
            self.dispatch();
        } else if let Some(value) = field(&line, b"event") {
            self.kind = Some(String::from_utf8_lossy(value).into_owned());
        } else if field(&line, b"data").is_some() {
            self.has_data = true;
        }
        self.line = line;
        self.line.clear();
    }

    fn dispatch(&mut self) {
        let kind = self.kind.take();
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        let kind = kind.unwrap_or_else(|| "message".into());
        self.count += 1;
        self.order.update(kind.as_bytes());
        self.order.update(b"\n");
        if self.types.len() < MAX_TYPES || self.types.contains_key(&kind) {
            *self.types.entry(kind).or_default() += 1;
        } else {
            *self.types.entry("…".into()).or_default() += 1;
        }
    }
}

/// The value of an SSE field line `name:value` (one leading space dropped), or `name`
/// alone (an empty value).
fn field<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let rest = line.strip_prefix(name)?;
    match rest.split_first() {
        None => Some(rest),
        Some((b':', value)) => Some(value.strip_prefix(b" ").unwrap_or(value)),
        Some(_) => None,
    }
}

/// A JSON value's structure: leaves become their type names, objects keep their keys
/// (minus the ignored), arrays become the set of their elements' structures.
fn skeleton(value: &Value, ignore: &[String], path: &str) -> Value {
    match value {
        Value::Null => Value::from("null"),
        Value::Bool(_) => Value::from("bool"),
        Value::Number(_) => Value::from("number"),
        Value::String(_) => Value::from("string"),
        Value::Array(items) => {
            // Distinct shapes, in the order of their text: the same set whatever the order.
            let mut shapes = BTreeMap::new();
            for item in items {
                let shape = skeleton(item, ignore, path);
                shapes.entry(shape.to_string()).or_insert(shape);
            }
            Value::Array(shapes.into_values().collect())
        }
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for key in keys {
                let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                if ignore.iter().any(|i| *i == *key || *i == here) {
                    continue;
                }
                out.insert(key.clone(), skeleton(&fields[key], ignore, &here));
            }
            Value::Object(out)
        }
    }
}

/// The first place two skeletons differ, as an operator reads it.
fn skeleton_diff(primary: &Value, shadow: &Value, path: &str) -> Option<String> {
    match (primary, shadow) {
        (Value::Object(a), Value::Object(b)) => {
            if let Some(key) = a.keys().find(|k| !b.contains_key(*k)) {
                return Some(format!("{path}.{key} only in the primary"));
            }
            if let Some(key) = b.keys().find(|k| !a.contains_key(*k)) {
                return Some(format!("{path}.{key} only in the shadow"));
            }
            a.iter().find_map(|(key, value)| skeleton_diff(value, &b[key], &format!("{path}.{key}")))
        }
        (Value::Array(a), Value::Array(b)) if a != b => match (a.as_slice(), b.as_slice()) {
            ([x], [y]) => skeleton_diff(x, y, &format!("{path}[]")),
            _ => Some(format!("{path}[]: elements of other types")),
        },
        _ if primary == shadow => None,
        _ => Some(format!("{path}: {} in the primary, {} in the shadow", type_name(primary), type_name(shadow))),
    }
}

fn type_name(skeleton: &Value) -> &str {
    match skeleton {
        Value::String(t) => t,
        Value::Array(_) => "array",
        _ => "object",
    }
}

/// How two bodies differ, or `None` if they mean the same.
pub fn body_difference(primary: &Shape, shadow: &Shape) -> Option<String> {
    match (primary, shadow) {
        (Shape::Json(a), Shape::Json(b)) => skeleton_diff(a, b, "$").map(|at| format!("JSON structure: {at}")),
        (Shape::Unchecked(a), Shape::Unchecked(b)) if a == b => None,
        (
            Shape::Events { count: a, order: x, truncated: s, .. },
            Shape::Events { count: b, order: y, truncated: t, .. },
        ) if a == b && x == y && s == t => None,
        (Shape::Events { .. }, Shape::Events { .. }) => {
            Some(format!("events: {} in the primary, {} in the shadow", primary.describe(), shadow.describe()))
        }
        (Shape::Plain { hash: a, truncated: s, .. }, Shape::Plain { hash: b, truncated: t, .. })
            if a == b && s == t =>
        {
            None
        }
        (Shape::Plain { .. }, Shape::Plain { .. }) => {
            Some(format!("bodies differ: {} in the primary, {} in the shadow", primary.describe(), shadow.describe()))
        }
        _ => Some(format!(
            "body kinds differ: {} in the primary, {} in the shadow",
            primary.describe(),
            shadow.describe()
        )),
    }
}

/// The headers compared, sorted, without those never compared and `ignore`.
pub fn compared_headers(headers: &HeaderMap, ignore: &[HeaderName]) -> Vec<(HeaderName, HeaderValue)> {
    let mut out: Vec<(HeaderName, HeaderValue)> = headers
        .iter()
        .filter(|(name, _)| !NEVER_COMPARED.contains(name) && !ignore.contains(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    out.sort_by(|(a, x), (b, y)| a.as_str().cmp(b.as_str()).then_with(|| x.as_bytes().cmp(y.as_bytes())));
    out
}

/// The first header two answers differ in, or `None`.
pub fn header_difference(
    primary: &[(HeaderName, HeaderValue)],
    shadow: &[(HeaderName, HeaderValue)],
) -> Option<String> {
    let values = |list: &[(HeaderName, HeaderValue)], name: &HeaderName| -> Vec<String> {
        list.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    let names = primary.iter().chain(shadow).map(|(n, _)| n);
    for name in names {
        let (a, b) = (values(primary, name), values(shadow, name));
        if a != b {
            return Some(match (a.is_empty(), b.is_empty()) {
                (false, true) => format!("header {name} only in the primary"),
                (true, false) => format!("header {name} only in the shadow"),
                _ => format!("header {name}: {:?} in the primary, {:?} in the shadow", a.join(", "), b.join(", ")),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(kind: Kind, limit: u64, chunks: &[&[u8]], ignore: &[&str]) -> Shape {
        let mut d = Digest::new(kind, limit);
        for c in chunks {
            d.feed(c);
        }
        d.finish(&ignore.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn json(text: &str, ignore: &[&str]) -> Shape {
        shape(Kind::Json, 1 << 20, &[text.as_bytes()], ignore)
    }

    #[test]
    fn kinds_follow_the_content_type() {
        let kind = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            Kind::of(&h)
        };
        assert_eq!(kind("application/json; charset=utf-8"), Kind::Json);
        assert_eq!(kind("application/problem+JSON"), Kind::Json);
        assert_eq!(kind("text/event-stream"), Kind::EventStream);
        assert_eq!(kind("text/plain"), Kind::Plain);
        assert_eq!(Kind::of(&HeaderMap::new()), Kind::Plain);
    }

    #[test]
    fn json_is_compared_by_keys_and_types_not_values() {
        let a = json(r#"{"id":"r-1","choices":[{"text":"hello"}],"usage":{"tokens":5}}"#, &[]);
        let b = json(r#"{"usage":{"tokens":9},"choices":[{"text":"bye"},{"text":"x"}],"id":"r-2"}"#, &[]);
        assert_eq!(body_difference(&a, &b), None);

        let typed = json(r#"{"id":"r-1","choices":[{"text":"hello"}],"usage":{"tokens":"5"}}"#, &[]);
        assert_eq!(
            body_difference(&a, &typed).as_deref(),
            Some("JSON structure: $.usage.tokens: number in the primary, string in the shadow")
        );
        let extra = json(r#"{"id":"r-1","choices":[{"text":"hi","tool":null}],"usage":{"tokens":5}}"#, &[]);
        assert_eq!(body_difference(&a, &extra).as_deref(), Some("JSON structure: $.choices[].tool only in the shadow"));
    }

    #[test]
    fn ignored_json_fields_are_left_out_by_name_or_path() {
        let a = json(r#"{"id":"x","meta":{"trace":1},"n":1}"#, &["trace"]);
        let b = json(r#"{"n":2,"meta":{}}"#, &["trace", "id"]);
        assert_ne!(body_difference(&a, &b), None, "id is only ignored on one side");
        let a = json(r#"{"id":"x","meta":{"trace":1},"n":1}"#, &["id", "meta.trace"]);
        assert_eq!(body_difference(&a, &b), None);
        let deep = json(r#"{"n":1,"meta":{},"other":{"trace":true}}"#, &["meta.trace"]);
        assert!(body_difference(&a, &deep).expect("differs").contains("$.other only in the shadow"));
    }

    #[test]
    fn event_streams_are_compared_by_count_and_types() {
        let two = shape(Kind::EventStream, 1 << 20, &[b"data: a\n\nevent: done\ndata: x\n\n"], &[]);
        let other_text =
            shape(Kind::EventStream, 1 << 20, &[b": hi\r\ndata: zzz\r\n\r\nevent: done\r\ndata: y\r\n\r\n"], &[]);
        assert_eq!(body_difference(&two, &other_text), None);
        let three = shape(Kind::EventStream, 1 << 20, &[b"data: a\n\ndata: b\n\nevent: done\ndata: x\n\n"], &[]);
        assert_eq!(
            body_difference(&two, &three).as_deref(),
            Some("events: 2 events (done 1, message 1) in the primary, 3 events (done 1, message 2) in the shadow")
        );
        let reordered = shape(Kind::EventStream, 1 << 20, &[b"event: done\ndata: x\n\ndata: a\n\n"], &[]);
        assert!(body_difference(&two, &reordered).is_some(), "the order of types counts");
        let no_data = shape(Kind::EventStream, 1 << 20, &[b"event: ping\n\nid: 4\n\n"], &[]);
        assert!(matches!(no_data, Shape::Events { count: 0, .. }), "events without data are not dispatched");
    }

    #[test]
    fn plain_bodies_are_hashed_up_to_the_limit() {
        let a = shape(Kind::Plain, 4, &[b"abcd", b"ef"], &[]);
        let b = shape(Kind::Plain, 4, &[b"ab", b"cdXY"], &[]);
        assert_eq!(body_difference(&a, &b), None, "only the first 4 bytes are read");
        let short = shape(Kind::Plain, 4, &[b"abcd"], &[]);
        assert!(body_difference(&a, &short).is_some(), "one was longer than the limit");
        let big_json = shape(Kind::Json, 4, &[b"{\"a\":", b"1}"], &[]);
        assert_eq!(big_json, Shape::Unchecked("JSON over max_body, not parsed"));
        let not_json = shape(Kind::Json, 100, &[b"<html>"], &[]);
        assert!(matches!(not_json, Shape::Plain { len: 6, .. }));
    }

    #[test]
    fn headers_are_compared_without_the_ignored_and_the_transient() {
        let mut p = HeaderMap::new();
        p.insert(header::DATE, HeaderValue::from_static("Mon, 23 Nov 2026 10:00:00 GMT"));
        p.insert("x-request-id", HeaderValue::from_static("a"));
        p.insert("x-version", HeaderValue::from_static("1"));
        let mut s = p.clone();
        s.insert(header::DATE, HeaderValue::from_static("Mon, 23 Nov 2026 10:00:01 GMT"));
        s.insert("x-request-id", HeaderValue::from_static("b"));
        let ignore = [HeaderName::from_static("x-request-id")];
        assert_eq!(header_difference(&compared_headers(&p, &ignore), &compared_headers(&s, &ignore)), None);
        s.insert("x-version", HeaderValue::from_static("2"));
        assert_eq!(
            header_difference(&compared_headers(&p, &ignore), &compared_headers(&s, &ignore)).as_deref(),
            Some("header x-version: \"1\" in the primary, \"2\" in the shadow")
        );
        s.remove("x-version");
        assert_eq!(
            header_difference(&compared_headers(&p, &ignore), &compared_headers(&s, &ignore)).as_deref(),
            Some("header x-version only in the primary")
        );
    }

    fn chunked(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([data.len()]) {
            out.push(data[last..p].to_vec());
            last = p;
        }
        out
    }

    proptest! {
        /// However a body is cut into frames, its shape is the same.
        #[test]
        fn shapes_do_not_depend_on_framing(
            events in proptest::collection::vec((proptest::option::of("[a-z]{1,8}"), "[ -~]{0,20}"), 0..12),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            limit in 1u64..400,
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for (kind, data) in &events {
                if let Some(k) = kind {
                    text.push_str(&format!("event: {k}{eol}"));
                }
                text.push_str(&format!("data: {data}{eol}{eol}"));
            }
            for kind in [Kind::EventStream, Kind::Plain, Kind::Json] {
                let whole = shape(kind, limit, &[text.as_bytes()], &[]);
                let pieces = chunked(text.as_bytes(), &cuts);
                let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
                prop_assert_eq!(&shape(kind, limit, &refs, &[]), &whole);
            }
            let all = shape(Kind::EventStream, u64::MAX, &[text.as_bytes()], &[]);
            let Shape::Events { count, .. } = all else { panic!("an event stream") };
            prop_assert_eq!(count as usize, events.len());
        }
    }
}
