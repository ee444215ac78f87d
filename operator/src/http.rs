//! The small HTTP endpoint both binaries expose: `/metrics` (Prometheus text), `/healthz` (the
//! process answers) and `/readyz` (it is doing its job). Hand-written rather than a web framework:
//! three fixed GET routes do not justify one more server stack in a node agent.

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the endpoint reports. `readiness` returns `Err(reason)` while not ready; the reason is
/// the body of the 503, so `kubectl describe pod` shows it.
#[derive(Clone)]
pub struct Probes {
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub readiness: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// The status line, content type and body for one request path.
fn respond(path: &str, probes: &Probes) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            (probes.metrics)(),
        ),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/readyz" => match (probes.readiness)() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

/// The request head, read up to its blank line: a request may arrive in several segments, and
/// answering before all of it is read would close the connection on unread data (a reset).
/// `None` if the peer stops early or the head exceeds 8 KiB.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let len = stream.read(&mut buffer).await.ok()?;
        if len == 0 || head.len() + len > 8192 {
            return None;
        }
        head.extend_from_slice(&buffer[..len]);
    }
    Some(head)
}

/// Serves the probes on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, probes: Probes) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let probes = probes.clone();
        tokio::spawn(async move {
            let Ok(Some(request)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut stream))
                    .await
            else {
                return;
            };
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = respond(path, &probes);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn routes_answer_over_tcp_and_readiness_gives_its_reason() {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let probes = Probes {
            metrics: Arc::new(|| "wgpin_up 1\n".to_string()),
            readiness: Arc::new(move || {
                if flag.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("caches not synced".to_string())
                }
            }),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, probes));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.ends_with("wgpin_up 1\n"), "{metrics}");
        let not_ready = get("/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.ends_with("caches not synced\n"), "{not_ready}");
        ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
#[cfg(test)]
mod fragmented {
    use super::*;

    /// A request in three segments, as TCP may deliver it: answered once whole, never reset.
    #[tokio::test]
    async fn a_request_in_pieces_is_answered_whole() {
        let probes = Probes {
            metrics: Arc::new(|| "wgpin_up 1\n".to_string()),
            readiness: Arc::new(|| Ok(())),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(listener, probes));
        for _ in 0..20 {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            for piece in ["GET ", "/metrics", " HTTP/1.1\r\nhost: x\r\n\r\n"] {
                stream.write_all(piece.as_bytes()).await.expect("write");
                stream.flush().await.expect("flush");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
            assert!(response.ends_with("wgpin_up 1\n"), "{response}");
        }
        server.abort();
    }
}
