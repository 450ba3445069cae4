//! The operator's view of a running `volley serve`, over loopback: Prometheus
//! `/metrics`, the status JSON, queue control over HTTP, and the status page in a
//! real headless chromium whose pause button stops deliveries at the sink.

mod common;

use common::browser::Browser;
use common::daemon::{add_token, base_args, free_port, http, write_config, Daemon};
use common::Env;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a count may take to move (or to show) before a test gives up.
const MOVE_LIMIT: Duration = Duration::from_secs(30);

/// A daemon with the HTTP listener and the `google-sink` provider paced at
/// `rate`, its address and the API token (every scope). A second token, `crm`,
/// that may only inject, is in DIR/inject-token.
fn daemon(env: &Env, rate: &str) -> (Daemon, SocketAddr, String) {
    let spool = env.dir.join("spool");
    let (tokens, token) = add_token(&env.dir);
    let tokens_arg = tokens.display().to_string();
    let (code, crm, err) = common::daemon::volley(&[
        "token",
        "add",
        "crm",
        "--tokens",
        &tokens_arg,
        "--scope",
        "inject",
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(env.dir.join("inject-token"), crm.trim()).unwrap();
    let shaping = env.dir.join("shaping.toml");
    std::fs::write(
        &shaping,
        format!("[provider.google-sink]\nmx_suffixes = [\"google.sink.test\"]\nmax_msg_rate = \"{rate}\"\n"),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = write_config(
        &env.dir,
        &format!(
            "shaping = \"{}\"\ntokens = \"{}\"\n[http]\nlisten = \"{addr}\"\n",
            shaping.display(),
            tokens.display()
        ),
    );
    let mut args = base_args(env, &spool);
    args.extend(["--config".into(), cfg.display().to_string()]);
    (Daemon::start(&env.dir, &args), addr, token)
}

/// Injects campaign `id` over HTTP: `n` recipients at gmail.com (google-sink).
fn inject(addr: SocketAddr, token: &str, id: &str, n: usize) {
    let rcpts: Vec<String> = (0..n)
        .map(|i| format!("{{\"email\":\"user{i}@gmail.com\"}}"))
        .collect();
    let body = format!(
        "{{\"id\":\"{id}\",\"sender\":\"bounces@news.test\",\"from_domain\":\"news.test\",\"dkim\":false,\
          \"template\":\"From: news@news.test\\nTo: {{{{email}}}}\\nSubject: Hi\\n\\nHello\\n\",\
          \"recipients\":[{}]}}",
        rcpts.join(",")
    );
    let (status, _, resp) = http(addr, "POST", "/api/v1/inject", Some(token), &body);
    assert_eq!(status, 202, "{resp}");
}

fn accepted(env: &Env, provider: &str) -> u64 {
    env.sink.summary().per_provider[provider].rcpts_accepted
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + MOVE_LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a pause: waits until the transactions in flight at the pause have
/// ended (the sink's count holds for a second), then checks it holds 2 s more.
fn assert_paused_at_sink(env: &Env, provider: &str) {
    let mut last = accepted(env, provider);
    let mut still_since = Instant::now();
    let deadline = Instant::now() + MOVE_LIMIT;
    while still_since.elapsed() < Duration::from_secs(1) {
        assert!(
            Instant::now() < deadline,
            "the sink never stopped taking {provider}'s mail"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = accepted(env, provider);
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        accepted(env, provider),
        last,
        "the sink still took mail while paused"
    );
}

fn provider_row(s: &serde_json::Value, name: &str) -> serde_json::Value {
    s["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == name)
        .unwrap_or_else(|| panic!("no {name} row: {s}"))
        .clone()
}

fn status(addr: SocketAddr, token: &str) -> serde_json::Value {
    let (code, _, body) = http(addr, "GET", "/api/v1/status", Some(token), "");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the sample line that starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[test]
fn metrics_and_status_show_a_running_campaign_and_need_a_token() {
    let env = common::env("monitor-metrics", "rcpt_permfail = 0.1");
    let (_d, addr, token) = daemon(&env, "40/s");
    inject(addr, &token, "spring", 200);
    wait("the first deliveries", || accepted(&env, "google") >= 20);
    // Published once a second.
    std::thread::sleep(Duration::from_millis(1200));

    for path in ["/metrics", "/api/v1/status"] {
        let (code, head, _) = http(addr, "GET", path, None, "");
        assert_eq!(code, 401, "{path} without a token");
        assert!(head.contains("www-authenticate: Bearer"), "{head}");
        let (code, _, _) = http(addr, "GET", path, Some("vly_wrong"), "");
        assert_eq!(code, 401, "{path} with a wrong token");
    }
    // Published once a second: scraped until a delivery and a bounce (10% of
    // recipients are refused) show.
    let bounced_of = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("volley_outcomes_total{outcome=\"bounced\",class=\"invalid_recipient\",provider=\"google-sink\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let delivered_series = "volley_outcomes_total{outcome=\"delivered\",class=\"\",provider=\"google-sink\",source=\"default\"}";
    let deadline = Instant::now() + MOVE_LIMIT;
    let (head, text) = loop {
        let (code, head, text) = http(addr, "GET", "/metrics", Some(&token), "");
        assert_eq!(code, 200, "{text}");
        if sample(&text, delivered_series).unwrap_or(0.0) >= 1.0 && bounced_of(&text) >= 1.0 {
            break (head, text);
        }
        assert!(
            Instant::now() < deadline,
            "no delivery or no bounce counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let delivered = sample(&text, delivered_series).unwrap();
    assert_eq!(
        sample(&text, "volley_injected_recipients_total{path=\"http\"}"),
        Some(200.0),
        "{text}"
    );
    // The configured 40/s over both shards.
    let limit = sample(
        &text,
        "volley_shaping_rate_limit_messages_per_second{key=\"provider:google-sink\"}",
    )
    .unwrap();
    assert!((limit - 40.0).abs() < 0.01, "{limit}");
    assert!(sample(&text, "volley_delivery_latency_seconds_count").unwrap() >= delivered);
    assert!(
        text.contains("volley_smtp_transaction_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
    assert!(
        text.contains("volley_queue_recipients{shard=\"0\",state=\"ready\"}"),
        "{text}"
    );
    assert!(sample(&text, "volley_spool_segments{shard=\"0\"}").unwrap() >= 1.0);
    // The sink offers STARTTLS: every delivery went over TLS.
    assert!(
        sample(
            &text,
            "volley_delivered_tls_total{provider=\"google-sink\"}"
        )
        .unwrap()
            >= 1.0
    );
    // Only bounded labels: no per-domain or per-MX series.
    assert!(
        !text.contains("site:") && !text.contains("gmail.com"),
        "{text}"
    );

    let s = status(addr, &token);
    let row = s["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "google-sink")
        .unwrap_or_else(|| panic!("no google-sink row: {s}"))
        .clone();
    assert_eq!(row["key"], "provider:google-sink");
    assert!(row["delivered"].as_u64().unwrap() >= 1, "{row}");
    assert!(
        (row["limit"].as_f64().unwrap() - 40.0).abs() < 0.01,
        "{row}"
    );
    let campaign = &s["campaigns"][0];
    assert_eq!(campaign["campaign"], "spring", "{s}");
    assert_eq!(campaign["recipients"], 200);
    let b = &s["bounces"][0];
    assert_eq!(b["class"], "invalid_recipient", "{s}");
    assert!(b["rcpt"].as_str().unwrap().ends_with("@gmail.com"));

    // Queue control: nothing without a token, nor with one that may only inject
    // (which cannot read the status or metrics either), then a pause that stops
    // the sink.
    let pause = r#"{"action":"pause","target":"provider:google-sink"}"#;
    let (code, _, _) = http(addr, "POST", "/api/v1/queue", None, pause);
    assert_eq!(code, 401);
    let crm = std::fs::read_to_string(env.dir.join("inject-token")).unwrap();
    for (method, path, body) in [
        ("POST", "/api/v1/queue", pause),
        ("GET", "/api/v1/status", ""),
        ("GET", "/metrics", ""),
    ] {
        let (code, _, resp) = http(addr, method, path, Some(&crm), body);
        assert_eq!(code, 403, "{path}: {resp}");
        assert!(resp.contains("token `crm` may inject, not"), "{resp}");
    }
    let (code, _, resp) = http(addr, "GET", "/api/v1/campaigns/spring", Some(&crm), "");
    assert_eq!(
        code, 200,
        "an injecting token reads its campaign's counts: {resp}"
    );
    let (code, _, body) = http(
        addr,
        "POST",
        "/api/v1/queue",
        Some(&token),
        r#"{"action":"purge","target":"gmail.com"}"#,
    );
    assert_eq!(code, 400, "{body}");
    // The refused requests paused nothing (the shards publish once a second).
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        provider_row(&status(addr, &token), "google-sink")["paused"],
        false
    );
    let (code, _, body) = http(addr, "POST", "/api/v1/queue", Some(&token), pause);
    assert_eq!(code, 200, "{body}");
    assert_paused_at_sink(&env, "google");
    let paused_at = accepted(&env, "google");
    let row = provider_row(&status(addr, &token), "google-sink");
    assert_eq!(row["paused"], true, "{row}");
    let (code, _, body) = http(
        addr,
        "POST",
        "/api/v1/queue",
        Some(&token),
        r#"{"action":"resume","target":"provider:google-sink"}"#,
    );
    assert_eq!(code, 200, "{body}");
    wait("deliveries after resume", || {
        accepted(&env, "google") > paused_at
    });
}

/// Evaluates to the text of the cell `col` (0-based) of provider `name`'s row, or null.
fn provider_cell(name: &str, col: usize) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#providers tr[data-provider=\"{name}\"]'); return r ? r.cells[{col}].textContent : null; }})()"
    )
}

#[test]
fn the_status_page_in_chromium_shows_providers_and_its_pause_button_stops_the_sink() {
    let env = common::env("monitor-page", "rcpt_permfail = 0.05");
    let Some(mut b) = Browser::start(&env.dir) else {
        return;
    };
    let (_d, addr, token) = daemon(&env, "30/s");
    inject(addr, &token, "autumn", 3000);
    wait("the first deliveries", || accepted(&env, "google") >= 10);

    b.open(&format!("http://{addr}/"), 1280, 800, false);
    b.wait_for(
        "document.readyState === 'complete' && typeof uPlot !== 'undefined'",
        MOVE_LIMIT,
        "the page and its scripts load",
    );
    // No token yet: the page says how to get one and shows no data.
    let asks = b.wait_for(
        "document.getElementById('error').textContent",
        MOVE_LIMIT,
        "the page asks for a token",
    );
    assert!(
        asks.as_str().unwrap().contains("volley token add"),
        "{asks}"
    );
    assert_eq!(
        b.eval(&provider_cell("google-sink", 0)),
        serde_json::Value::Null
    );
    // A wrong token is refused, visibly.
    b.eval("document.getElementById('token').value = 'vly_wrong'; document.getElementById('token-use').click(); 1");
    let refused = b.wait_for(
        "(document.getElementById('error').textContent.match(/not in the tokens file/) || [''])[0]",
        MOVE_LIMIT,
        "a wrong token is refused",
    );
    assert_eq!(refused, "not in the tokens file");
    b.eval(&format!(
        "document.getElementById('token').value = '{token}'; document.getElementById('token-use').click(); 1"
    ));
    assert_eq!(
        b.wait_for(
            &provider_cell("google-sink", 0),
            MOVE_LIMIT,
            "the provider row shows"
        ),
        "google-sink"
    );
    // Its delivered count, as the page shows it, moves with the sink's.
    let shown = |b: &mut Browser| -> u64 {
        b.eval(&provider_cell("google-sink", 5))
            .as_str()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap()
    };
    let first = shown(&mut b);
    wait("the page's count to move", || shown(&mut b) > first);
    assert!(shown(&mut b) <= accepted(&env, "google"));
    let total: u64 = b
        .eval("document.getElementById('t-delivered').textContent")
        .as_str()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(total >= first, "{total}");
    let campaign = b.wait_for(
        "(() => { const r = document.querySelector('#campaigns tr[data-campaign=\"autumn\"]'); return r ? r.cells[0].textContent : null; })()",
        MOVE_LIMIT,
        "the campaign row shows",
    );
    assert!(
        campaign.as_str().unwrap().starts_with("autumn #"),
        "{campaign}"
    );
    // The last bounces, with their class (5% of recipients are refused).
    let class = b.wait_for(
        "(() => { const r = document.querySelector('#bounces tbody tr'); return r && r.cells.length > 1 ? r.cells[4].textContent : null; })()",
        MOVE_LIMIT,
        "a bounce shows",
    );
    assert_eq!(class, "invalid_recipient");
    // Nothing overflows the window at 1280x800.
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        true
    );
    if let Ok(to) = std::env::var("VOLLEY_SCREENSHOT") {
        b.screenshot(Path::new(&to));
    }

    // The pause button: the sink stops taking google's mail.
    b.eval("document.querySelector('button[data-action=\"pause\"][data-key=\"provider:google-sink\"]').click(); 1");
    b.wait_for(
        "!!document.querySelector('button[data-action=\"resume\"][data-key=\"provider:google-sink\"]')",
        MOVE_LIMIT,
        "the row shows the pause and offers resume",
    );
    assert_paused_at_sink(&env, "google");
    let paused_at = accepted(&env, "google");
    let state = b.eval(&provider_cell("google-sink", 4));
    assert!(state.as_str().unwrap().contains("paused"), "{state}");
    b.eval("document.querySelector('button[data-action=\"resume\"][data-key=\"provider:google-sink\"]').click(); 1");
    wait("deliveries after resume", || {
        accepted(&env, "google") > paused_at
    });

    // A phone's width: the page fits, its wide tables scroll inside themselves.
    b.open(&format!("http://{addr}/"), 390, 844, true);
    b.eval(&format!(
        "new Promise(r => document.readyState === 'complete' ? r() : addEventListener('load', r)).then(() => {{ document.getElementById('token').value = '{token}'; document.getElementById('token-use').click(); return 1; }})"
    ));
    b.wait_for(
        &provider_cell("google-sink", 0),
        MOVE_LIMIT,
        "the provider row shows on a phone",
    );
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        true,
        "the page is wider than a phone"
    );
    let visible = b.eval(
        "(() => { const r = document.getElementById('t-delivered').getBoundingClientRect(); return r.width > 0 && r.right <= window.innerWidth; })()",
    );
    assert_eq!(visible, true, "the totals are on screen at 390 px");
}

#[test]
fn send_serves_metrics_while_it_runs_and_stops_with_it() {
    let env = common::env("monitor-send", "");
    let spool = env.dir.join("spool");
    let shaping = env.dir.join("shaping.toml");
    std::fs::write(
        &shaping,
        "[provider.google-sink]\nmx_suffixes = [\"google.sink.test\"]\nmax_msg_rate = \"50/s\"\n",
    )
    .unwrap();
    let rows: Vec<String> = (0..150)
        .map(|i| format!("user{i}@gmail.com,U{i}"))
        .collect();
    let dir = common::campaign(&env.dir, "metered", "", &rows);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut send = std::process::Command::new(common::daemon::VOLLEY)
        .arg("send")
        .arg(&dir)
        .args(base_args(&env, &spool))
        .arg("--shaping")
        .arg(&shaping)
        .args(["--quiet", "--metrics", &addr.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let series = "volley_outcomes_total{outcome=\"delivered\",class=\"\",provider=\"google-sink\",source=\"default\"}";
    let mut seen = 0.0;
    let deadline = Instant::now() + MOVE_LIMIT;
    while seen < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no delivered count from send's /metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
        if std::net::TcpStream::connect(addr).is_err() {
            continue;
        }
        let (code, head, text) = http(addr, "GET", "/metrics", None, "");
        assert_eq!(code, 200, "{text}");
        assert!(head.contains("application/openmetrics-text"), "{head}");
        seen = sample(&text, series).unwrap_or(0.0);
    }
    // Mid-run (150 at 50/s takes 3 s): the counter is still below the whole.
    assert!(seen < 150.0, "{seen}");
    let status = send.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(accepted(&env, "google"), 150);

    // Unauthenticated, so loopback alone: another address is refused before
    // anything is queued.
    let out = std::process::Command::new(common::daemon::VOLLEY)
        .arg("send")
        .arg(&dir)
        .args(base_args(&env, &env.dir.join("spool2")))
        .args(["--quiet", "--metrics", "0.0.0.0:9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("served on loopback alone"), "{err}");
    assert!(!env.dir.join("spool2").exists(), "a spool was made");
}

#[test]
fn a_client_that_never_ends_its_headers_is_closed_and_others_are_served() {
    let env = common::env("monitor-slowloris", "");
    let (_d, addr, token) = daemon(&env, "10/s");
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /metrics HTTP/1.1\r\nHost: t\r\n").unwrap();
    let opened = Instant::now();
    // Served meanwhile.
    let (code, _, _) = http(addr, "GET", "/metrics", Some(&token), "");
    assert_eq!(code, 200);
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut slow, &mut got);
    let held = opened.elapsed();
    // HEADER_READ_TIMEOUT is 10 s; the read's own limit is 30 s.
    assert!(
        held >= Duration::from_secs(8) && held < Duration::from_secs(25),
        "closed after {held:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}
