//! The same server over real HTTP on loopback, so that a `wgpin-operator` or `wgpin-agent`
//! *process* can talk to it through an ordinary kubeconfig: end-to-end tests of the binaries,
//! and benchmarks that measure the operator's own memory apart from the server's.

use std::convert::Infallible;

use http::Request;
use http_body_util::BodyExt as _;

use crate::FakeApiServer;

/// Serves `server` on `listener` (HTTP/1.1, no TLS) until the task is dropped.
pub async fn serve_http(server: FakeApiServer, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let server = server.clone();
                    async move {
                        let (mut parts, body) = request.into_parts();
                        parts.headers.insert(
                            crate::OVER_HTTP_HEADER,
                            http::HeaderValue::from_static("true"),
                        );
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let request =
                            Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
                        Ok::<_, Infallible>(server.handle(request).await)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A kubeconfig that points at `address` with no credentials.
pub fn kubeconfig(address: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{address}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
"
    )
}
