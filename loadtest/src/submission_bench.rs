//! `volley-load bench --scenario submission`: durable intake over SMTP submission,
//! `volley serve` against Postfix's smtpd, both fed by the same smtp-source command
//! (`-s 50 -m N -l 10000`: 50 sessions, one message per connection, no pipelining)
//! and both relaying to the bundled sink, in alternating rounds; ratios are medians.
//!
//! Every 250 is a durable acceptance: volley answers once the owning shard has
//! synced the message, Postfix once cleanup has fsynced the queue file. Per run:
//! intake (smtp-source's wall time and msg/s), then the time from the start of
//! intake until the sink has every message (both deliver while taking mail in).
//! volley is then stopped with SIGTERM and must exit 0. A system that cannot start
//! here (Postfix not installed, not root) is skipped, with why, not a failure.

use crate::bench::{
    free_port, median, name, peak_rss_mb, reap, result, self_cpu_s, smtp_source_path,
    system_busy_s, target, volley_binary, wait_for, write_report, BenchOptions, Check,
    PostfixInstance, Report, Result, System, Target, Usage, RUN_TIMEOUT,
};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// smtp-source's concurrent sessions, as in the Postfix figure.
const SOURCE_SESSIONS: u32 = 50;
/// smtp-source's payload per message (`-l`), headers not counted.
const BODY_BYTES: usize = 10_000;
const SENDER: &str = "sender@example.com";
/// The test DNS routes tail.test to the sink's tail address, which is also
/// Postfix's relayhost: both systems deliver to the same place.
const RCPT: &str = "rcpt@shop1.tail.test";
/// Longest wait for `volley serve`'s readiness line (a debug build on a busy
/// machine opens its spool in well under this).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for `volley serve` to exit after SIGTERM; then it is killed and
/// the run reported as failed. Its own shutdown_grace is set below this.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for Postfix's smtpd to accept connections after `postfix start`.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The goal: volley's durable intake at least this many times Postfix's.
const INTAKE_GOAL: f64 = 10.0;

/// One system's run, before it becomes a report row.
struct Run {
    intake_s: f64,
    result: Result,
    /// volley: whether it exited 0 after SIGTERM (None for Postfix).
    exit_ok: Option<bool>,
}

pub fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", opts.out.display()))?;
    let work = std::env::temp_dir().join(format!("volley-bench-sub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let n = opts.recipients.unwrap_or(100_000);
    anyhow::ensure!(n > 0, "--recipients must be at least 1");
    let source = smtp_source_path()?;
    let mut systems: Vec<System> = [System::Volley, System::Postfix]
        .into_iter()
        .filter(|s| opts.systems.as_ref().is_none_or(|only| only.contains(s)))
        .collect();
    anyhow::ensure!(
        !systems.is_empty(),
        "--scenario submission runs volley and postfix; --systems names neither"
    );
    let rounds = opts.rounds.max(1);
    let mut runs: Vec<(usize, System, Run)> = Vec::new();
    let mut skipped = Vec::new();
    for round in 0..rounds {
        // A system that failed is not tried again: what stopped it (Postfix missing,
        // a port it cannot bind) will stop it in every round.
        for sys in systems.clone() {
            eprintln!(
                "bench: {} taking in {n} messages over SMTP, round {} of {rounds}",
                name(sys),
                round + 1
            );
            let r = match sys {
                System::Volley => run_volley(opts, &source, n, &work),
                System::Postfix => run_postfix(opts, &source, n, &work),
                System::SmtpSource => unreachable!("not a system of this scenario"),
            };
            match r {
                Ok(mut r) => {
                    eprintln!(
                        "bench: {} intake {:.0} msg/s ({:.2} s), all delivered at {}",
                        name(sys),
                        r.result.msgs_per_s,
                        r.intake_s,
                        r.result
                            .delivered_s
                            .map_or("(not all delivered)".into(), |s| format!("{s:.2} s"))
                    );
                    if rounds > 1 {
                        r.result.note = format!("round {}; {}", round + 1, r.result.note);
                    }
                    runs.push((round, sys, r));
                }
                Err(e) => {
                    eprintln!("bench: {} skipped: {e:#}", name(sys));
                    skipped.push(format!("{} from round {} on: {e:#}", name(sys), round + 1));
                    systems.retain(|s| *s != sys);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let (ratios, checks) = judge(&runs, rounds);
    write_report(
        opts,
        Report {
            scenario: opts.scenario.clone(),
            results: runs.into_iter().map(|(_, _, r)| r.result).collect(),
            ratios,
            checks,
            skipped,
        },
    )
}

/// volley over Postfix per round (intake msg/s, and start of intake to all
/// delivered), their medians, the goal check and volley's exits.
fn judge(runs: &[(usize, System, Run)], rounds: usize) -> (Vec<(String, f64)>, Vec<Check>) {
    let mut intake = Vec::new();
    let mut end_to_end = Vec::new();
    for round in 0..rounds {
        let of = |sys| {
            runs.iter()
                .find(|(i, s, _)| *i == round && *s == sys)
                .map(|(_, _, r)| &r.result)
        };
        let (Some(v), Some(p)) = (of(System::Volley), of(System::Postfix)) else {
            continue;
        };
        intake.push(v.msgs_per_s / p.msgs_per_s);
        if let (Some(vd), Some(pd)) = (v.delivered_s, p.delivered_s) {
            end_to_end.push(pd / vd);
        }
    }
    let mut ratios = Vec::new();
    let mut checks = Vec::new();
    if !intake.is_empty() {
        let m = median(&intake);
        ratios.push((
            format!("volley / postfix, intake msg/s{}", each_round(&intake)),
            m,
        ));
        checks.push(Check {
            what: "volley / Postfix, durable intake over SMTP (msg/s)".into(),
            measured: format!("{m:.2}x{}", each_round(&intake)),
            target: format!("≥ {INTAKE_GOAL:.0}x"),
            pass: m >= INTAKE_GOAL,
        });
    }
    if !end_to_end.is_empty() {
        ratios.push((
            format!(
                "volley / postfix, start of intake to all delivered{}",
                each_round(&end_to_end)
            ),
            median(&end_to_end),
        ));
    }
    let exits: Vec<bool> = runs.iter().filter_map(|(_, _, r)| r.exit_ok).collect();
    if !exits.is_empty() {
        let ok = exits.iter().filter(|e| **e).count();
        checks.push(Check {
            what: "volley serve exits 0 after SIGTERM".into(),
            measured: format!("{ok} of {} runs", exits.len()),
            target: "every run".into(),
            pass: ok == exits.len(),
        });
    }
    (ratios, checks)
}

/// What a median is of: nothing for one round, every round's value for more.
fn each_round(vs: &[f64]) -> String {
    if vs.len() < 2 {
        return String::new();
    }
    let mut sorted = vs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let each: Vec<String> = sorted.iter().map(|v| format!("{v:.2}")).collect();
    format!(", median of {} rounds ({})", vs.len(), each.join(", "))
}

/// `volley serve` with one plain submission listener on loopback, delivering to the sink.
fn run_volley(opts: &BenchOptions, source: &Path, n: u64, work: &Path) -> anyhow::Result<Run> {
    let bin = volley_binary(opts)?;
    let t = target(opts, "accept-all")?;
    let dir = work.join("volley");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dkim"))?;
    let config = dir.join("serve.toml");
    let listen = format!("127.0.0.1:{}", free_port()?);
    std::fs::write(
        &config,
        serve_config(&listen, &dir.join("dkim"), opts.shards),
    )?;
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--spool")
        .arg(dir.join("spool"))
        .args(["--dns", &t.dns.addr.to_string()])
        .args(["--smtp-port", &t.sink.port().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
    let mut serve = Serve {
        child,
        reaped: false,
    };
    serve.wait_ready()?;
    t.sink.reset_latency_origin();
    let started = Instant::now();
    let intake_s = blast(source, n, &listen)?;
    let (s, all_s) = wait_for(&t.sink, n, started, || false);
    // VmHWM while it runs: wait4's figure would include the bench's own RSS from
    // before exec (see bench::watch).
    let hwm = peak_rss_mb(serve.child.id());
    let (exit_ok, mut usage) = serve.stop()?;
    usage.max_rss_mb = hwm.unwrap_or(usage.max_rss_mb);
    let note = format!(
        "intake {intake_s:.2} s; {}exit {} after SIGTERM",
        delivered_note(&s, n, all_s),
        if exit_ok { "0" } else { "NOT 0" }
    );
    Ok(Run {
        intake_s,
        result: row("volley", n, &s, intake_s, all_s, Some(usage), note),
        exit_ok: Some(exit_ok),
    })
}

/// volley serve's configuration: what the flags cannot say. The listener is here,
/// not in `--submission` (which replaces the file's listeners with default ones:
/// STARTTLS, AUTH optional). Outbound in clear as Postfix's
/// (`smtp_tls_security_level = none`), and the per-IP cap above smtp-source's
/// sessions, which all come from 127.0.0.1 (the default 20 would answer the rest
/// 421, and smtp-source stops at the first one).
fn serve_config(listen: &str, dkim_dir: &Path, shards: Option<usize>) -> String {
    let shards = shards.map_or(String::new(), |s| format!("shards = {s}\n"));
    format!(
        "{shards}dkim_dir = \"{dkim}\"\nehlo_name = \"bench.volley.test\"\ntls = \"disabled\"\n\
         retry_schedule = \"1s\"\nshutdown_grace = \"30s\"\n\n\
         [[submission]]\nlisten = \"{listen}\"\ntls = \"none\"\nauth = \"none\"\n\
         relay_networks = [\"127.0.0.0/8\"]\nconnections_max = 1000\nconnections_per_ip_max = 1000\n",
        dkim = dkim_dir.display()
    )
}

/// A running `volley serve`, killed if dropped before `stop`.
struct Serve {
    child: Child,
    reaped: bool,
}

impl Serve {
    /// Reads stdout until the readiness line; the rest of stdout is drained by the
    /// reader thread, which ends when the daemon does.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let stdout = self.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("volley serve: ready") {
                    eprintln!("bench: {line}");
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => anyhow::bail!(
                "volley serve printed no readiness line within {} s",
                READY_TIMEOUT.as_secs()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait()?;
                self.reaped = true;
                anyhow::bail!(
                    "volley serve exited before it was ready ({status}); see its stderr above"
                )
            }
        }
    }

    /// SIGTERM, then waits (bounded) for the exit: whether it was 0, and the
    /// daemon's CPU time and peak RSS over its whole life.
    fn stop(mut self) -> anyhow::Result<(bool, Usage)> {
        let pid = self.child.id();
        // SAFETY: kill has no memory preconditions; pid is our unreaped child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(u) = reap(pid, false) {
                self.reaped = true;
                let ok = u
                    .wait_status
                    .is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0);
                return Ok((ok, u));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!(
            "volley serve did not exit within {} s of SIGTERM; killed",
            STOP_TIMEOUT.as_secs()
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private Postfix instance (bench::PostfixInstance) relaying to the sink.
fn run_postfix(opts: &BenchOptions, source: &Path, n: u64, work: &Path) -> anyhow::Result<Run> {
    let t: Target = target(opts, "accept-all")?;
    let tail = t
        .sink
        .addr_of("tail")
        .ok_or_else(|| anyhow::anyhow!("profile has no tail provider"))?;
    let pf = PostfixInstance::start(&work.join("postfix"), tail, false)?;
    let waited = Instant::now();
    while std::net::TcpStream::connect(pf.listen).is_err() {
        anyhow::ensure!(
            waited.elapsed() < LISTEN_TIMEOUT,
            "postfix smtpd is not listening on {} after {} s; see {}",
            pf.listen,
            LISTEN_TIMEOUT.as_secs(),
            pf.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.sink.reset_latency_origin();
    // Postfix is many processes: its CPU is the machine's busy time less this
    // process's (the sink), smtp-source's included.
    let (cpu0, self0) = (system_busy_s()?, self_cpu_s());
    let started = Instant::now();
    let intake_s = blast(source, n, &pf.listen.to_string())?;
    let (s, all_s) = wait_for(&t.sink, n, started, || false);
    let cpu = (system_busy_s()? - cpu0) - (self_cpu_s() - self0);
    let left = pf.queued();
    drop(pf);
    let note = format!(
        "intake {intake_s:.2} s; {}{left} queue files not yet removed then; CPU = machine less the sink",
        delivered_note(&s, n, all_s)
    );
    let usage = Usage::cpu_only(cpu);
    let mut result = row("postfix", n, &s, intake_s, all_s, Some(usage), note);
    result.peak_rss_mb = None;
    Ok(Run {
        intake_s,
        result,
        exit_ok: None,
    })
}

/// smtp-source into `addr`, bounded by the run timeout; its wall time in seconds.
/// It stops at the first reply that is not positive, so exit 0 means every
/// message got its 250.
fn blast(source: &Path, n: u64, addr: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new(source)
        .args(["-s", &SOURCE_SESSIONS.to_string()])
        .args(["-m", &n.to_string()])
        .args(["-l", &BODY_BYTES.to_string()])
        .args(["-f", SENDER, "-t", RCPT, addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
    loop {
        if let Some(st) = child.try_wait()? {
            anyhow::ensure!(
                st.success(),
                "smtp-source into {addr} failed ({st}): a message was not accepted"
            );
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "smtp-source into {addr} still running after {} s; killed",
                RUN_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn delivered_note(s: &crate::sink::Summary, n: u64, all_s: f64) -> String {
    if s.rcpts_terminal >= n {
        format!("all delivered at {all_s:.2} s; ")
    } else {
        format!(
            "only {} of {n} delivered after {all_s:.0} s; ",
            s.rcpts_terminal
        )
    }
}

/// A report row: msgs/s and seconds are intake's (every message got its 250),
/// `delivered_s` the time until the sink had them all.
fn row(
    system: &str,
    n: u64,
    s: &crate::sink::Summary,
    intake_s: f64,
    all_s: f64,
    usage: Option<Usage>,
    note: String,
) -> Result {
    let mut r = result(system, "accept-all", n, s, intake_s, usage, note);
    r.msgs_per_s = n as f64 / intake_s.max(1e-9);
    r.delivered_s = (s.rcpts_terminal >= n).then_some(all_s);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: &str, rate: f64, delivered_s: f64) -> Run {
        let result = Result {
            system: system.into(),
            profile: "accept-all".into(),
            recipients: 100,
            terminal: 100,
            seconds: 1.0,
            msgs_per_s: rate,
            delivered_s: Some(delivered_s),
            ..Result::default()
        };
        Run {
            intake_s: 1.0,
            result,
            exit_ok: (system == "volley").then_some(true),
        }
    }

    #[test]
    fn ratios_are_per_round_then_the_median() {
        let runs = vec![
            (0, System::Volley, run("volley", 12_000.0, 10.0)),
            (0, System::Postfix, run("postfix", 1_000.0, 100.0)),
            (1, System::Volley, run("volley", 6_000.0, 20.0)),
            (1, System::Postfix, run("postfix", 1_000.0, 100.0)),
            (2, System::Volley, run("volley", 9_000.0, 12.5)),
            (2, System::Postfix, run("postfix", 900.0, 100.0)),
        ];
        let (ratios, checks) = judge(&runs, 3);
        assert!((ratios[0].1 - 10.0).abs() < 1e-9, "{ratios:?}");
        assert!(ratios[0].0.ends_with("(6.00, 10.00, 12.00)"), "{ratios:?}");
        assert!((ratios[1].1 - 8.0).abs() < 1e-9, "{ratios:?}");
        assert!(checks[0].pass, "{checks:?}");
        assert_eq!(checks[1].measured, "3 of 3 runs");
        // Postfix skipped: no ratio, no goal check, only volley's exits.
        let (ratios, checks) = judge(&runs[..1], 1);
        assert!(ratios.is_empty());
        assert_eq!(checks.len(), 1);
    }

    #[test]
    fn the_config_is_what_the_brief_needs() {
        let c = serve_config("127.0.0.1:2587", Path::new("/tmp/k"), Some(2));
        for want in [
            "shards = 2",
            "listen = \"127.0.0.1:2587\"",
            "tls = \"none\"",
            "auth = \"none\"",
            "relay_networks = [\"127.0.0.0/8\"]",
            "connections_per_ip_max = 1000",
        ] {
            assert!(c.contains(want), "{want} not in {c}");
        }
        let _: toml::Value = toml::from_str(&c).expect("valid TOML");
    }
}
