//! Why a request could not be proxied, and the one place that decides which status and
//! body the client gets for it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use crate::routes::BadPath;
use crate::upstream::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("malformed request path: {0}")]
    BadPath(#[from] BadPath),
    #[error("request headers are {size} bytes, over the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("no route matches host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("route {route:?} has no server in rotation")]
    NoServer { route: Arc<str> },
    #[error("backend {backend:?} of route {route:?} has no server in rotation")]
    BackendDown { route: Arc<str>, backend: Arc<str> },
    #[error("backend {backend:?} of route {route:?}: {source}")]
    Connect { route: Arc<str>, backend: Arc<str>, source: ConnectError },
    #[error("backend {backend:?} of route {route:?}: server {server} failed: {source}")]
    Upstream { route: Arc<str>, backend: Arc<str>, server: Arc<str>, source: crate::upstream::Error },
    #[error("backend {backend:?} of route {route:?}: the server switched protocols (101) without being asked")]
    UnaskedUpgrade { route: Arc<str>, backend: Arc<str> },
    #[error("backend {backend:?} of route {route:?}: server {server} sent no response head within {after:?}")]
    Timeout { route: Arc<str>, backend: Arc<str>, server: Arc<str>, after: Duration },
    #[error("backend {backend:?} of route {route:?}: server {server} was drained and its deadline passed before it answered{why}")]
    DrainCut { route: Arc<str>, backend: Arc<str>, server: Arc<str>, why: &'static str },
    /// The client's own body failed while it was being sent on: the client hung up
    /// mid-upload, or its chunked framing was broken. Nothing the server did.
    #[error("route {route:?}: reading the request body from the client failed: {source}")]
    ClientBody { route: Arc<str>, source: hyper::Error },
}

impl ProxyError {
    /// Refused before a route was found, so counted with the unrouted requests; every other
    /// error is counted where it happens, against its route and backend.
    pub fn is_before_route(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::BadPath(_)
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::NoRoute { .. }
        )
    }

    /// The one mapping from error to status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadPath(_) | ProxyError::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoServer { .. } | ProxyError::BackendDown { .. } | ProxyError::DrainCut { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::UnaskedUpgrade { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the upstream caused it (for logs now, and for analysis later); the client's
    /// own mistakes are not held against a backend.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::Timeout { .. }
                | ProxyError::UnaskedUpgrade { .. }
        )
    }

    /// A plain-text answer naming the cause, logged once here.
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        if self.is_upstream_failure() || status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
        message(status, format!("{self}\n"))
    }
}

/// A short plain-text response.
pub fn message(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::message(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
