//! The proxy's mesh-watch framing and decoding, fed arbitrary bytes cut at arbitrary points:
//! the same messages (or the same first error) however the stream was split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_ca_api::watch_lines::WatchLines;

fn decode(chunks: &[&[u8]]) -> Vec<Result<String, String>> {
    let mut lines = WatchLines::default();
    let mut out = Vec::new();
    for chunk in chunks {
        lines.push(chunk);
        loop {
            match lines.next_message() {
                Ok(Some(m)) => out.push(Ok(format!("{m:?}"))),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(rest.len());
    let split = decode(&[&rest[..at], &rest[at..]]);
    let whole = decode(&[rest]);
    assert_eq!(split, whole);
});
