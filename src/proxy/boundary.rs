//! Where a stream may be ended cleanly: between two SSE events, or between two WebSocket
//! frames. A drain deadline ends streams there, never in the middle of a message.
//!
//! Both trackers only look at bytes as they pass (the proxy never buffers a stream), carry
//! a few bytes of state across chunks, and can say how much of the next chunk to forward
//! before stopping at the first boundary.

use memchr::memchr2;

/// Tracks event boundaries in a `text/event-stream` body (a blank line ends an event;
/// lines end with CRLF, LF or CR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SseScanner {
    /// Between events: at the start of the stream, or just after a blank line.
    #[default]
    Boundary,
    /// Between events, the last byte a CR: an LF next still belongs to it.
    BoundaryCr,
    /// Inside a line that has content.
    Line,
    /// At the start of a line, inside an event.
    LineStart,
    /// At the start of a line inside an event, the last byte a CR.
    LineStartCr,
}

impl SseScanner {
    pub fn at_boundary(self) -> bool {
        matches!(self, SseScanner::Boundary | SseScanner::BoundaryCr)
    }

    fn step(self, byte: u8) -> SseScanner {
        use SseScanner::*;
        match (self, byte) {
            (Line, b'\n') | (LineStartCr, b'\n') => LineStart,
            (Line, b'\r') => LineStartCr,
            (Boundary | BoundaryCr | LineStart, b'\n') | (BoundaryCr, b'\r') => Boundary,
            (Boundary | LineStart | LineStartCr, b'\r') => BoundaryCr,
            _ => Line,
        }
    }

    /// Consumes `data`. With `stop`, consumes only up to the first event end in it
    /// (including the LF of a CRLF that ends there) and returns that length; `None` when
    /// there is none and all of `data` was consumed. Blank lines between events end
    /// nothing.
    pub fn feed(&mut self, data: &[u8], stop: bool) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if *self == SseScanner::Line {
                // Content bytes cannot end anything: skip to the next line end.
                match memchr2(b'\n', b'\r', &data[i..]) {
                    Some(at) => i += at,
                    None => return None,
                }
            }
            let was = self.at_boundary();
            *self = self.step(data[i]);
            i += 1;
            if stop && !was && self.at_boundary() {
                if *self == SseScanner::BoundaryCr && data.get(i) == Some(&b'\n') {
                    *self = SseScanner::Boundary;
                    i += 1;
                }
                return Some(i);
            }
        }
        None
    }
}

/// The close frame a proxy sends a WebSocket client when a drain deadline passes: FIN,
/// opcode 8, unmasked (server to client), two bytes of payload, code 1001 "going away".
pub const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Tracks frame boundaries in the server-to-client direction of a WebSocket (RFC 6455,
/// 5.2). Any boundary will do for a close frame: control frames may come between the
/// fragments of a message.
#[derive(Debug, Default, Clone, Copy)]
pub struct WsFrames {
    /// The frame header read so far (at most 14 bytes).
    head: [u8; 14],
    have: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
}

impl WsFrames {
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// The header's length once its first two bytes are known.
    fn header_len(&self) -> usize {
        let extended = match self.head[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut len = [0; 8];
                len.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(len)
            }
            n => u64::from(n),
        }
    }

    /// Consumes `data`; with `stop`, only up to the first frame boundary in it, returning
    /// that length (`None`: no boundary, all consumed). A boundary at the very start of
    /// `data` is not looked for: check [`at_boundary`](Self::at_boundary) first.
    pub fn feed(&mut self, data: &[u8], stop: bool) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let take = self.remaining.min((data.len() - i) as u64);
                self.remaining -= take;
                i += take as usize;
            } else {
                self.head[usize::from(self.have)] = data[i];
                self.have += 1;
                i += 1;
                if self.have < 2 || usize::from(self.have) < self.header_len() {
                    continue;
                }
                self.remaining = self.payload_len();
                self.have = 0;
            }
            if stop && self.at_boundary() {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `stream` in the given chunk sizes; returns where it stopped, from the start.
    fn sse_stop(stream: &[u8], chunk: usize, stop_after: usize) -> Option<usize> {
        let mut scanner = SseScanner::default();
        let (before, after) = stream.split_at(stop_after);
        scanner.feed(before, false);
        if scanner.at_boundary() {
            return Some(stop_after);
        }
        let mut offset = stop_after;
        for piece in after.chunks(chunk.max(1)) {
            if let Some(n) = scanner.feed(piece, true) {
                return Some(offset + n);
            }
            offset += piece.len();
        }
        None
    }

    #[test]
    fn sse_ends_after_the_blank_line() {
        let stream = b"data: one\n\ndata: two\ndata: more\n\n";
        assert_eq!(sse_stop(stream, 1000, 0), Some(0), "nothing sent yet is a boundary");
        assert_eq!(sse_stop(stream, 1000, 3), Some(11));
        assert_eq!(sse_stop(stream, 1, 12), Some(stream.len()));
        assert_eq!(sse_stop(stream, 1000, 11), Some(11), "already at a boundary");
    }

    #[test]
    fn sse_line_endings_of_every_kind() {
        let crlf = b"data: a\r\n\r\ndata: b\r\n\r\n";
        assert_eq!(sse_stop(crlf, 1000, 2), Some(11), "the LF of the CRLF is included");
        assert_eq!(sse_stop(crlf, 1, 2), Some(10), "a CR at a chunk's end is a boundary");
        let cr = b"data: a\r\rdata: b\r\r";
        assert_eq!(sse_stop(cr, 1000, 2), Some(9));
        let one_line_crlf = b"data: a\r\ndata: b\r\n";
        assert_eq!(sse_stop(one_line_crlf, 1000, 2), None, "no blank line, no boundary");
    }

    #[test]
    fn sse_comment_lines_and_leading_blank_lines() {
        let mut scanner = SseScanner::default();
        assert_eq!(scanner.feed(b"\n\r\n", true), None, "blank lines between events end nothing");
        assert!(scanner.at_boundary());
        assert_eq!(scanner.feed(b": keep-alive\n", true), None);
        assert!(!scanner.at_boundary());
        assert_eq!(scanner.feed(b"\n", true), Some(1));
    }

    /// A WebSocket frame from the server: unmasked, with the given payload length.
    fn ws_frame(len: usize) -> Vec<u8> {
        let mut frame = vec![0x81];
        match len {
            0..=125 => frame.push(len as u8),
            126..=65535 => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend(std::iter::repeat_n(b'x', len));
        frame
    }

    #[test]
    fn ws_boundaries_of_each_length_form() {
        for len in [0, 5, 125, 126, 300, 65535, 70_000] {
            let frame = ws_frame(len);
            let mut frames = WsFrames::default();
            assert!(frames.at_boundary());
            assert_eq!(frames.feed(&frame[..1], true), None);
            assert!(!frames.at_boundary());
            assert_eq!(frames.feed(&frame[1..], true), Some(frame.len() - 1), "length {len}");
            assert!(frames.at_boundary());
        }
    }

    #[test]
    fn ws_masked_frames_count_their_key() {
        let mut frame = vec![0x82, 0x80 | 3, 1, 2, 3, 4, b'a', b'b', b'c'];
        frame.extend_from_slice(&ws_frame(2));
        let mut frames = WsFrames::default();
        assert_eq!(frames.feed(&frame, true), Some(9));
        assert_eq!(frames.feed(&frame[9..], true), Some(4));
    }

    proptest! {
        /// However a stream of frames is cut into chunks, the tracker stops exactly at
        /// the frame ends.
        #[test]
        fn ws_stops_at_frame_ends_whatever_the_chunks(
            lens in prop::collection::vec(0usize..400, 1..8),
            chunk in 1usize..64,
        ) {
            let frames: Vec<Vec<u8>> = lens.iter().map(|&l| ws_frame(l)).collect();
            let ends: Vec<usize> = frames.iter().scan(0, |at, f| { *at += f.len(); Some(*at) }).collect();
            let stream = frames.concat();
            let mut tracker = WsFrames::default();
            let mut found = Vec::new();
            let mut offset = 0;
            for piece in stream.chunks(chunk) {
                let mut rest = piece;
                while let Some(n) = tracker.feed(rest, true) {
                    offset += n;
                    found.push(offset);
                    rest = &rest[n..];
                }
                offset += rest.len();
            }
            prop_assert_eq!(found, ends);
        }

        /// The same for SSE events, whatever the line endings and chunking.
        #[test]
        fn sse_stops_at_event_ends_whatever_the_chunks(
            events in prop::collection::vec((prop::collection::vec("[a-z ]{0,20}", 1..4), 0usize..3), 1..6),
            chunk in 1usize..32,
        ) {
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            for (lines, eol) in &events {
                let eol: &[u8] = [&b"\n"[..], b"\r\n", b"\r"][*eol];
                for line in lines {
                    stream.extend_from_slice(b"data: ");
                    stream.extend_from_slice(line.as_bytes());
                    stream.extend_from_slice(eol);
                }
                stream.extend_from_slice(eol);
                ends.push(stream.len());
            }
            let mut scanner = SseScanner::default();
            let mut found = Vec::new();
            let mut offset = 0;
            for piece in stream.chunks(chunk) {
                let mut rest = piece;
                while let Some(n) = scanner.feed(rest, true) {
                    offset += n;
                    rest = &rest[n..];
                    found.push(offset);
                }
                offset += rest.len();
            }
            // A CRLF split across chunks ends the event at its CR; the LF then opens no new
            // event. Compare by event count and each end within one byte.
            prop_assert_eq!(found.len(), ends.len());
            for (f, e) in found.iter().zip(&ends) {
                prop_assert!(*e - 1 <= *f && *f <= *e, "found {} for end {}", f, e);
            }
        }
    }
}
