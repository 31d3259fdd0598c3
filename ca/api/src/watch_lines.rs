//! The mesh watch's framing: one JSON message per line, lines split across frames at random.
//! Kept apart from the HTTP body so that the decoder can be tested and fuzzed on its own.

use bytes::BytesMut;

use crate::wire::{MAX_WATCH_MESSAGE_BYTES, WatchMessage};

/// Bytes received so far on one watch, cut into messages at newlines.
#[derive(Default)]
pub struct WatchLines {
    buf: BytesMut,
    /// How much of `buf` holds no newline.
    scanned: usize,
}

impl WatchLines {
    /// Appends bytes as they arrive.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, `Ok(None)` when no whole line is buffered yet. Blank lines (the
    /// CA's keep-alives) are skipped. A line that is not a message, or a partial line longer
    /// than [`MAX_WATCH_MESSAGE_BYTES`], is an error: the caller drops the watch.
    pub fn next_message(&mut self) -> Result<Option<WatchMessage>, String> {
        loop {
            // Only the bytes not yet searched: a long line arrives in many frames.
            let Some(pos) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_WATCH_MESSAGE_BYTES {
                    return Err(format!(
                        "watch message longer than {} MiB",
                        MAX_WATCH_MESSAGE_BYTES >> 20
                    ));
                }
                return Ok(None);
            };
            let pos = self.scanned + pos;
            self.scanned = 0;
            let line = self.buf.split_to(pos + 1);
            let line = &line[..pos];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(line)
                .map(Some)
                .map_err(|e| format!("watch message: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_anywhere_are_reassembled_and_blank_lines_skipped() {
        let text = b"\n{\"type\":\"snapshot\",\"version\":7}\n  \n";
        for cut in 0..text.len() {
            let mut lines = WatchLines::default();
            lines.push(&text[..cut]);
            let mut seen = Vec::new();
            while let Some(m) = lines.next_message().unwrap() {
                seen.push(m);
            }
            lines.push(&text[cut..]);
            while let Some(m) = lines.next_message().unwrap() {
                seen.push(m);
            }
            assert_eq!(seen.len(), 1, "cut at {cut}");
        }
    }

    #[test]
    fn a_line_that_is_not_a_message_and_an_endless_line_are_errors() {
        let mut lines = WatchLines::default();
        lines.push(b"{\"type\":\"nonsense\"}\n");
        assert!(lines.next_message().unwrap_err().contains("watch message"));
        let mut lines = WatchLines::default();
        lines.push(&vec![b'x'; MAX_WATCH_MESSAGE_BYTES + 1]);
        assert!(lines.next_message().unwrap_err().contains("longer than"));
    }
}
