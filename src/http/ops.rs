//! Health, readiness and metrics for operators and load balancers.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, StatusCode};

use super::{reject, AppState};

pub async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    if app.shutdown.is_cancelled() {
        return reject(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if app.cluster.as_ref().is_some_and(|c| !c.is_ready()) {
        return reject(StatusCode::SERVICE_UNAVAILABLE, "Redis is unreachable");
    }
    (StatusCode::OK, "ready\n").into_response()
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.hub.metrics().render(app.hub.batching()),
    )
        .into_response()
}
