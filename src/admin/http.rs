//! The read-only admin HTTP listener: `/healthz` (the process is alive), `/readyz` (serving;
//! 503 from the moment shutdown begins, so load balancers stop sending), `/api/status`
//! (the `status` answer as JSON), `/api/events` (the latest events), `/metrics`
//! (Prometheus), and at `/` a dashboard page that polls the two APIs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{Actor, Command, Handle};

/// The dashboard: one self-contained page (no external assets, so it works offline).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Events the dashboard and `/api/events` show.
const EVENTS_SHOWN: usize = 50;

/// What the admin HTTP listener reads.
#[derive(Debug, Clone)]
pub struct Admin {
    /// What `/readyz` says.
    pub ready: Arc<AtomicBool>,
    pub control: Handle,
    /// The proxy's client connections (and tunnels), for `switchyard_connections_open`.
    pub connections: TaskTracker,
}

/// Serves admin HTTP until `stop`.
pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, admin.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>, admin: Admin) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if admin.ready.load(Ordering::Relaxed) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".to_string()),
        "/" => (StatusCode::OK, "text/html; charset=utf-8", DASHBOARD.to_string()),
        "/api/events" => {
            let events = admin.control.send(Command::Events { last: EVENTS_SHOWN }, Actor::Switchyard).await;
            (StatusCode::OK, "application/json", format!("{events}\n"))
        }
        "/api/status" => {
            let status = admin.control.send(Command::Status { route: None }, Actor::Switchyard).await;
            (StatusCode::OK, "application/json", format!("{status}\n"))
        }
        "/metrics" => {
            let command = Command::Metrics { connections_open: admin.connections.len() };
            let answer = admin.control.send(command, Actor::Switchyard).await;
            match answer["text"].as_str() {
                Some(text) => (StatusCode::OK, prometheus::TEXT_FORMAT, text.to_string()),
                None => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{}\n", answer["error"])),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /healthz, /readyz, /api/status, /api/events, /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
