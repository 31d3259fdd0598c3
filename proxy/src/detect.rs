//! Inbound protocol detection: is the caller a mesh proxy (TLS with ALPN `palisade/1`) or a
//! plaintext caller? Decided on peeked bytes, never consuming them, within a short window so
//! that server-speaks-first protocols never stall.

use std::time::Duration;

use palisade_ca_api::tls::{MESH_ALPN, MESH_TUNNEL_ALPN};
use tokio::net::TcpStream;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A TLS ClientHello offering `palisade/1`.
    Mesh,
    /// Anything else: a plaintext caller (`reason` is the metric label).
    Plaintext(&'static str),
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// The most bytes peeked: a TLS record header and the largest record.
pub const MAX_PEEK: usize = 5 + 16 * 1024;

/// Classifies the first bytes of a connection. Pure.
pub fn classify(bytes: &[u8]) -> Sniff {
    if bytes.is_empty() {
        return Sniff::NeedMore;
    }
    // TLS handshake record, major version 3.
    if bytes[0] != 0x16 {
        return Sniff::Plaintext("not_tls");
    }
    if bytes.len() < 5 {
        return if bytes.len() >= 2 && bytes[1] != 0x03 {
            Sniff::Plaintext("not_tls")
        } else {
            Sniff::NeedMore
        };
    }
    if bytes[1] != 0x03 {
        return Sniff::Plaintext("not_tls");
    }
    let record_len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
    if record_len == 0 || record_len > 16 * 1024 {
        return Sniff::Plaintext("not_tls");
    }
    if bytes.len() < 5 + record_len {
        return Sniff::NeedMore;
    }
    match client_hello_offers_mesh_alpn(&bytes[5..5 + record_len]) {
        Some(true) => Sniff::Mesh,
        Some(false) => Sniff::Plaintext("tls_without_mesh_alpn"),
        None => Sniff::Plaintext("not_tls"),
    }
}

/// Reads a ClientHello handshake message (which must fit in the first record) and says
/// whether its ALPN extension lists `palisade/1`. `None` when it is not a readable ClientHello.
fn client_hello_offers_mesh_alpn(record: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let hs_len = r.u24()?;
    let body = r.take(hs_len)?; // a ClientHello split across records is not a proxy's
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy version, random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let compression = r.u8()? as usize;
    r.take(compression)?;
    if r.0.is_empty() {
        return Some(false); // no extensions
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let data = exts.take(len)?;
        if kind == 0x0010 {
            let mut a = Reader(data);
            let list_len = a.u16()? as usize;
            let mut list = Reader(a.take(list_len)?);
            while !list.0.is_empty() {
                let n = list.u8()? as usize;
                let offered = list.take(n)?;
                if offered == MESH_ALPN || offered == MESH_TUNNEL_ALPN {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

/// Peeks at `stream` until [`classify`] decides or `window` runs out. No bytes within the
/// window, or an unfinished ClientHello, make a plaintext caller.
pub async fn sniff(stream: &TcpStream, window: Duration) -> std::io::Result<Sniff> {
    let deadline = tokio::time::Instant::now() + window;
    // A ClientHello is usually well under 2 KiB; grow only when the record says so.
    let mut buf = vec![0u8; 2048];
    let mut seen = 0usize;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) if seen == 0 => return Ok(Sniff::Plaintext("no_bytes_in_window")),
            Err(_) => return Ok(Sniff::Plaintext("incomplete_client_hello")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok(Sniff::Plaintext("closed_before_detection")),
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Sniff::NeedMore => {
                if n >= MAX_PEEK {
                    return Ok(Sniff::Plaintext("not_tls"));
                }
                if n == buf.len() && n >= 5 {
                    let record = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
                    buf.resize(record.clamp(n + 1, MAX_PEEK), 0);
                }
                if n == seen {
                    // Peek returns at once while bytes are buffered: wait a little for more.
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Sniff::Plaintext("incomplete_client_hello"));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                seen = n;
            }
            decided => return Ok(decided),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, with the given ALPN protocols.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let mut config =
            rustls::ClientConfig::builder_with_provider(palisade_ca_api::tls::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), "example.com".try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn mesh_client_hello_is_recognised() {
        let hello = client_hello(&[b"h2", MESH_ALPN]);
        assert_eq!(classify(&hello), Sniff::Mesh);
        assert_eq!(
            classify(&client_hello(&[MESH_TUNNEL_ALPN, MESH_ALPN])),
            Sniff::Mesh
        );
        assert_eq!(classify(&client_hello(&[MESH_TUNNEL_ALPN])), Sniff::Mesh);
        // Any prefix needs more bytes, never a wrong verdict.
        for cut in [1, 3, 5, 40, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn other_tls_and_garbage_are_plaintext_callers() {
        assert_eq!(
            classify(&client_hello(&[b"h2", b"http/1.1"])),
            Sniff::Plaintext("tls_without_mesh_alpn")
        );
        assert_eq!(
            classify(&client_hello(&[])),
            Sniff::Plaintext("tls_without_mesh_alpn")
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Sniff::Plaintext("not_tls"));
        assert_eq!(classify(&[0x16, 0x01]), Sniff::Plaintext("not_tls"));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Sniff::Plaintext("not_tls")
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0xff, 0xff]),
            Sniff::Plaintext("not_tls")
        );
        // A handshake header claiming more than the record holds.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x10, 0x00]),
            Sniff::Plaintext("not_tls")
        );
    }
}
