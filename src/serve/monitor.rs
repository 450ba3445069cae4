//! The operator's view on the HTTP listener:
//! - `GET /`: the live status page (static HTML and JS, embedded; it asks for a
//!   token and polls the status with it), `GET /assets/NAME` its files;
//! - `GET /metrics`: Prometheus text exposition (OpenMetrics 1.0), observe::metrics;
//! - `GET /api/v1/status`: the page's data as JSON (observe::status);
//! - `POST /api/v1/queue`: `{"action": "pause"|"resume"|"rate", "target": KEY,
//!   "rate": "10/s"|"unlimited"}`, what `volley queue` does, through the admin socket.
//!
//! Everything but the page's own files needs a bearer token (the API's tokens):
//! the status lists recipients' addresses, and no state changes without one.
//! `volley send --metrics ADDR` serves `/metrics` alone, without a token
//! ([`serve_metrics`]).

use crate::deliver::control;
use crate::observe::metrics::{Board, EXPOSITION_CONTENT_TYPE};
use crate::observe::status::{self, CampaignRow};
use crate::serve::auth::Scope;
use crate::serve::http::{authorize, error, Api};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

/// Octets of a queue request's body read at most (an action, a key and a rate).
pub const QUEUE_REQUEST_OCTETS_MAX: usize = 4096;

const PAGE: &str = include_str!("page/index.html");
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "volley.js",
        "text/javascript; charset=utf-8",
        include_str!("page/volley.js"),
    ),
    (
        "volley.css",
        "text/css; charset=utf-8",
        include_str!("page/volley.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("page/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("page/vendor/uPlot.min.css"),
    ),
];

/// Binds `volley send --metrics`' listener, before anything is queued:
/// loopback alone, as nothing asks a token. Errors: another address (with the
/// ways to reach metrics from elsewhere), or one that cannot be bound.
pub fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "--metrics {addr}: send's metrics ask no token, so they are served on loopback alone (127.0.0.1:PORT or [::1]:PORT); put a proxy with authentication in front to reach them from elsewhere, or run `volley serve`, whose /metrics needs a token"
        );
    }
    crate::serve::http::bind(addr)
        .map_err(|e| anyhow::anyhow!("--metrics: {e}; nothing was queued"))
}

/// Serves `GET /metrics` alone from `board` on `listener` ([`bind_metrics`]'s, on
/// `addr`) until `stop` (`volley send --metrics`): no token, as the counts hold
/// no addresses.
pub fn serve_metrics(
    listener: std::net::TcpListener,
    addr: std::net::SocketAddr,
    board: Arc<Board>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let board = board.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, EXPOSITION_CONTENT_TYPE)],
                    board.encode(),
                )
            }
        }),
    );
    crate::serve::http::spawn_server(listener, addr, app, stop)
}

/// The monitor's routes, for the API's router.
pub fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/", get(page))
        .route("/assets/{name}", get(asset))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status_json))
        .route("/api/v1/queue", post(queue))
}

/// Headers every page file carries: no framing by other sites, no sniffing, and
/// scripts only from the daemon itself.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 4] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    ]
}

async fn page() -> Response {
    (page_headers("text/html; charset=utf-8"), PAGE).into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => (page_headers(ct), *body).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("no asset `{name}`"),
            Vec::new(),
        ),
    }
}

async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&api, &headers, Scope::Read) {
        return *r;
    }
    let text = api.intake.board.encode();
    ([(header::CONTENT_TYPE, EXPOSITION_CONTENT_TYPE)], text).into_response()
}

async fn status_json(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&api, &headers, Scope::Read) {
        return *r;
    }
    let now = SystemTime::now();
    let campaigns = api
        .intake
        .all_instances()
        .values()
        .filter(|i| !i.submission)
        .map(|i| {
            let c = i.outcomes.snapshot();
            let done = c.delivered + c.bounced + c.expired;
            // Counts are since the start: so is the rate behind the ETA.
            let since = i.queued_at.max(api.intake.board.started());
            let elapsed = now.duration_since(since).unwrap_or_default().as_secs_f64();
            CampaignRow {
                campaign: i.settings.id.clone(),
                instance: i.no,
                recipients: i.recipients,
                delivered: c.delivered,
                bounced: c.bounced,
                expired: c.expired,
                queued: c.queued,
                eta_s: status::eta_s(c.queued, done, elapsed),
            }
        })
        .collect();
    // It lists recipients: no cache keeps a copy.
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(status::status(&api.intake.board, campaigns)),
    )
        .into_response()
}

/// A queue button's request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueRequest {
    action: String,
    target: String,
    rate: Option<String>,
}

async fn queue(State(api): State<Arc<Api>>, req: axum::extract::Request) -> Response {
    // The token first: nothing of an unauthenticated body is read.
    let who = match authorize(&api, req.headers(), Scope::Control) {
        Ok(name) => name,
        Err(r) => return *r,
    };
    let read = axum::body::to_bytes(req.into_body(), QUEUE_REQUEST_OCTETS_MAX);
    let body = match tokio::time::timeout(api.request_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a queue request is at most {QUEUE_REQUEST_OCTETS_MAX} octets (QUEUE_REQUEST_OCTETS_MAX)"),
                Vec::new(),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within request_timeout; nothing was changed",
                Vec::new(),
            )
        }
    };
    let req: QueueRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not {{\"action\": \"pause\"|\"resume\"|\"rate\", \"target\": KEY, \"rate\": \"10/s\"}}: {e}"),
                Vec::new(),
            )
        }
    };
    let line = match queue_line(&req) {
        Ok(l) => l,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why, Vec::new()),
    };
    let spool = api.intake.spool.clone();
    let asked = line.clone();
    let answer = tokio::task::spawn_blocking(move || control::request(&spool, &asked)).await;
    match answer {
        Ok(Ok(text)) => {
            eprintln!("volley serve: http: token {who}: {line}");
            Json(json!({"ok": true, "command": line, "answer": text})).into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("`{line}` was not applied: {e:#}"),
            Vec::new(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the queue task failed: {e}"),
            Vec::new(),
        ),
    }
}

/// The admin socket's line for `req`, checked as `volley queue` checks it.
fn queue_line(req: &QueueRequest) -> Result<String, String> {
    control::check_word("target", &req.target)?;
    let line = match (req.action.as_str(), &req.rate) {
        ("pause" | "resume", None) => format!("{} {}", req.action, req.target),
        ("rate", Some(rate)) => {
            control::check_word("rate", rate)?;
            format!("rate {} {rate}", req.target)
        }
        ("pause" | "resume", Some(_)) => {
            return Err(format!("`{}` takes no rate", req.action));
        }
        ("rate", None) => return Err("`rate` needs a rate: \"10/s\", \"600/min\" or \"unlimited\"".into()),
        (a, _) => {
            return Err(format!(
                "`{a}` is not an action here; pause, resume and rate are (purge is `volley queue purge`)"
            ))
        }
    };
    control::parse(&line)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(action: &str, target: &str, rate: Option<&str>) -> QueueRequest {
        QueueRequest {
            action: action.into(),
            target: target.into(),
            rate: rate.map(Into::into),
        }
    }

    #[test]
    fn queue_requests_become_admin_lines_or_clear_errors() {
        assert_eq!(
            queue_line(&req("pause", "provider:gmail", None)).unwrap(),
            "pause provider:gmail"
        );
        assert_eq!(
            queue_line(&req("rate", "gmail.com", Some("10/s"))).unwrap(),
            "rate gmail.com 10/s"
        );
        assert!(queue_line(&req("purge", "gmail.com", None))
            .unwrap_err()
            .contains("volley queue purge"));
        assert!(queue_line(&req("rate", "gmail.com", None))
            .unwrap_err()
            .contains("needs a rate"));
        assert!(queue_line(&req("pause", "provider:a b", None)).is_err());
        assert!(queue_line(&req("pause", "provider:a\nstatus", None)).is_err());
        assert!(queue_line(&req("pause", "nothing", None))
            .unwrap_err()
            .contains("not a target"));
        assert!(queue_line(&req("rate", "gmail.com", Some("fast"))).is_err());
    }
}
