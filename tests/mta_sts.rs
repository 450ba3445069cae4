//! MTA-STS (RFC 8461) over loopback: the bundled DNS publishes `_mta-sts` records,
//! a policy server of this file's own serves the policy over HTTPS, and the sink
//! presents certificates; all under a test CA given as `tls_roots`. Cases: enforce
//! with a matching MX and a verifiable certificate (delivered over TLS), an MX the
//! policy does not name and a certificate that does not verify (deferred, class
//! policy, nothing accepted), testing mode (delivered as before), a new id replacing
//! the cached policy, a fetch failure with and without a cached policy, a redirect
//! not followed, and `volley tls show`.

mod common;

use common::pki::{ca, issue, Ca};
use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The sink's Google MX: gmail.com routes to it.
const MX: &str = "gmail-smtp-in.l.google.sink.test";
/// How long a policy server runs at most.
const SERVER_LIFE: Duration = Duration::from_secs(120);

/// A request the server took: its head and body.
type Post = (String, Vec<u8>);

/// A tally of today's TLS-RPT ledger: the policy's mode line, successful and failed
/// sessions, and the failure rows as (result type, MX).
type Tally = (String, u64, u64, Vec<(String, String)>);

/// What the policy server answers: a status line, a media type and a body.
#[derive(Clone)]
struct Answer {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

fn policy(mode: &str, mx: &str) -> Answer {
    Answer {
        status: "200 OK",
        content_type: "text/plain",
        body: format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"),
    }
}

/// An HTTPS server for `https://mta-sts.gmail.com/.well-known/mta-sts.txt` on
/// 127.0.0.1, answering what `answer` holds; counts the requests.
struct PolicyServer {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    /// The POSTs it took: head and body.
    posts: Arc<Mutex<Vec<Post>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PolicyServer {
    fn start(cert: rcgen::Certificate, key: rcgen::KeyPair, answer: Answer) -> PolicyServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (a, n, s, p) = (
            answer.clone(),
            requests.clone(),
            stop.clone(),
            posts.clone(),
        );
        std::thread::spawn(move || {
            let until = Instant::now() + SERVER_LIFE;
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let conn = rustls::ServerConnection::new(tls.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                if head.starts_with(b"POST ") {
                    // A TLS report (RFC 8460 §5.4): kept with its head.
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; length.min(1 << 20)];
                    if tls.read_exact(&mut body).is_ok() {
                        p.lock().unwrap().push((head, body));
                    }
                    let _ = tls.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    let _ = tls.flush();
                    continue;
                }
                if !head.starts_with(b"GET /.well-known/mta-sts.txt ") {
                    continue;
                }
                n.fetch_add(1, Ordering::Relaxed);
                let Answer {
                    status,
                    content_type,
                    body,
                } = a.lock().unwrap().clone();
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nLocation: https://elsewhere.test/\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes());
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        PolicyServer {
            port,
            answer,
            requests,
            posts,
            stop,
        }
    }

    fn serve(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The sink with a certificate for the MX signed by `signer`, the DNS publishing
/// gmail.com's `_mta-sts` record `id` and the policy host, a policy server under
/// `ca` answering `answer`.
struct World {
    env: Env,
    server: PolicyServer,
    ca: Ca,
    pki: PathBuf,
}

fn world(name: &str, signer: Option<&str>, id: &str, answer: Answer) -> World {
    world_with(name, signer, true, id, answer)
}

/// As `world`; without `starttls` the sink offers no STARTTLS.
fn world_with(name: &str, signer: Option<&str>, starttls: bool, id: &str, answer: Answer) -> World {
    let pki = std::env::temp_dir().join(format!("volley-test-sts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pki);
    std::fs::create_dir_all(&pki).unwrap();
    let ca = ca(&pki, "ca");
    let other = ca_other(&pki);
    let sink_ca = match signer {
        Some("other") => &other,
        _ => &ca,
    };
    let (cert_file, key_file, _, _) = issue(sink_ca, &pki, MX);
    let keep = pki.join("kept");
    std::fs::create_dir_all(&keep).unwrap();
    let env = match starttls {
        true => env_with_certificate(name, cert_file, key_file, Some(keep)),
        false => env_with(name, "", false),
    };
    let (_, _, cert, key) = issue(&ca, &pki, "mta-sts.gmail.com");
    let server = PolicyServer::start(cert, key, answer);
    {
        let mut z = env.dns.zone.write().unwrap();
        z.set_a("mta-sts.gmail.com", "127.0.0.1".parse().unwrap());
    }
    let w = World {
        env,
        server,
        ca,
        pki,
    };
    w.publish(id);
    w
}

/// A second CA, which the run does not trust.
fn ca_other(dir: &Path) -> Ca {
    ca(dir, "other-ca")
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

impl World {
    fn publish(&self, id: &str) {
        self.env
            .dns
            .zone
            .write()
            .unwrap()
            .set_txt("_mta-sts.gmail.com", vec![format!("v=STSv1; id={id};")]);
    }

    /// `volley tls show gmail.com` against this world, with its spool's cache or not.
    fn tls_show(&self, with_spool: bool) -> (i32, String, String) {
        let (dns, port) = (self.env.dns.addr.to_string(), self.server.port.to_string());
        let spool = self.env.dir.join("spool");
        let mut args = vec![
            "tls",
            "show",
            "gmail.com",
            "--dns",
            &dns,
            "--tls-roots",
            self.ca.file.to_str().unwrap(),
            "--mta-sts-port",
            &port,
        ];
        if with_spool {
            args.extend(["--spool", spool.to_str().unwrap()]);
        }
        common::daemon::volley(&args)
    }

    /// As `config`, with DANE on, the test DNS's key the trust anchor.
    fn config_with_dane(&self) -> volley::deliver::config::EngineConfig {
        let anchor = self.pki.join("trust-anchor.txt");
        std::fs::write(&anchor, self.env.dns.trust_anchor()).unwrap();
        let mut cfg = self.config();
        cfg.dns.dane = Some(volley::deliver::dns::DaneSettings {
            trust_anchor: Some(anchor),
        });
        cfg
    }

    /// Publishes `records` as the MX host's TLSA RRset (DANE).
    fn publish_tlsa(&self, records: Vec<(u8, u8, u8, Vec<u8>)>) {
        let records = records
            .into_iter()
            .map(|(u, s, m, data)| {
                hickory_resolver::proto::rr::rdata::TLSA::new(u.into(), s.into(), m.into(), data)
            })
            .collect();
        let mut zone = self.env.dns.zone.write().unwrap();
        zone.set_tlsa(&format!("_25._tcp.{MX}"), records);
    }

    fn config(&self) -> volley::deliver::config::EngineConfig {
        let mut cfg = self.env.config();
        cfg.tls_roots = Some(self.ca.file.clone());
        cfg.https_port = self.server.port;
        cfg.tls_rpt = true;
        cfg
    }

    /// Today's TLS-RPT ledger: gmail.com's tallies.
    fn tallies(&self) -> Vec<Tally> {
        let today = volley::deliver::tls_rpt::date_of(std::time::SystemTime::now());
        let path = self.env.dir.join(format!("spool/tls-rpt/{today}.json"));
        let day: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let Some(policies) = day["domains"]["gmail.com"].as_array() else {
            return Vec::new();
        };
        policies
            .iter()
            .map(|p| {
                let (applied, t) = (&p[0], &p[1]);
                let mode = applied["policy_string"][1].as_str().unwrap_or("none");
                let rows = t["failures"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let f = &r[0];
                        (
                            f["result_type"].as_str().unwrap().to_string(),
                            f["receiving_mx_hostname"]
                                .as_str()
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect();
                (
                    mode.to_string(),
                    t["successful"].as_u64().unwrap(),
                    t["failed"].as_u64().unwrap(),
                    rows,
                )
            })
            .collect()
    }

    /// The tally under the policy whose mode line is `mode` ("mode: enforce").
    fn tally(&self, mode: &str) -> (u64, u64, Vec<(String, String)>) {
        let all = self.tallies();
        let (_, ok, failed, rows) = all
            .iter()
            .find(|t| t.0 == mode)
            .unwrap_or_else(|| panic!("no tally under {mode:?}: {all:?}"));
        (*ok, *failed, rows.clone())
    }

    /// Sends `n` recipients at gmail.com as campaign `id` to the end: the log's
    /// records of that campaign and the sink's accepted count after it. A campaign
    /// that is to be deferred expires after 2 s, so the run ends and leaves nothing
    /// queued for the next.
    fn send(&self, id: &str, n: usize, deferred: bool) -> (Vec<serde_json::Value>, u64) {
        send_to_gmail(&self.env, self.config(), id, n, deferred)
    }
}

/// Nothing delivered, and every attempt a deferral of class policy, 4.7.5, whose
/// reply contains each of `words`.
fn all_deferred(lines: &[serde_json::Value], words: &[&str]) {
    all_deferred_as(lines, "4.7.5", words)
}

#[test]
fn an_enforced_policy_sends_verified_tls_to_the_mx_it_names_and_nothing_elsewhere() {
    let w = world(
        "sts-enforce",
        None,
        "1",
        policy("enforce", "*.l.google.sink.test"),
    );
    let (lines, accepted) = w.send("match", 5, false);
    assert_eq!(accepted, 5, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["type"], "Delivery", "{l}");
        assert!(l["tls"].as_str().is_some_and(|t| t.contains("TLS")), "{l}");
    }
    assert_eq!(w.server.requests(), 1, "fetched once");
    // Each session met the policy, and the TLS report counts it (RFC 8460 §4.4).
    let (ok, failed, _) = w.tally("mode: enforce");
    assert!(ok >= 1 && failed == 0, "{:?}", w.tallies());
    // Kept under the spool with its id.
    let kept = std::fs::read_to_string(w.env.dir.join("spool/mta-sts/gmail.com")).unwrap();
    assert!(kept.starts_with("id 1\n"), "{kept}");

    // A new id whose policy names other MX hosts: fetched, and nothing is sent.
    w.server.serve(policy("enforce", "mx.elsewhere.test"));
    w.publish("2");
    let (lines, after) = w.send("elsewhere", 3, true);
    assert_eq!(after, accepted, "sent to an MX the policy does not name");
    all_deferred(
        &lines,
        &[
            "MTA-STS policy of gmail.com (id 2, enforce)",
            MX,
            "RFC 8461",
        ],
    );
    assert_eq!(w.server.requests(), 2);

    // The same policy in testing mode: delivered as before (id 3).
    w.server.serve(policy("testing", "mx.elsewhere.test"));
    w.publish("3");
    let (lines, after) = w.send("testing", 3, false);
    assert_eq!(after, accepted + 3, "{lines:#?}");
    // The report tells the domain what enforce would have stopped: its MX is not
    // one the policy names; under enforce (id 2) the same.
    let tallies = w.tallies();
    for mode in ["mode: enforce", "mode: testing"] {
        let mismatched = tallies.iter().any(|(m, _, failed, rows)| {
            m == mode && *failed >= 1 && rows.iter().any(|(r, _)| r == "validation-failure")
        });
        assert!(mismatched, "{mode}: {tallies:?}");
    }

    // `volley tls show` says what is in force, and where it came from.
    let (code, out, err) = w.tls_show(true);
    assert_eq!(code, 0, "{out}{err}");
    for words in [
        &format!("MX              {MX}")[..],
        "MTA-STS         id 3, mode testing, mx mx.elsewhere.test, max_age 86400 s",
        "MX it allows    none (policy id 3)",
        "spool's cache   id 3",
        "in effect       tls opportunistic",
    ] {
        assert!(out.contains(words), "{words:?} not in:\n{out}");
    }
}

#[test]
fn an_enforced_policy_refuses_a_certificate_it_cannot_verify() {
    // The sink's certificate is signed by a CA the run does not trust.
    let w = world("sts-badcert", Some("other"), "1", policy("enforce", MX));
    let (lines, accepted) = w.send("untrusted", 3, true);
    assert_eq!(
        accepted, 0,
        "delivered over a certificate that does not verify"
    );
    all_deferred(
        &lines,
        &[
            MX,
            "signature that does not verify",
            "MTA-STS policy (enforce) requires TLS",
        ],
    );
    assert!(
        lines
            .iter()
            .all(|l| !l["reply"].as_str().unwrap().contains("tls_verify off")),
        "advice the operator cannot take under a domain's policy"
    );
    let not_trusted = |rows: &[(String, String)]| {
        rows.iter()
            .any(|(r, mx)| r == "certificate-not-trusted" && mx == MX)
    };
    let (ok, failed, rows) = w.tally("mode: enforce");
    assert!(ok == 0 && failed >= 1 && not_trusted(&rows), "{rows:?}");
    // TLSA records that are all unusable (PKIX-EE) authenticate nothing: with DANE
    // on, the policy's check still holds.
    w.publish_tlsa(vec![(1, 1, 1, vec![7; 32])]);
    let (lines, accepted) = send_to_gmail(&w.env, w.config_with_dane(), "unusable", 1, true);
    assert_eq!(accepted, 0, "{lines:#?}");
    all_deferred(&lines, &[MX, "MTA-STS policy (enforce) requires TLS"]);
    // In testing mode the same receiver gets the mail (opportunistic TLS), and the
    // report says the certificate would not have done under enforce.
    w.server.serve(policy("testing", MX));
    w.publish("2");
    let (_, accepted) = w.send("testing", 3, false);
    assert_eq!(accepted, 3);
    let (ok, failed, rows) = w.tally("mode: testing");
    assert!(ok == 0 && failed >= 1 && not_trusted(&rows), "{rows:?}");
}

#[test]
fn a_failed_fetch_keeps_a_cached_policy_and_without_one_there_is_none() {
    let unavailable = Answer {
        status: "404 Not Found",
        content_type: "text/plain",
        body: "no".into(),
    };
    let w = world("sts-fetch", None, "1", unavailable);
    // No policy to be had, none cached: delivered as without MTA-STS, and the
    // domain's report says its policy could not be fetched (RFC 8460 §4.3.2.1).
    let (_, accepted) = w.send("nopolicy", 3, false);
    assert_eq!(accepted, 3);
    let (_, failed, rows) = w.tally("none");
    assert!(failed >= 1, "{rows:?}");
    assert!(
        rows.iter().all(|(r, _)| r == "sts-policy-fetch-error"),
        "{rows:?}"
    );
    // A policy that would stop everything, fetched and cached (id 2).
    w.server.serve(policy("enforce", "mx.elsewhere.test"));
    w.publish("2");
    let (lines, after) = w.send("cached", 2, true);
    assert_eq!(after, accepted);
    all_deferred(&lines, &["id 2, enforce"]);
    // A new id whose fetch fails (a redirect, then a 500, then the wrong media
    // type): the cached policy stays in force, and nothing is sent.
    for (i, answer) in [
        Answer {
            status: "301 Moved Permanently",
            content_type: "text/plain",
            body: String::new(),
        },
        Answer {
            status: "500 Internal Server Error",
            content_type: "text/plain",
            body: String::new(),
        },
        Answer {
            content_type: "text/html",
            ..policy("none", "mx.elsewhere.test")
        },
    ]
    .into_iter()
    .enumerate()
    {
        w.server.serve(answer);
        w.publish(&format!("9{i}"));
        let (lines, after) = w.send(&format!("failed{i}"), 2, true);
        assert_eq!(after, accepted, "a failed fetch let mail through");
        all_deferred(&lines, &["id 2, enforce"]);
    }
    // `tls show` (no cache of its own) says why none is in force.
    let (code, out, err) = w.tls_show(false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("none fetched now: the policy for id 92 could not be had")
            && out.contains("not text/plain"),
        "{out}"
    );
    // With the spool, what the daemon does: its cached policy (id 2) is in force.
    let (_, out, _) = w.tls_show(true);
    for words in [
        "spool's cache   id 2, mode enforce",
        "MX it allows    none (policy id 2)",
        "in effect       nothing is sent",
    ] {
        assert!(out.contains(words), "{words:?} not in:\n{out}");
    }
    w.server.serve(Answer {
        status: "301 Moved Permanently",
        content_type: "text/plain",
        body: String::new(),
    });
    let (_, out, _) = w.tls_show(false);
    assert!(out.contains("a redirect, which is not followed"), "{out}");
}

#[test]
fn an_enforced_policy_sends_nothing_to_a_receiver_without_starttls() {
    // STARTTLS stripped (or never offered): nothing goes in clear.
    let w = world_with("sts-nostarttls", None, false, "1", policy("enforce", MX));
    let (lines, accepted) = w.send("stripped", 3, true);
    assert_eq!(accepted, 0, "sent in clear under an enforced policy");
    all_deferred_as(&lines, "4.7.4", &[MX]);
    let (ok, failed, rows) = w.tally("mode: enforce");
    assert!(ok == 0 && failed >= 1, "{rows:?}");
    assert!(
        rows.iter()
            .all(|(r, mx)| r == "starttls-not-supported" && mx == MX),
        "{rows:?}"
    );
    // Under testing the mail goes in clear, and the report says STARTTLS was missing.
    w.server.serve(policy("testing", MX));
    w.publish("2");
    let (_, accepted) = w.send("clear", 2, false);
    assert_eq!(accepted, 2);
    let (_, failed, rows) = w.tally("mode: testing");
    assert!(failed >= 1, "{rows:?}");
    assert!(
        rows.iter().all(|(r, _)| r == "starttls-not-supported"),
        "{rows:?}"
    );
}

/// Checks TLS reports with Python's standard library alone, against RFC 8460 §4.4's
/// JSON schema and §5's transports: argv[1] a POSTed body (gzip), argv[2] a mailed
/// report (.eml), argv[3] the DKIM record of its signer (checked with dkimpy when it
/// is installed). Prints one line per report, `ok DOMAIN SUCCESSES FAILURES, N
/// failure rows`, and
/// `dkim pass|fail|skipped`.
const REPORT_CHECK: &str = r#"
import email, gzip, ipaddress, json, re, sys
from email import policy

RESULT_TYPES = {"starttls-not-supported", "certificate-host-mismatch",
    "certificate-expired", "certificate-not-trusted", "validation-failure",
    "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid"}
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

def need(cond, what):
    if not cond:
        raise SystemExit("not RFC 8460: " + what)

def check(report):
    need(set(report) <= {"organization-name", "date-range", "contact-info",
        "report-id", "policies"}, "top-level keys %s" % sorted(report))
    for k in ("organization-name", "contact-info", "report-id"):
        need(isinstance(report.get(k), str) and report[k], k)
    dr = report.get("date-range")
    need(isinstance(dr, dict) and set(dr) == {"start-datetime", "end-datetime"}, "date-range")
    need(all(STAMP.match(dr[k]) for k in dr), "date-range times")
    need(dr["start-datetime"] < dr["end-datetime"], "date-range order")
    pols = report.get("policies")
    need(isinstance(pols, list) and pols, "policies")
    ok = failed = details = 0
    for p in pols:
        need(set(p) <= {"policy", "summary", "failure-details"} and "policy" in p
            and "summary" in p, "policy keys")
        pol = p["policy"]
        need(set(pol) <= {"policy-type", "policy-string", "policy-domain", "mx-host"},
            "policy keys %s" % sorted(pol))
        need(pol.get("policy-type") in ("tlsa", "sts", "no-policy-found"), "policy-type")
        need(isinstance(pol.get("policy-domain"), str), "policy-domain")
        for k in ("policy-string", "mx-host"):
            if k in pol:
                need(isinstance(pol[k], list) and all(isinstance(x, str) for x in pol[k]), k)
        s = p["summary"]
        need(set(s) == {"total-successful-session-count", "total-failure-session-count"},
            "summary keys %s" % sorted(s))
        for k in ("total-successful-session-count", "total-failure-session-count"):
            need(isinstance(s.get(k), int) and s[k] >= 0, k)
        ok += s["total-successful-session-count"]
        failed += s["total-failure-session-count"]
        rows = 0
        for f in p.get("failure-details", []):
            need(set(f) <= {"result-type", "sending-mta-ip", "receiving-mx-hostname",
                "receiving-mx-helo", "receiving-ip", "failed-session-count",
                "additional-information", "failure-reason-code"},
                "failure-details keys %s" % sorted(f))
            need(f.get("result-type") in RESULT_TYPES, "result-type %r" % f.get("result-type"))
            need(isinstance(f.get("failed-session-count"), int), "failed-session-count")
            rows += f["failed-session-count"]
            for k in ("sending-mta-ip", "receiving-ip"):
                if k in f:
                    ipaddress.ip_address(f[k])
            for k in ("receiving-mx-hostname", "failure-reason-code"):
                if k in f:
                    need(isinstance(f[k], str), k)
        need(rows <= s["total-failure-session-count"], "failure rows over the summary")
        details += len(p.get("failure-details", []))
    return pols[0]["policy"]["policy-domain"], ok, failed, details

posted = json.loads(gzip.decompress(open(sys.argv[1], "rb").read()))
print("ok %s %d %d, %d failure rows" % check(posted))

raw = open(sys.argv[2], "rb").read()
msg = email.message_from_bytes(raw, policy=policy.default)
need(msg.get_content_type() == "multipart/report", "Content-Type")
need(msg.get_param("report-type") == "tlsrpt", "report-type")
domain = msg["TLS-Report-Domain"]
need(domain and msg["TLS-Report-Submitter"], "TLS-Report-Domain/Submitter")
need(msg["Subject"].startswith("Report Domain: %s Submitter: " % domain), "Subject")
parts = [p for p in msg.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
need(len(parts) == 1, "one application/tlsrpt+gzip part")
need(re.match(r"^[^!]+!%s!\d+!\d+\.json\.gz$" % re.escape(domain), parts[0].get_filename() or ""),
    "file name %r" % parts[0].get_filename())
mailed = json.loads(gzip.decompress(parts[0].get_payload(decode=True)))
print("ok %s %d %d, %d failure rows" % check(mailed))
need(mailed == posted, "the mailed report differs from the posted one")
try:
    import dkim
except ImportError:
    print("dkim skipped")
else:
    record = sys.argv[3].encode()
    good = dkim.verify(raw, dnsfunc=lambda name, timeout=5: record)
    print("dkim " + ("pass" if good else "fail"))
"#;

#[test]
fn the_daemon_sends_each_ended_days_report_once_by_https_and_as_signed_mail() {
    let w = world("sts-report", None, "1", policy("enforce", MX));
    let (_, accepted) = w.send("counted", 3, false);
    assert_eq!(accepted, 3);
    // A testing policy whose MX patterns match nothing: failures to report too.
    w.server.serve(policy("testing", "mx.elsewhere.test"));
    w.publish("2");
    let (_, accepted) = w.send("mismatched", 2, false);
    assert_eq!(accepted, 5);
    let tallies = w.tallies();
    let ok: u64 = tallies.iter().map(|t| t.1).sum();
    let failed: u64 = tallies.iter().map(|t| t.2).sum();
    let rows: usize = tallies.iter().map(|t| t.3.len()).sum();
    assert!(failed >= 1 && rows >= 1, "{tallies:?}");
    // The day ends: today's ledger becomes that of the day before yesterday (a day's
    // reports wait SEND_AFTER_DAY_END past its midnight).
    let tls_rpt = w.env.dir.join("spool/tls-rpt");
    let now = std::time::SystemTime::now();
    let today = volley::deliver::tls_rpt::date_of(now);
    let yesterday = volley::deliver::tls_rpt::date_of(now - Duration::from_secs(2 * 86_400));
    let mut day: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tls_rpt.join(format!("{today}.json"))).unwrap())
            .unwrap();
    day["date"] = yesterday.clone().into();
    let ended = tls_rpt.join(format!("{yesterday}.json"));
    std::fs::write(&ended, day.to_string()).unwrap();
    std::fs::remove_file(tls_rpt.join(format!("{today}.json"))).unwrap();

    // gmail.com asks for its reports by HTTPS and by mail.
    let (_, _, cert, key) = issue(&w.ca, &w.pki, "reports.gmail.com");
    let reports = PolicyServer::start(cert, key, policy("enforce", MX));
    {
        let mut z = w.env.dns.zone.write().unwrap();
        z.set_a("reports.gmail.com", "127.0.0.1".parse().unwrap());
        z.set_txt(
            "_smtp._tls.gmail.com",
            vec![format!(
                "v=TLSRPTv1; rua=https://reports.gmail.com:{}/tlsrpt,mailto:tlsrpt@gmail.com",
                reports.port
            )],
        );
    }
    // The reports' From domain has a DKIM key.
    let keys = w.pki.join("dkim");
    let (code, zone, err) = common::daemon::volley(&[
        "dkim",
        "keygen",
        "--type",
        "ed25519",
        "--domain",
        "reports.volley.test",
        "--selector",
        "s1",
        "--out",
        keys.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let record: String = zone.split('"').skip(1).step_by(2).collect();
    assert!(record.starts_with("v=DKIM1"), "{zone}");
    let config = common::daemon::write_config(
        &w.env.dir,
        &format!(
            "tls_roots = \"{}\"\ndkim_dir = \"{}\"\ntls_rpt_from = \"tlsrpt@reports.volley.test\"\ntls_rpt_org = \"Volley Test\"\n",
            w.ca.file.display(),
            keys.display()
        ),
    );
    let spool = w.env.dir.join("spool");
    let mut args = vec!["--config".into(), config.display().to_string()];
    args.extend(common::daemon::base_args(&w.env, &spool));
    let kept = w.pki.join("kept");
    let mailed = |kept: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(kept)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                std::fs::read_to_string(p).is_ok_and(|t| t.contains("TLS-Report-Domain: gmail.com"))
            })
            .collect()
    };
    // gmail.com's policy now refuses its own MX (the one held, id 2, made enforce):
    // its mail is deferred, but a TLS report goes all the same and its session is
    // not counted (RFC 8460 §5.3.1).
    let secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::fs::write(
        w.env.dir.join("spool/mta-sts/gmail.com"),
        format!(
            "id 2\nfetched {secs}\n{}",
            policy("enforce", "mx.elsewhere.test").body
        ),
    )
    .unwrap();
    let d = common::daemon::Daemon::start(&w.env.dir, &args);
    let limit = Duration::from_secs(30);
    let every = Duration::from_millis(50);
    common::daemon::wait_for(
        limit,
        every,
        || (reports.posts.lock().unwrap().len() == 1 && mailed(&kept).len() == 1).then_some(()),
        || format!("no report posted and mailed; serve said:\n{}", d.stderr()),
    );
    let said = d.stop();
    assert!(
        said.contains("report queued for mailto:tlsrpt@gmail.com"),
        "{said}"
    );
    let tallies = w.tallies();
    assert!(
        tallies.iter().all(|t| t.1 == 0),
        "the report's session counted: {tallies:?}"
    );
    assert!(
        said.contains("report posted to https://reports.gmail.com"),
        "{said}"
    );
    assert!(!ended.exists(), "the day is not marked done");
    let sent = std::fs::read_to_string(tls_rpt.join("sent.tsv")).unwrap();
    // Each URI's send, then the domain finished for the day.
    assert_eq!(sent.matches("\tdone\t").count(), 3, "{sent}");
    assert!(sent.contains("\tgmail.com\t*\tdone\t"), "{sent}");

    // A crash that lost the day's done mark sends nothing twice; nor one in the
    // middle of sending (each send's `begun` line synced, its `done` not written).
    for crash in ["after the sends", "during the sends"] {
        std::fs::copy(ended.with_extension("json.done"), &ended).unwrap();
        if crash == "during the sends" {
            let begun = sent.replace("\tdone\t", "\tbegun\t");
            std::fs::write(tls_rpt.join("sent.tsv"), begun).unwrap();
        }
        let d = common::daemon::Daemon::start(&w.env.dir, &args);
        common::daemon::wait_for(
            limit,
            every,
            || (!ended.exists()).then_some(()),
            || {
                format!(
                    "the day was not looked at again; serve said:\n{}",
                    d.stderr()
                )
            },
        );
        d.stop();
        assert_eq!(
            reports.posts.lock().unwrap().len(),
            1,
            "posted twice {crash}"
        );
        assert_eq!(mailed(&kept).len(), 1, "mailed twice {crash}");
    }

    // What went out is RFC 8460's report, the same both ways, and the mail is signed.
    let (head, body) = reports.posts.lock().unwrap()[0].clone();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/tlsrpt+gzip"),
        "{head}"
    );
    assert!(head.starts_with("POST /tlsrpt "), "{head}");
    let posted = w.pki.join("posted.json.gz");
    std::fs::write(&posted, &body).unwrap();
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", REPORT_CHECK])
        .arg(&posted)
        .arg(&mailed(&kept)[0])
        .arg(&record)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let want = format!("ok gmail.com {ok} {failed}, {rows} failure rows");
    assert_eq!(
        stdout.matches(&want).count(),
        2,
        "{want:?} twice in:\n{stdout}"
    );
    match stdout.lines().last() {
        Some("dkim pass") => {}
        Some("dkim skipped") => {
            common::skipped("dkimpy is not installed: the report's signature was not checked")
        }
        other => panic!("{other:?}: {stdout}"),
    }
}

#[test]
fn a_host_with_dane_records_is_left_to_dane_by_an_enforced_policy() {
    // The policy names another MX and the sink's CA is trusted nowhere, so MTA-STS
    // alone sends nothing; the host's signed TLSA record naming its certificate
    // takes precedence (RFC 8461 §2).
    let w = world(
        "sts-dane",
        Some("other"),
        "1",
        policy("enforce", "mx.elsewhere.test"),
    );
    use rustls::pki_types::pem::PemObject;
    let cert =
        rustls::pki_types::CertificateDer::from_pem_file(w.pki.join(format!("{MX}.pem"))).unwrap();
    let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert);
    w.publish_tlsa(vec![(3, 0, 1, sha256.as_ref().to_vec())]);
    let (lines, accepted) = send_to_gmail(&w.env, w.config_with_dane(), "dane", 2, false);
    assert_eq!(accepted, 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["type"], "Delivery", "{l}");
        assert!(l["tls"].as_str().is_some_and(|t| t.contains("TLS")), "{l}");
    }
    // An unsigned MX record could be forged to name any host with TLSA records:
    // then the policy's patterns hold.
    w.env.dns.zone.write().unwrap().set_unsigned("gmail.com");
    let (lines, accepted) = send_to_gmail(&w.env, w.config_with_dane(), "unsigned-mx", 1, true);
    assert_eq!(accepted, 2, "{lines:#?}");
    all_deferred(&lines, &["mx.elsewhere.test"]);
    // Without DANE the same policy sends nothing.
    let (lines, accepted) = w.send("sts-only", 1, true);
    assert_eq!(accepted, 2, "{lines:#?}");
    all_deferred(&lines, &["mx.elsewhere.test"]);
}
