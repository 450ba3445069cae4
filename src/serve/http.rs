//! The HTTP injection API, on its own thread (a current-thread tokio runtime;
//! staging and ingest run on its blocking pool):
//! - `POST /api/v1/inject`: a campaign as JSON (serve::inject), `202` once durable;
//!   an id the daemon already has gets `409` (a client retrying after a timeout must
//!   not send a campaign twice) unless `?new=true` asks for another instance;
//! - `GET /api/v1/campaigns/{id}`: its counts by outcome;
//! - `GET /api/v1/track?rcpt=ADDRESS[&campaign=ID]`: where a recipient is
//!   (deliver::track, as `volley track --json`);
//! - the status page, `/metrics`, the status and queue control: serve::monitor.
//!
//! Every request but the status page's own files needs `Authorization: Bearer
//! TOKEN` (serve::auth tokens). Errors are JSON: `{"error": what, "problems":
//! [{"pointer", "why"}]}`.

use crate::host::privilege::{self, PrivilegeError};
use crate::observe::metrics::Door;
use crate::serve::auth::{Scope, Tokens};
use crate::serve::inject::{self, ApiProblem};
use crate::serve::intake::Intake;
use crate::spool::ingest::IngestError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Largest request body by default (`body_size_max`): a million recipients with a
/// few merge fields fit.
pub const BODY_SIZE_MAX_DEFAULT: usize = 256 * 1024 * 1024;

/// Seconds a client is asked to wait (Retry-After) when injection is refused for
/// a full inbox or spool.
pub const RETRY_AFTER_S: u64 = 5;

/// What the handlers share.
pub struct Api {
    /// Largest request body read, octets (`body_size_max`): over it, 413.
    pub body_size_max: usize,
    /// Requests handled at once (`connections_max`): past it, 503 with Retry-After.
    pub in_flight: tokio::sync::Semaphore,
    /// How long a request body may take to arrive (`request_timeout`): then 408.
    pub request_timeout: Duration,
    /// Where campaigns go.
    pub intake: Arc<Intake>,
    /// Replaced on SIGHUP.
    pub tokens: Arc<RwLock<Tokens>>,
    /// Where bodies are staged as campaign directories (under the spool).
    pub staging: PathBuf,
}

/// Binds the API's socket, before the daemon drops privilege (EACCES says how to
/// get a port below 1024).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, PrivilegeError> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| privilege::bind_error("http listener", addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| privilege::bind_error("http listener", addr, e))?;
    Ok(listener)
}

/// Serves the API on `listener` ([`bind`]'s, on `addr`) until `stop`; returns once
/// its thread runs (or why not).
pub fn start(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    body_size_max: usize,
    api: Api,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    // Bodies staged by a daemon that was killed are no one's: the spool is locked.
    let _ = std::fs::remove_dir_all(&api.staging);
    std::fs::create_dir_all(&api.staging)
        .map_err(|e| anyhow::anyhow!("{}: {e}", api.staging.display()))?;
    let app = Router::new()
        .route("/api/v1/inject", post(inject_campaign))
        .route("/api/v1/campaigns/{id}", get(campaign_counts))
        .route("/api/v1/track", get(track_rcpt))
        .merge(crate::serve::monitor::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_size_max))
        .with_state(Arc::new(api));
    spawn_server(listener, addr, app, stop)
}

/// How long a client may take to send a request's header section, each request;
/// then its connection is closed (a client that never ends its headers must not
/// hold a connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the HTTP listener holds open at once; past it, a new one waits in
/// the kernel's backlog until one closes.
pub const HTTP_CONNECTIONS_MAX: usize = 1024;

/// Resolves once `stop` is set (checked every 50 ms).
async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `app` on `listener` (bound to `addr`) on a thread of its own, a
/// current-thread tokio runtime, until `stop`; returns once the thread runs. Each
/// connection is HTTP/1.1 with [`HEADER_READ_TIMEOUT`], at most
/// [`HTTP_CONNECTIONS_MAX`] at once; at `stop`, connections finish the request
/// they are in and close.
pub fn spawn_server(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    app: Router,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let h = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(serve_connections(listener, addr, app, stop));
        })?;
    Ok(h)
}

/// The accept loop of [`spawn_server`].
async fn serve_connections(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    app: Router,
    stop: Arc<AtomicBool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener registers");
    let open = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stopped(&stop) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: said, and tried again shortly.
                    eprintln!("volley: http listener {addr}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&stop) => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closed = closed.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut http1 = hyper::server::conn::http1::Builder::new();
            http1
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = http1.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    let _ = closing.send(true);
    while conns.join_next().await.is_some() {}
}

/// A JSON error response: `{"error": what, "problems": [...]}`, with Retry-After
/// on a 503 and WWW-Authenticate on a 401.
pub fn error(status: StatusCode, what: &str, problems: Vec<ApiProblem>) -> Response {
    let mut r = (status, Json(json!({"error": what, "problems": problems}))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    }
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The token's name if it may do `scope`, or the response to send: 401 without a
/// known token, 403 for a token without that scope.
pub fn authorize(api: &Api, headers: &HeaderMap, scope: Scope) -> Result<String, Box<Response>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = presented else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "no `Authorization: Bearer TOKEN` header; make a token with `volley token add NAME --tokens FILE`",
            Vec::new(),
        )));
    };
    match api
        .tokens
        .read()
        .expect("tokens lock")
        .check_scope(token.trim(), scope)
    {
        Ok(name) => Ok(name.to_string()),
        Err(None) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not in the tokens file",
            Vec::new(),
        ))),
        Err(Some(why)) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            &format!(
                "{why}; make a token that may (`volley token add NAME --tokens FILE --scope {}`)",
                scope.name()
            ),
            Vec::new(),
        ))),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "no such endpoint: {}; the API has POST /api/v1/inject, GET /api/v1/campaigns/ID, GET /api/v1/track?rcpt=ADDRESS, GET /api/v1/status, POST /api/v1/queue, GET /metrics and the status page at /",
            uri.path()
        ),
        Vec::new(),
    )
}

async fn inject_campaign(State(api): State<Arc<Api>>, req: axum::extract::Request) -> Response {
    let new = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "new=true" || p == "new=1"));
    // The token first: an unauthenticated client gets nothing read into memory.
    if let Err(r) = authorize(&api, req.headers(), Scope::Inject) {
        return *r;
    }
    let Ok(_slot) = api.in_flight.try_acquire() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight (the API's connections_max); try again shortly",
            Vec::new(),
        );
    };
    let read = axum::body::to_bytes(req.into_body(), api.body_size_max);
    let body: Bytes = match tokio::time::timeout(api.request_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the request body could not be read: {e} (body_size_max is {} octets)",
                    api.body_size_max
                ),
                Vec::new(),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                "the request body did not arrive within request_timeout ({}); nothing was queued",
                humantime::format_duration(api.request_timeout)
            ),
                Vec::new(),
            )
        }
    };
    let api2 = api.clone();
    let done = tokio::task::spawn_blocking(move || stage_and_queue(&api2, &body, new)).await;
    match done {
        Ok(r) => r,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the injection task failed: {e}"),
            Vec::new(),
        ),
    }
}

/// Stages the body as a campaign directory, checks it as `volley check` does, and
/// queues it; the staging directory is removed whatever happens.
fn stage_and_queue(api: &Api, body: &[u8], new: bool) -> Response {
    let dir = api
        .staging
        .join(format!("{}-{:016x}", std::process::id(), fastrand::u64(..)));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot stage the campaign in {}: {e}", dir.display()),
            Vec::new(),
        );
    }
    let r = match inject::stage(body, &dir) {
        Err(problems) => error(
            StatusCode::BAD_REQUEST,
            "the campaign was refused; nothing was queued",
            problems,
        ),
        Ok(staged) => queue_staged(api, &staged.campaign, new),
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Queues a staged campaign: `409` when its id is already queued (unless `new`),
/// `202` once durable.
fn queue_staged(api: &Api, campaign: &crate::message::campaign::Campaign, new: bool) -> Response {
    let id = &campaign.settings.id;
    if let Some(i) = api.intake.instance_of(id).filter(|_| !new) {
        return (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("campaign `{id}` is already queued (instance {}); nothing was queued. POST /api/v1/inject?new=true queues it again", i.no),
                "campaign": id,
                "instance": i.no,
                "problems": [],
            })),
        )
            .into_response();
    }
    if let Some(t) = api.intake.pruned_instance_of(id).filter(|_| !new) {
        return (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("campaign `{id}` was sent already (instance {}, final since {}, pruned from the spool at {}); nothing was queued. POST /api/v1/inject?new=true sends it again", t.instance, t.finished_at, t.pruned_at),
                "campaign": id,
                "instance": t.instance,
                "problems": [],
            })),
        )
            .into_response();
    }
    match api.intake.queue_campaign(campaign) {
        Ok(done) => {
            api.intake.board.injected(Door::Http, done.recipients);
            (
            StatusCode::ACCEPTED,
            Json(json!({
                "campaign": campaign.settings.id,
                "instance": done.instance,
                "queued": done.recipients,
            })),
        )
            .into_response()
        }
        Err(IngestError::Problems(problems, _)) => error(
            StatusCode::BAD_REQUEST,
            "the campaign was refused; nothing was queued",
            problems
                .iter()
                .map(|p| ApiProblem {
                    pointer: String::new(),
                    why: p.to_string(),
                })
                .collect(),
        ),
        Err(IngestError::Other(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the campaign could not be queued now, nothing of it will be sent: {e:#}; try again"),
            Vec::new(),
        ),
    }
}

async fn campaign_counts(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    // Any campaign's counts, for a token that may inject (an application following
    // what it queued; tokens do not own campaigns) or read.
    if let Err(r) =
        authorize(&api, &headers, Scope::Inject).or_else(|_| authorize(&api, &headers, Scope::Read))
    {
        return *r;
    }
    let instances = api.intake.instances_of(&id);
    if instances.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no campaign `{id}` in this spool"),
            Vec::new(),
        );
    }
    let mut total = crate::spool::ingest::OutcomeCounts::default();
    let mut list = Vec::new();
    for i in &instances {
        let c = i.outcomes.snapshot();
        total.add(&c);
        list.push(json!({"instance": i.no, "recipients": i.recipients, "outcomes": c}));
    }
    let recipients: u64 = instances.iter().map(|i| i.recipients).sum();
    Json(json!({
        "campaign": id,
        "recipients": recipients,
        "outcomes": total,
        // Recovered at start or taken in since, less what became final: counts of
        // what was final before the start are not kept.
        "queued": total.queued,
        "instances": list,
    }))
    .into_response()
}

/// `GET /api/v1/track?rcpt=ADDRESS[&campaign=ID]`: `volley track --json`'s answer
/// (deliver::track: the shards asked over the admin socket, the log through its
/// index); 404 with the same body when nothing is known, 400 without an address.
async fn track_rcpt(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    use crate::deliver::track::{track, TrackError};
    if let Err(r) = authorize(&api, &headers, Scope::Read) {
        return *r;
    }
    let (mut rcpt, mut campaign) = (None, None);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "rcpt" => rcpt = Some(v.into_owned()),
            "campaign" => campaign = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(rcpt) = rcpt else {
        return error(
            StatusCode::BAD_REQUEST,
            "no recipient; ask GET /api/v1/track?rcpt=ADDRESS[&campaign=ID]",
            Vec::new(),
        );
    };
    let (spool, log) = (api.intake.spool.clone(), api.intake.log.0.clone());
    let done = tokio::task::spawn_blocking(move || track(&spool, &log, &rcpt, campaign.as_deref()));
    match done.await {
        Ok(Ok(t)) if t.found() => Json(t).into_response(),
        Ok(Ok(t)) => (StatusCode::NOT_FOUND, Json(t)).into_response(),
        Ok(Err(e @ TrackError::NotAnAddress(_))) => {
            error(StatusCode::BAD_REQUEST, &e.to_string(), Vec::new())
        }
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            Vec::new(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the tracking task failed: {e}"),
            Vec::new(),
        ),
    }
}
