//! The demo's apps and callers: a small HTTP/1.1 app for the proxies to protect, and one-shot
//! HTTP calls that report what the caller saw (an answer, or a connection closed without one).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// How long one call may take, end to end.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest request head or response the demo reads.
const MAX_MESSAGE: usize = 64 * 1024;

/// What a caller saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer.
    Answered { status: u16, body: String },
    /// The connection was accepted, then closed without an answer.
    Closed,
    /// No connection, no answer in time, or an answer that is not HTTP.
    Failed(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Answered { status: 200, .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered { status, body } => write!(f, "HTTP {status} {:?}", body.trim()),
            Outcome::Closed => f.write_str("connection closed without an answer"),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// An HTTP app on loopback that answers every request with its name; stopped when dropped.
pub struct App {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl App {
    pub async fn start(listen: SocketAddr, name: &'static str) -> std::io::Result<App> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, name));
        Ok(App { addr, task })
    }

    /// Stops the app and returns once its listener is closed (an abort alone takes effect
    /// only when the runtime next polls the task).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks: aborting it ends them too.
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, name: &'static str) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        if connections.len() < 256 {
            connections.spawn(answer(stream, name));
        }
    }
}

async fn answer(mut stream: TcpStream, name: &'static str) {
    let exchange = async {
        let head = read_head(&mut stream).await?;
        let path = request_path(&head).unwrap_or("/");
        let body = format!("{name} answered {path}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(CALL_TIMEOUT, exchange).await;
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_MESSAGE {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The path of a request line `GET /path HTTP/1.1`. Pure.
fn request_path(head: &str) -> Option<&str> {
    head.lines().next()?.split_whitespace().nth(1)
}

/// `GET path` to `to`, from the address `from` when given (a caller with its own loopback
/// address, as a pod has its own IP).
pub async fn get(from: Option<Ipv4Addr>, to: SocketAddr, path: &str) -> Outcome {
    let exchange = async {
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = from {
            socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
        }
        let mut stream = socket.connect(to).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A refusal may arrive as a reset rather than an orderly close: both mean no answer.
        let read = (&mut stream)
            .take(MAX_MESSAGE as u64)
            .read_to_end(&mut response)
            .await;
        if let Err(e) = read
            && response.is_empty()
            && e.kind() != std::io::ErrorKind::ConnectionReset
        {
            return Err(e);
        }
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
        Err(_) => Outcome::Failed(format!("no answer within {CALL_TIMEOUT:?}")),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Ok(Ok(bytes)) => parse_response(&bytes),
    }
}

/// What a caller makes of the bytes it got back. Pure.
pub fn parse_response(bytes: &[u8]) -> Outcome {
    if bytes.is_empty() {
        return Outcome::Closed;
    }
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match (status, text.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Outcome::Answered {
            status,
            body: body.to_owned(),
        },
        _ => Outcome::Failed(format!(
            "not an HTTP answer: {:?}",
            text.chars().take(60).collect::<String>()
        )),
    }
}

/// `GET path` on an admin listener; the body of a 200 answer.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<String, String> {
    match get(None, admin, path).await {
        Outcome::Answered { status: 200, body } => Ok(body),
        other => Err(format!("GET http://{admin}{path}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_as_a_caller_sees_them() {
        assert_eq!(parse_response(b""), Outcome::Closed);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n"),
            Outcome::Answered {
                status: 200,
                body: "hi\n".into()
            }
        );
        assert!(matches!(
            parse_response(b"\x15\x03\x03garbage"),
            Outcome::Failed(_)
        ));
        assert_eq!(request_path("GET /orders HTTP/1.1\r\n"), Some("/orders"));
    }

    #[tokio::test]
    async fn the_app_answers_and_a_closed_port_fails() {
        let app = App::start("127.0.0.1:0".parse().unwrap(), "api")
            .await
            .unwrap();
        let outcome = get(None, app.addr, "/orders").await;
        assert_eq!(
            outcome,
            Outcome::Answered {
                status: 200,
                body: "api answered /orders\n".into()
            }
        );
        assert!(outcome.is_ok());
        let addr = app.addr;
        drop(app);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(get(None, addr, "/").await, Outcome::Failed(_)));
    }
}
