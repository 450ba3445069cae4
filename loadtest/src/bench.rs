//! `volley-load bench`: a scenario end to end. For each system under test a fresh
//! sink (and the test DNS) starts in-process, the system sends the scenario's
//! messages to it, and the bench records the time until the sink has seen every
//! recipient reach a final state, the system's CPU time and peak RSS, and the sink's
//! delivery latencies. Results go to stdout and to JSON + Markdown files.
//!
//! Systems: `volley` (the engine binary, on a generated campaign), `smtp-source`
//! (Postfix's C load generator blasting the same sink: the reference rate), and
//! `postfix` (a private Postfix instance under a temp dir that queues the messages,
//! then is released and timed delivering them from its queue). Only loopback is used.
//! The `submission` scenario (intake over SMTP, `volley serve` against Postfix's
//! smtpd) has its own runner, submission_bench.rs.

use crate::counters::{Counters, Tracepoints};
use crate::dns::{self, Zone};
use crate::gen::{self, GenOptions};
use crate::profile::{Part, Profile};
use crate::sink::{Sink, SinkOptions, Summary};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use volley::deliver::runtime::Driver;

/// A run that has not finished after this long is stopped and reported as such.
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Volley,
    SmtpSource,
    Postfix,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenario: String,
    pub recipients: Option<u64>,
    pub systems: Option<Vec<System>>,
    pub out: PathBuf,
    pub volley: Option<PathBuf>,
    pub sink_threads: usize,
    pub shards: Option<usize>,
    /// Replaces the scenario's non-accept-all profile (a name or a TOML file).
    pub profile: Option<String>,
    /// `volley send --shaping` for the runs on the non-accept-all profile.
    pub shaping: Option<PathBuf>,
    /// Parts of the non-accept-all profile switched off, to see what each costs.
    pub without: Vec<Part>,
    /// Give the accept-all runs `shaping` too: both runs under one configuration.
    pub shaping_accept_all: bool,
    /// Times the scenario's runs are repeated, alternating; ratios are medians.
    pub rounds: usize,
    /// Count each system's system calls and io_uring submissions (counters.rs).
    pub syscall_count: bool,
    /// volley's accept-all run once per STARTTLS setting (default: STARTTLS only).
    pub tls: Vec<TlsColumn>,
    /// volley's accept-all run once per driver (default: the engine's choice).
    pub drivers: Vec<Driver>,
    /// An earlier volley build whose accept-all runs come first, with every
    /// `tls` and `drivers` value: before and after in one run.
    pub baseline: Option<PathBuf>,
}

/// How volley's accept-all runs talk to the sink, for `--tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsColumn {
    /// STARTTLS on every connection (the sink offers it): volley's default.
    Starttls,
    /// `--tls disabled`: in clear.
    Plain,
}

struct Scenario {
    recipients: u64,
    body_bytes: usize,
    /// Each system with the sink profile it runs against, in order.
    runs: Vec<(System, &'static str)>,
}

fn scenario(name: &str) -> anyhow::Result<Scenario> {
    let all = vec![
        (System::SmtpSource, "accept-all"),
        (System::Volley, "accept-all"),
        (System::Postfix, "accept-all"),
    ];
    let kb10 = 10 * 1024;
    Ok(match name {
        "smoke" => Scenario {
            recipients: 2_000,
            body_bytes: kb10,
            runs: all,
        },
        "accept-all" => Scenario {
            recipients: 100_000,
            body_bytes: kb10,
            runs: all,
        },
        // The realistic profile's first pass against the accept-all rate, in one run.
        // Shaping accuracy has its own runner (shaping_bench.rs).
        s if s.starts_with("shaping") || s == "dkim" || s == "submission" => {
            unreachable!("run() sends it to its own module")
        }
        "realistic" => Scenario {
            recipients: 100_000,
            body_bytes: kb10,
            runs: vec![
                (System::Volley, "accept-all"),
                (System::Volley, "realistic"),
            ],
        },
        other => {
            anyhow::bail!(
                "unknown scenario {other:?}: use smoke, accept-all, realistic, shaping, dkim, submission or sink"
            )
        }
    })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Result {
    pub system: String,
    /// volley's accept-all variant ("plain, epoll"); empty for the default run.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub variant: String,
    pub profile: String,
    pub recipients: u64,
    /// Recipients at a final state at the sink (accepted once, or refused permanently).
    pub terminal: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    /// submission only: seconds from the start of intake until the sink had every
    /// message (`msgs_per_s` and `seconds` are then the intake's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_s: Option<f64>,
    /// volley only: recipients over the time until each had its first attempt's answer.
    pub first_pass_msgs_per_s: Option<f64>,
    /// volley only: when each destination's first pass was half and wholly done.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub first_pass_by_mx: Vec<MxPass>,
    pub cpu_s_per_1000: Option<f64>,
    /// The same CPU split: user and system time per message, µs.
    pub user_us_per_msg: Option<f64>,
    pub sys_us_per_msg: Option<f64>,
    /// System calls entered per message, all threads (counters.rs; None without tracefs).
    pub syscalls_per_msg: Option<f64>,
    /// io_uring requests submitted per message (the work io_uring did in those calls).
    pub io_uring_submits_per_msg: Option<f64>,
    /// Voluntary and involuntary context switches per message (wait4's rusage).
    pub context_switches_per_msg: Option<f64>,
    /// The bench process's own CPU per message while the system ran: the sink and
    /// the test DNS, so that the rig is seen to cost less than what it measures.
    pub sink_cpu_us_per_msg: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub latency_ms_p50: u64,
    pub latency_ms_p90: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_max: u64,
    pub duplicates: u64,
    pub corrupt: u64,
    pub note: String,
}

/// One destination's first pass, in seconds from the start of `volley send`.
#[derive(Debug, Clone, Serialize)]
pub struct MxPass {
    pub mx: String,
    pub recipients: u64,
    /// The first attempt's answer for the first recipient, half of them, and the last.
    pub first_s: f64,
    pub half_s: f64,
    pub done_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub results: Vec<Result>,
    /// volley's rate over each other system's, measured in this run.
    pub ratios: Vec<(String, f64)>,
    /// Measurements against a target (the shaping scenario's accuracy figures).
    pub checks: Vec<Check>,
    /// Systems that could not run here, each with why (Postfix not installed, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub pass: bool,
}

pub fn run(opts: &BenchOptions) -> anyhow::Result<Report> {
    if opts.scenario.starts_with("shaping") {
        return crate::shaping_bench::run(opts);
    }
    if opts.scenario == "dkim" {
        return crate::dkim_bench::run(opts);
    }
    if opts.scenario == "dane" {
        return crate::dane_bench::run(opts);
    }
    if opts.scenario == "submission" {
        return crate::submission_bench::run(opts);
    }
    let sc = scenario(&opts.scenario)?;
    let n = opts.recipients.unwrap_or(sc.recipients);
    let mut runs: Vec<(System, &str)> = match &opts.systems {
        Some(only) => sc
            .runs
            .into_iter()
            .filter(|(s, _)| only.contains(s))
            .collect(),
        None => sc.runs,
    };
    if let Some(p) = &opts.profile {
        for r in runs.iter_mut().filter(|r| r.1 != "accept-all") {
            r.1 = p.as_str();
        }
    }
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", opts.out.display()))?;
    let work = std::env::temp_dir().join(format!("volley-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let campaign = work.join("campaign");
    gen::write_campaign(
        &campaign,
        &GenOptions {
            recipients: n,
            body_bytes: sc.body_bytes,
            campaign_id: "bench".into(),
            ..GenOptions::default()
        },
    )?;
    let runs = variants(opts, runs);
    let rounds = opts.rounds.max(1);
    // (round, result): ratios are taken within a round, then their median.
    let mut results: Vec<(usize, Result)> = Vec::new();
    let mut skipped = Vec::new();
    // Every other round runs the systems in the opposite order, so that neither
    // always has the machine just after the other.
    let order = |i: usize| -> Vec<(usize, &Run)> {
        let mut r: Vec<_> = runs.iter().map(|r| (i, r)).collect();
        if i % 2 == 1 {
            r.reverse();
        }
        r
    };
    for (round, run) in (0..rounds).flat_map(order) {
        let (sys, profile) = (run.system, run.profile);
        eprintln!(
            "bench: {}{} sending {n} messages ({profile} profile){}",
            name(sys),
            run.variant_label(),
            if rounds > 1 {
                format!(", round {} of {rounds}", round + 1)
            } else {
                String::new()
            }
        );
        let r = match sys {
            System::Volley => {
                let mut shaping: Vec<&str> = match &opts.shaping {
                    Some(f) if profile != "accept-all" || opts.shaping_accept_all => {
                        vec!["--shaping", f.to_str().expect("utf-8 path")]
                    }
                    _ => vec![],
                };
                let with_shaping = !shaping.is_empty();
                shaping.extend(run.extra.iter().map(String::as_str));
                let mut p = Profile::load(profile)?;
                let mut label = profile.to_string();
                if profile != "accept-all" && !opts.without.is_empty() {
                    let parts: Vec<String> = opts
                        .without
                        .iter()
                        .map(|w| {
                            p.without(*w);
                            format!("{w:?}").to_lowercase()
                        })
                        .collect();
                    label = format!("{profile} without {}", parts.join(" and "));
                }
                let build = BenchOptions {
                    volley: run.binary.clone().or_else(|| opts.volley.clone()),
                    ..opts.clone()
                };
                run_volley(&build, &label, p, n, &campaign, &work, &shaping).map(|(mut r, _)| {
                    if profile == "accept-all" && with_shaping {
                        r.note = "with the same --shaping".into();
                    }
                    r.variant = run.variant.clone();
                    r
                })
            }
            System::SmtpSource => run_smtp_source(opts, profile, n, sc.body_bytes),
            System::Postfix => run_postfix(opts, profile, n, sc.body_bytes, &work),
        };
        match r {
            Ok(mut r) => {
                eprintln!(
                    "bench: {}{} ({profile}) {:.0} msgs/s",
                    r.system,
                    run.variant_label(),
                    r.msgs_per_s
                );
                if rounds > 1 {
                    r.note = format!("round {}; {}", round + 1, r.note)
                        .trim_end_matches("; ")
                        .to_string();
                }
                results.push((round, r));
            }
            Err(e) => {
                eprintln!("bench: {} skipped: {e:#}", name(sys));
                skipped.push(format!("{} (round {}): {e:#}", name(sys), round + 1));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let report = Report {
        scenario: opts.scenario.clone(),
        ratios: ratios(&results, rounds),
        results: results.into_iter().map(|(_, r)| r).collect(),
        checks: Vec::new(),
        skipped,
    };
    write_report(opts, report)
}

/// One run of a round: a system on a sink profile, volley's with the variant's
/// arguments (`--tls`, `--driver`).
struct Run<'a> {
    system: System,
    profile: &'a str,
    /// "STARTTLS, epoll"; empty for the one default run.
    variant: String,
    extra: Vec<String>,
    /// `--baseline`'s binary instead of the one under test.
    binary: Option<PathBuf>,
}

impl Run<'_> {
    fn variant_label(&self) -> String {
        if self.variant.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.variant)
        }
    }
}

/// The scenario's runs, volley's accept-all run once per `--tls` and `--driver`
/// value given (STARTTLS and the engine's driver choice where none is), and per
/// build when `--baseline` gives a second one.
fn variants<'a>(opts: &BenchOptions, runs: Vec<(System, &'a str)>) -> Vec<Run<'a>> {
    let tls = if opts.tls.is_empty() {
        vec![TlsColumn::Starttls]
    } else {
        opts.tls.clone()
    };
    let drivers = if opts.drivers.is_empty() {
        vec![Driver::Auto]
    } else {
        opts.drivers.clone()
    };
    let named = !opts.tls.is_empty() || !opts.drivers.is_empty();
    // The baseline build first, so that every ratio reads "this build / baseline".
    let builds: Vec<Option<&PathBuf>> = opts.baseline.iter().map(Some).chain([None]).collect();
    let mut out = Vec::new();
    for (system, profile) in runs {
        if system != System::Volley || profile != "accept-all" {
            out.push(Run {
                system,
                profile,
                variant: String::new(),
                extra: Vec::new(),
                binary: None,
            });
            continue;
        }
        for (&build, &t, &d) in builds
            .iter()
            .flat_map(|b| tls.iter().map(move |t| (b, t)))
            .flat_map(|(b, t)| drivers.iter().map(move |d| (b, t, d)))
        {
            let mut extra = vec!["--driver".to_string(), d.to_string()];
            if t == TlsColumn::Plain {
                extra.extend(["--tls".to_string(), "disabled".to_string()]);
            }
            let mut variant: Vec<String> = Vec::new();
            if opts.baseline.is_some() {
                variant.push(
                    if build.is_some() {
                        "baseline"
                    } else {
                        "this build"
                    }
                    .into(),
                );
            }
            if named {
                let tls_name = match t {
                    TlsColumn::Starttls => "STARTTLS",
                    TlsColumn::Plain => "plain",
                };
                variant.push(format!("{tls_name}, {d}"));
            }
            out.push(Run {
                system,
                profile,
                variant: variant.join(", "),
                extra,
                binary: build.cloned(),
            });
        }
    }
    out
}

/// The middle value (the upper middle of an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// volley's accept-all rate over each other system's, volley's first pass on
/// another profile over its accept-all rate, and each other accept-all variant's
/// rate and CPU per message over the first's: taken within each round, then the
/// median over the rounds (with every round's value in the name when there are more).
pub(crate) fn ratios(results: &[(usize, Result)], rounds: usize) -> Vec<(String, f64)> {
    let accept_all = |r: &Result| r.system == "volley" && r.profile == "accept-all";
    // The base is volley's first variant (the order of `--tls` and `--driver`): the
    // first in round 1, which runs in that order.
    let base_variant = results
        .iter()
        .find(|(i, r)| *i == 0 && accept_all(r))
        .map(|(_, r)| &r.variant);
    let mut per: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 0..rounds {
        let these: Vec<&Result> = results
            .iter()
            .filter(|(i, _)| *i == round)
            .map(|(_, r)| r)
            .collect();
        let Some(first) = these
            .iter()
            .find(|r| accept_all(r) && Some(&r.variant) == base_variant)
        else {
            continue;
        };
        let base = first.msgs_per_s;
        let mut add = |name: String, v: f64| match per.iter_mut().find(|(n, _)| *n == name) {
            Some((_, vs)) => vs.push(v),
            None => per.push((name, vec![v])),
        };
        for r in these.iter().filter(|r| r.system != "volley") {
            add(format!("volley / {}", r.system), base / r.msgs_per_s);
        }
        for r in these
            .iter()
            .filter(|r| accept_all(r) && r.variant != first.variant)
        {
            let (this, that) = (&r.variant, &first.variant);
            add(
                format!("msgs/s, volley ({this}) / volley ({that})"),
                r.msgs_per_s / base,
            );
            if let (Some(a), Some(b)) = (r.cpu_s_per_1000, first.cpu_s_per_1000) {
                add(
                    format!("CPU per message, volley ({this}) / volley ({that})"),
                    a / b,
                );
            }
        }
        for r in these
            .iter()
            .filter(|r| r.system == "volley" && r.profile != "accept-all")
        {
            if let Some(fp) = r.first_pass_msgs_per_s {
                add(
                    format!("volley first pass ({}) / volley (accept-all)", r.profile),
                    fp / base,
                );
            }
        }
    }
    per.into_iter()
        .map(|(name, mut vs)| {
            let median = median(&vs);
            vs.sort_by(f64::total_cmp);
            if vs.len() == 1 {
                (name, median)
            } else {
                let each: Vec<String> = vs.iter().map(|v| format!("{v:.2}")).collect();
                (
                    format!(
                        "{name}, median of {} rounds ({})",
                        vs.len(),
                        each.join(", ")
                    ),
                    median,
                )
            }
        })
        .collect()
}

/// A report of runs judged by checks rather than ratios (the shaping and dkim runners),
/// printed and written like `write_report`.
pub(crate) fn write_checks(
    opts: &BenchOptions,
    results: Vec<Result>,
    checks: Vec<Check>,
) -> anyhow::Result<Report> {
    write_report(
        opts,
        Report {
            scenario: opts.scenario.clone(),
            results,
            ratios: Vec::new(),
            checks,
            skipped: Vec::new(),
        },
    )
}

/// Prints the report and writes it as JSON and Markdown under `--out`.
pub(crate) fn write_report(opts: &BenchOptions, report: Report) -> anyhow::Result<Report> {
    let md = markdown(&report);
    println!("{md}");
    std::fs::write(
        opts.out.join(format!("{}.json", opts.scenario)),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(opts.out.join(format!("{}.md", opts.scenario)), md)?;
    eprintln!("bench: results in {}", opts.out.display());
    Ok(report)
}

pub(crate) fn name(s: System) -> &'static str {
    match s {
        System::Volley => "volley",
        System::SmtpSource => "smtp-source",
        System::Postfix => "postfix",
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = format!("### bench {}\n\n", r.scenario);
    s.push_str("| system | sink profile | messages | msgs/s | first pass msgs/s | CPU µs/msg (user + sys) | syscalls/msg | io_uring submits/msg | context switches/msg | sink CPU µs/msg | peak RSS MB | p50 ms | p90 ms | p99 ms | max ms | dup | corrupt | note |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let opt = |v: Option<f64>, d: usize| v.map_or("n/a".to_string(), |v| format!("{v:.d$}"));
    for x in &r.results {
        let cpu = match (x.cpu_s_per_1000, x.user_us_per_msg, x.sys_us_per_msg) {
            (Some(c), Some(u), Some(k)) => format!("{:.1} ({u:.1} + {k:.1})", c * 1000.0),
            (c, _, _) => opt(c.map(|c| c * 1000.0), 1),
        };
        let system = if x.variant.is_empty() {
            x.system.clone()
        } else {
            format!("{} ({})", x.system, x.variant)
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            system,
            x.profile,
            x.terminal,
            x.msgs_per_s,
            opt(x.first_pass_msgs_per_s, 0),
            cpu,
            opt(x.syscalls_per_msg, 1),
            opt(x.io_uring_submits_per_msg, 1),
            opt(x.context_switches_per_msg, 2),
            opt(x.sink_cpu_us_per_msg, 1),
            opt(x.peak_rss_mb, 1),
            x.latency_ms_p50,
            x.latency_ms_p90,
            x.latency_ms_p99,
            x.latency_ms_max,
            x.duplicates,
            x.corrupt,
            x.note
        ));
    }
    for x in r.results.iter().filter(|x| !x.first_pass_by_mx.is_empty()) {
        s.push_str(&format!(
            "\nvolley first pass ({}) by destination, seconds from start: first answer / half / all\n",
            x.profile
        ));
        for m in &x.first_pass_by_mx {
            s.push_str(&format!(
                "- {}: {} recipients, {:.2} / {:.2} / {:.2}\n",
                m.mx, m.recipients, m.first_s, m.half_s, m.done_s
            ));
        }
    }
    for (what, v) in &r.ratios {
        s.push_str(&format!("\n{what}: {v:.2}x"));
    }
    for why in &r.skipped {
        s.push_str(&format!("\n\nskipped: {why}"));
    }
    if !r.checks.is_empty() {
        s.push_str("\n\n| check | measured | target | pass |\n|---|---|---|---|\n");
        for c in &r.checks {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.what,
                c.measured,
                c.target,
                if c.pass { "yes" } else { "NO" }
            ));
        }
    }
    s.push('\n');
    s
}

pub(crate) struct Target {
    pub(crate) sink: Sink,
    pub(crate) dns: dns::DnsServer,
}

pub(crate) fn target(opts: &BenchOptions, profile: &str) -> anyhow::Result<Target> {
    target_with(opts, Profile::load(profile)?, None)
}

/// The sink running `p` (serving the PEM certificate chain and key of `tls_files`,
/// else a self-signed certificate) and the test DNS routing to it.
pub(crate) fn target_with(
    opts: &BenchOptions,
    mut p: Profile,
    tls_files: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<Target> {
    p.set_port(0);
    let sink = Sink::start(SinkOptions {
        profile: p,
        threads: opts.sink_threads,
        driver: Driver::Auto,
        keep: None,
        tls_files,
    })?;
    let dns = dns::start(
        "127.0.0.1:0".parse().expect("valid"),
        Zone::from_profile(sink.profile(), &sink.addrs),
    )?;
    Ok(Target { sink, dns })
}

/// Polls the sink until `n` recipients are final or the child exits (then a little
/// longer, for the last replies) or the timeout passes.
pub(crate) fn wait_for(
    sink: &Sink,
    n: u64,
    started: Instant,
    mut child_done: impl FnMut() -> bool,
) -> (Summary, f64) {
    let mut exited_at: Option<Instant> = None;
    loop {
        if sink.rcpts_terminal() >= n {
            return (sink.summary(), started.elapsed().as_secs_f64());
        }
        if exited_at.is_none() && child_done() {
            exited_at = Some(Instant::now());
        }
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
            || started.elapsed() > RUN_TIMEOUT
        {
            return (sink.summary(), started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A system under test started by [`spawn_measured`].
struct Measured {
    child: std::process::Child,
    counters: Option<Counters>,
    /// This process's CPU when the child started, s.
    self_cpu0: f64,
}

/// Starts `cmd` with its system calls and io_uring submissions counted (unless
/// `opts.syscall_count` is off, or the kernel will not count them: said once).
fn spawn_measured(opts: &BenchOptions, cmd: &mut Command) -> anyhow::Result<Measured> {
    static TRACEPOINTS: std::sync::OnceLock<Option<Tracepoints>> = std::sync::OnceLock::new();
    let tracepoints = opts.syscall_count.then(|| {
        *TRACEPOINTS.get_or_init(|| {
            Tracepoints::find()
                .map_err(|why| eprintln!("bench: no syscall columns: {why}"))
                .ok()
        })
    });
    if let Some(tp) = tracepoints.flatten() {
        tp.attach(cmd);
    }
    let self_cpu0 = self_cpu_s();
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("{:?}: {e}", cmd.get_program()))?;
    let counters = tracepoints.flatten().map(|_| Counters::of(child.id()));
    Ok(Measured {
        child,
        counters,
        self_cpu0,
    })
}

/// Waits for the sink to see `n` final recipients from the child `m`, then reaps
/// it for its CPU time, peak RSS, context switches and counts.
fn watch(sink: &Sink, n: u64, started: Instant, m: Measured) -> (Summary, f64, Option<Usage>) {
    let pid = m.child.id();
    let mut usage = None;
    let mut hwm = None;
    let (s, secs) = wait_for(sink, n, started, || {
        hwm = peak_rss_mb(pid).or(hwm);
        usage = reap(pid, false);
        usage.is_some()
    });
    let sink_cpu_s = self_cpu_s() - m.self_cpu0;
    let mut usage = usage.or_else(|| reap(pid, true));
    if let Some(u) = usage.as_mut() {
        // wait4's ru_maxrss keeps the high-water mark from before exec, when the
        // child was a copy of this process (whose RSS grows with each run's sink
        // state), so the child's own VmHWM is the figure; wait4's only if the child
        // never showed one.
        if let Some(h) = hwm {
            u.max_rss_mb = h;
        }
        (u.syscalls, u.uring_submits) = m.counters.map_or((None, None), |c| c.read());
        u.sink_cpu_s = Some(sink_cpu_s);
    }
    (s, secs, usage)
}

/// A running process's peak resident set (VmHWM, which exec resets), in MB.
pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[derive(Default)]
pub(crate) struct Usage {
    /// User and system CPU, s.
    pub(crate) cpu_s: f64,
    /// The system part of `cpu_s` (None where only the sum is known).
    pub(crate) sys_s: Option<f64>,
    pub(crate) max_rss_mb: f64,
    /// wait4's status (None where the figures are not one reaped child's).
    pub(crate) wait_status: Option<i32>,
    /// Voluntary plus involuntary context switches.
    pub(crate) context_switches: Option<u64>,
    /// From counters.rs, where they could be had.
    pub(crate) syscalls: Option<u64>,
    pub(crate) uring_submits: Option<u64>,
    /// The bench process's CPU over the run, s.
    pub(crate) sink_cpu_s: Option<f64>,
}

impl Usage {
    /// CPU time known only as a sum (Postfix's many processes).
    pub(crate) fn cpu_only(cpu_s: f64) -> Usage {
        Usage {
            cpu_s,
            ..Usage::default()
        }
    }
}

/// Reaps `pid` with wait4 to read its CPU time and peak RSS; None if it is still running.
pub(crate) fn reap(pid: u32, block: bool) -> Option<Usage> {
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on our own child's pid with valid out-pointers.
    let r = unsafe {
        libc::wait4(
            pid as i32,
            &mut status,
            if block { 0 } else { libc::WNOHANG },
            &mut ru,
        )
    };
    if r != pid as i32 {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(Usage {
        cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
        sys_s: Some(tv(ru.ru_stime)),
        max_rss_mb: ru.ru_maxrss as f64 / 1024.0,
        wait_status: Some(status),
        context_switches: Some((ru.ru_nvcsw + ru.ru_nivcsw) as u64),
        ..Usage::default()
    })
}

pub(crate) fn result(
    system: &str,
    profile: &str,
    n: u64,
    s: &Summary,
    secs: f64,
    usage: Option<Usage>,
    note: String,
) -> Result {
    let per = n.max(1) as f64;
    Result {
        system: system.into(),
        variant: String::new(),
        profile: profile.into(),
        recipients: n,
        terminal: s.rcpts_terminal,
        seconds: secs,
        msgs_per_s: s.rcpts_terminal as f64 / secs.max(1e-9),
        delivered_s: None,
        first_pass_msgs_per_s: None,
        first_pass_by_mx: Vec::new(),
        cpu_s_per_1000: usage.as_ref().map(|u| u.cpu_s * 1000.0 / per),
        user_us_per_msg: usage
            .as_ref()
            .and_then(|u| Some((u.cpu_s - u.sys_s?) * 1e6 / per)),
        sys_us_per_msg: usage.as_ref().and_then(|u| Some(u.sys_s? * 1e6 / per)),
        syscalls_per_msg: usage.as_ref().and_then(|u| Some(u.syscalls? as f64 / per)),
        io_uring_submits_per_msg: usage
            .as_ref()
            .and_then(|u| Some(u.uring_submits? as f64 / per)),
        context_switches_per_msg: usage
            .as_ref()
            .and_then(|u| Some(u.context_switches? as f64 / per)),
        sink_cpu_us_per_msg: usage.as_ref().and_then(|u| Some(u.sink_cpu_s? * 1e6 / per)),
        peak_rss_mb: usage.as_ref().map(|u| u.max_rss_mb),
        latency_ms_p50: s.latency_ms.p50,
        latency_ms_p90: s.latency_ms.p90,
        latency_ms_p99: s.latency_ms.p99,
        latency_ms_max: s.latency_ms.max,
        duplicates: s.counts.duplicates,
        corrupt: s.counts.corrupt,
        note,
    }
}

pub(crate) fn volley_binary(opts: &BenchOptions) -> anyhow::Result<PathBuf> {
    if let Some(p) = &opts.volley {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("volley");
    if !sibling.exists() {
        // Under `cargo run -p volley-load` only the load tool is built: build the engine too.
        eprintln!(
            "bench: {} not built yet; running cargo build --release -p volley",
            sibling.display()
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "volley", "--bin", "volley"])
            .status()?;
        anyhow::ensure!(
            st.success(),
            "cargo build of volley failed; build it and pass --volley PATH"
        );
    }
    anyhow::ensure!(
        sibling.exists(),
        "{} not found; pass --volley PATH",
        sibling.display()
    );
    Ok(sibling)
}

/// volley sends `campaign` to a sink running `p` (named `profile` in the results),
/// with `extra` arguments to `volley send`; the result and the sink's summary.
pub(crate) fn run_volley(
    opts: &BenchOptions,
    profile: &str,
    p: Profile,
    n: u64,
    campaign: &Path,
    work: &Path,
    extra: &[&str],
) -> anyhow::Result<(Result, Summary)> {
    let t = target_with(opts, p, None)?;
    run_volley_on(opts, profile, t, n, campaign, work, extra)
}

/// As [`run_volley`], against the sink and DNS of `t`.
pub(crate) fn run_volley_on(
    opts: &BenchOptions,
    profile: &str,
    t: Target,
    n: u64,
    campaign: &Path,
    work: &Path,
    extra: &[&str],
) -> anyhow::Result<(Result, Summary)> {
    let bin = volley_binary(opts)?;
    let spool = work.join("volley-spool");
    let _ = std::fs::remove_dir_all(&spool);
    let mut cmd = Command::new(&bin);
    cmd.args([
        "send",
        campaign.to_str().expect("utf-8 path"),
        "--quiet",
        "--new",
    ])
    .args(["--spool", spool.to_str().expect("utf-8 path")])
    .args([
        "--dns",
        &t.dns.addr.to_string(),
        "--smtp-port",
        &t.sink.port().to_string(),
    ])
    .args([
        "--ehlo",
        "bench.volley.test",
        "--retry-schedule",
        "1s",
        "--max-wait",
        "15m",
    ])
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(s) = opts.shards {
        cmd.args(["--shards", &s.to_string()]);
    }
    t.sink.reset_latency_origin();
    let started = Instant::now();
    let started_sys = std::time::SystemTime::now();
    let child = spawn_measured(opts, &mut cmd)?;
    let (s, secs, usage) = watch(&t.sink, n, started, child);
    let note = if profile == "accept-all" {
        String::new()
    } else {
        "msgs/s includes retries (schedule 1s)".to_string()
    };
    let mut r = result("volley", profile, n, &s, secs, usage, note);
    let by_mx = first_pass(&spool.join("accounting.jsonl"), started_sys);
    r.first_pass_msgs_per_s = by_mx
        .iter()
        .map(|m| m.done_s)
        .max_by(f64::total_cmp)
        .map(|d| n as f64 / d);
    r.first_pass_by_mx = by_mx;
    Ok((r, s))
}

/// Each destination's first pass from volley's accounting log: when the first
/// attempts' answers came, in seconds from `start`. The whole first pass ends with
/// the slowest destination's; where it ends says which receiver held the run up.
fn first_pass(log: &Path, start: std::time::SystemTime) -> Vec<MxPass> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    let mut per: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["attempt"] == 1)
    {
        let Some(t) = v["time"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
        else {
            continue;
        };
        let secs = t.duration_since(start).map_or(0.0, |d| d.as_secs_f64());
        let mx = v["mx"].as_str().unwrap_or("(no MX)").to_string();
        per.entry(mx).or_default().push(secs);
    }
    per.into_iter()
        .map(|(mx, mut ts)| {
            ts.sort_by(f64::total_cmp);
            MxPass {
                mx,
                recipients: ts.len() as u64,
                first_s: ts[0],
                half_s: ts[ts.len() / 2],
                done_s: ts[ts.len() - 1],
            }
        })
        .collect()
}

/// smtp-source with 50 sessions, each sending message after message on one
/// connection (-d), `n` messages of `body_bytes`.
fn smtp_source(bin: &Path, n: u64, body_bytes: usize, rcpt: &str, addr: &str) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "-s",
        "50",
        "-d",
        "-l",
        &body_bytes.to_string(),
        "-m",
        &n.to_string(),
    ])
    .args(["-f", "bench@news.volley.test", "-t", rcpt, addr]);
    c
}

pub(crate) fn smtp_source_path() -> anyhow::Result<PathBuf> {
    for p in ["/usr/sbin/smtp-source", "/usr/bin/smtp-source"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    install_postfix()?;
    Ok("/usr/sbin/smtp-source".into())
}

/// Debian's postfix package carries smtp-source, smtp-sink and Postfix itself.
fn install_postfix() -> anyhow::Result<()> {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    anyhow::ensure!(
        root && Path::new("/usr/bin/apt-get").exists(),
        "postfix is not installed; as root: apt-get install -y postfix"
    );
    eprintln!("bench: installing Debian's postfix package (smtp-source, smtp-sink, Postfix)");
    let sh = "apt-get update -qq && echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix";
    let st = Command::new("sh").args(["-c", sh]).status()?;
    anyhow::ensure!(
        st.success(),
        "apt-get install postfix failed; install it by hand"
    );
    Ok(())
}

/// smtp-source: 50 sessions, each keeping its connection (-d), to the Google address.
fn run_smtp_source(
    opts: &BenchOptions,
    profile: &str,
    n: u64,
    body_bytes: usize,
) -> anyhow::Result<Result> {
    let bin = smtp_source_path()?;
    let t = target(opts, profile)?;
    let addr = t
        .sink
        .addr_of("google")
        .ok_or_else(|| anyhow::anyhow!("profile has no google provider"))?;
    t.sink.reset_latency_origin();
    let started = Instant::now();
    let mut cmd = smtp_source(&bin, n, body_bytes, "rcpt@gmail.com", &addr.to_string());
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
    let child = spawn_measured(opts, &mut cmd)?;
    let (s, secs, usage) = watch(&t.sink, n, started, child);
    Ok(result(
        "smtp-source",
        profile,
        n,
        &s,
        secs,
        usage,
        "-s 50 -d: no pipelining, no queue, no disk".into(),
    ))
}

/// A private Postfix instance: queue the messages with delivery deferred, then
/// release them and time delivery from the queue to the sink.
fn run_postfix(
    opts: &BenchOptions,
    profile: &str,
    n: u64,
    body_bytes: usize,
    work: &Path,
) -> anyhow::Result<Result> {
    let source = smtp_source_path()?;
    let t = target(opts, profile)?;
    let tail = t
        .sink
        .addr_of("tail")
        .ok_or_else(|| anyhow::anyhow!("profile has no tail provider"))?;
    let pf = PostfixInstance::start(&work.join("postfix"), tail, true)?;
    // Inject over SMTP, delivery deferred, and wait until all are in the queue.
    let st = Command::new(&source)
        .args([
            "-s",
            "20",
            "-l",
            &body_bytes.to_string(),
            "-m",
            &n.to_string(),
        ])
        .args(["-f", "bench@news.volley.test", "-t", "rcpt@shop1.tail.test"])
        .arg(pf.listen.to_string())
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "injecting into postfix failed");
    let queued = pf.queued();
    anyhow::ensure!(queued > 0, "postfix queued nothing; see {}", pf.log());
    // Release: delivery on, flush the queue, time until the sink has them all.
    let out = Command::new("/usr/sbin/postconf")
        .arg("-c")
        .arg(&pf.etc)
        .args(["-e", "defer_transports ="])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "postconf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.sink.reset_latency_origin();
    // Postfix is many processes: its CPU is the machine's busy time less this process's (the sink).
    let (cpu0, self0) = (system_busy_s()?, self_cpu_s());
    let started = Instant::now();
    pf.command(&["reload"])?;
    let _ = Command::new("/usr/sbin/postqueue")
        .arg("-c")
        .arg(&pf.etc)
        .arg("-f")
        .output();
    let (s, secs) = wait_for(&t.sink, n, started, || false);
    let cpu = (system_busy_s()? - cpu0) - (self_cpu_s() - self0);
    drop(pf);
    let note = format!(
        "{queued} queued before release; relayhost to one address; CPU = machine less the sink"
    );
    let mut r = result(
        "postfix",
        profile,
        n,
        &s,
        secs,
        Some(Usage::cpu_only(cpu)),
        note,
    );
    r.peak_rss_mb = None;
    Ok(r)
}

/// A private Postfix instance under `dir` (config, queue, data and log there; the
/// system's Postfix is not touched): smtpd on a free loopback port, relaying
/// everything from 127.0.0.0/8 to `relay`. Started by `start`, stopped on drop.
pub(crate) struct PostfixInstance {
    pub(crate) dir: PathBuf,
    pub(crate) etc: PathBuf,
    /// smtpd's address.
    pub(crate) listen: std::net::SocketAddr,
}

impl PostfixInstance {
    /// `deferred`: queue everything and deliver nothing (`defer_transports = smtp`)
    /// until it is changed and the instance reloaded.
    pub(crate) fn start(
        dir: &Path,
        relay: std::net::SocketAddr,
        deferred: bool,
    ) -> anyhow::Result<PostfixInstance> {
        anyhow::ensure!(
            Path::new("/usr/sbin/postfix").exists(),
            "postfix is not installed; as root: apt-get install -y postfix"
        );
        let _ = std::fs::remove_dir_all(dir);
        let etc = dir.join("etc");
        for d in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let st = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()?;
        anyhow::ensure!(
            st.success(),
            "chown postfix {}: are we root?",
            dir.join("data").display()
        );
        let port = free_port()?;
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .map_err(|e| anyhow::anyhow!("/etc/postfix/master.cf: {e}"))?;
        std::fs::write(etc.join("master.cf"), master_cf(&master, port) + "\n")?;
        let main = format!(
            "compatibility_level = 3.6\nqueue_directory = {q}\ndata_directory = {d}\nmail_owner = postfix\nsetgid_group = postdrop\n\
             myhostname = postfix.bench.volley.test\nmydestination =\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\nrelayhost = [{ip}]:{rport}\ndefer_transports = {defer}\nsmtp_tls_security_level = none\n\
             default_destination_concurrency_limit = 50\nsmtp_destination_concurrency_limit = 50\ndefault_process_limit = 200\n\
             message_size_limit = 52428800\nmaillog_file = {dir}/maillog\nmaillog_file_prefixes = {dir}\nalias_maps =\nalias_database =\nlocal_recipient_maps =\n\
             smtpd_recipient_restrictions = permit_mynetworks, reject\nsmtp_connection_cache_on_demand = yes\n",
            q = dir.join("queue").display(),
            d = dir.join("data").display(),
            ip = relay.ip(),
            rport = relay.port(),
            defer = if deferred { "smtp" } else { "" },
            dir = dir.display(),
        );
        std::fs::write(etc.join("main.cf"), main)?;
        let pf = PostfixInstance {
            dir: dir.to_path_buf(),
            etc,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        };
        pf.command(&["check"])?;
        pf.command(&["start"])?;
        Ok(pf)
    }

    /// `postfix -c ETC ARGS`; Postfix reports to its log file, not stderr.
    pub(crate) fn command(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&self.etc)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "postfix {} failed; see {}",
            args.join(" "),
            self.log()
        );
        Ok(())
    }

    pub(crate) fn log(&self) -> String {
        self.dir.join("maillog").display().to_string()
    }

    /// Queue files in incoming, active and deferred.
    pub(crate) fn queued(&self) -> usize {
        ["incoming", "active", "deferred"]
            .iter()
            .map(|q| count_files(&self.dir.join("queue").join(q)))
            .sum()
    }
}

impl Drop for PostfixInstance {
    fn drop(&mut self) {
        let _ = self.command(&["stop"]);
    }
}

/// The system's master.cf with no chroot (the private queue is not set up for it)
/// and smtpd on 127.0.0.1:`port`.
fn master_cf(master: &str, port: u16) -> String {
    master
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if l.starts_with(|c: char| c.is_ascii_alphanumeric()) && f.len() >= 8 {
                let svc = if f[0] == "smtp" && f[1] == "inet" {
                    format!("127.0.0.1:{port}")
                } else {
                    f[0].to_string()
                };
                format!(
                    "{} {} {} {} n {} {} {}",
                    svc,
                    f[1],
                    f[2],
                    f[3],
                    f[5],
                    f[6],
                    f[7..].join(" ")
                )
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) fn self_cpu_s() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Issue 2's check that the sink is never the bottleneck: the same smtp-source blast
/// (-s 50 -d) against `volley-load sink` (accept-all) and against Postfix's smtp-sink,
/// each in its own process; smtp-source's wall time is the measure.
pub fn sink_comparison(n: u64, body_bytes: usize, threads: usize) -> anyhow::Result<String> {
    let source = smtp_source_path()?;
    let blast = |addr: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = smtp_source(&source, n, body_bytes, "rcpt@gmail.com", addr)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "smtp-source against {addr} failed");
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let wait_listening = |addr: &str| {
        let t = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let ours_port = free_port()?;
    let ours_addr = format!("127.0.0.10:{ours_port}");
    let exe = std::env::current_exe()?;
    let mut ours = Command::new(exe)
        .args([
            "sink",
            "--profile",
            "accept-all",
            "--port",
            &ours_port.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .args(["--stats-interval-s", "0", "--summary", "/dev/null"])
        .stderr(Stdio::null())
        .spawn()?;
    let their_port = free_port()?;
    let their_addr = format!("127.0.0.1:{their_port}");
    let mut theirs = Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody", &their_addr, "1000"])
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(&ours_addr);
    wait_listening(&their_addr);
    // Alternate, three rounds each, and take medians: the machine is shared and noisy.
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        a.push(blast(&ours_addr)?);
        b.push(blast(&their_addr)?);
    }
    let _ = ours.kill();
    let _ = theirs.kill();
    let _ = ours.wait();
    let _ = theirs.wait();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (ma, mb) = (med(&mut a), med(&mut b));
    Ok(format!(
        "### sink vs smtp-sink: smtp-source -s 50 -d -l {body_bytes} -m {n}, median of 3\n\n| sink | msgs/s (runs) |\n|---|---|\n| volley-load sink ({threads} threads) | {ma:.0} ({a:.0?}) |\n| smtp-sink | {mb:.0} ({b:.0?}) |\n\nvolley-load sink / smtp-sink: {:.2}x\n",
        ma / mb
    ))
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn count_files(dir: &Path) -> usize {
    walk(dir).unwrap_or(0)
}

fn walk(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += walk(&e.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Busy CPU seconds of the whole machine so far (/proc/stat, all but idle and iowait).
pub(crate) fn system_busy_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow::anyhow!("/proc/stat is empty"))?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() >= 5, "/proc/stat: unexpected format");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((v.iter().sum::<f64>() - v[3] - v[4]) / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volley(profile: &str, rate: f64, first_pass: Option<f64>) -> Result {
        Result {
            system: "volley".into(),
            profile: profile.into(),
            recipients: 100,
            terminal: 100,
            seconds: 1.0,
            msgs_per_s: rate,
            first_pass_msgs_per_s: first_pass,
            ..Result::default()
        }
    }

    #[test]
    fn ratios_are_taken_within_a_round_then_their_median() {
        // Round 2's accept-all run was slow: pairing it with round 1's realistic run
        // would give 1.5; within rounds the ratios are 0.5, 0.9 and 0.6.
        let results = vec![
            (0, volley("accept-all", 30.0, None)),
            (0, volley("realistic", 5.0, Some(15.0))),
            (1, volley("accept-all", 10.0, None)),
            (1, volley("realistic", 5.0, Some(9.0))),
            (2, volley("accept-all", 20.0, None)),
            (2, volley("realistic", 5.0, Some(12.0))),
        ];
        let r = ratios(&results, 3);
        assert_eq!(r.len(), 1);
        assert!((r[0].1 - 0.6).abs() < 1e-9, "{r:?}");
        assert!(
            r[0].0.ends_with("median of 3 rounds (0.50, 0.60, 0.90)"),
            "{r:?}"
        );
        let one = ratios(&results[..2], 1);
        assert_eq!(
            one[0].0,
            "volley first pass (realistic) / volley (accept-all)"
        );
    }

    #[test]
    fn variants_are_taken_over_the_first_whichever_order_the_round_ran() {
        let run = |variant: &str, rate: f64, cpu: f64| Result {
            variant: variant.into(),
            cpu_s_per_1000: Some(cpu),
            ..volley("accept-all", rate, None)
        };
        let (uring, epoll) = ("STARTTLS, io-uring", "STARTTLS, epoll");
        // Round 2 ran backwards: epoll first. The base stays io_uring.
        let results = vec![
            (0, run(uring, 100.0, 0.020)),
            (0, run(epoll, 120.0, 0.018)),
            (1, run(epoll, 90.0, 0.030)),
            (1, run(uring, 100.0, 0.025)),
            (2, run(uring, 50.0, 0.020)),
            (2, run(epoll, 55.0, 0.021)),
        ];
        let r = ratios(&results, 3);
        let find = |what: &str| {
            r.iter()
                .find(|(name, _)| name.starts_with(what))
                .unwrap_or_else(|| panic!("no {what:?} in {r:?}"))
                .1
        };
        let rate = find("msgs/s, volley (STARTTLS, epoll) / volley (STARTTLS, io-uring)");
        assert!((rate - 1.1).abs() < 1e-9, "{r:?}");
        let cpu = find("CPU per message, volley (STARTTLS, epoll) / volley (STARTTLS, io-uring)");
        assert!((cpu - 1.05).abs() < 1e-9, "{r:?}");
        assert_eq!(r.len(), 2, "{r:?}");
    }
}
