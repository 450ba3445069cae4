//! The sink: an ESMTP receiver on loopback that plays several providers at once,
//! thread-per-core on monoio like the engine. Each thread binds every listen address
//! with SO_REUSEPORT and the kernel spreads connections over them.
//!
//! Counting is per thread (a lock nobody else takes until a summary is asked for);
//! only the duplicate set and the per-client-IP caps and rates are shared.

use crate::integrity::{self, Check};
use crate::profile::{Profile, Provider};
use hdrhistogram::Histogram;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volley::deliver::runtime::Driver;
use volley::smtp::server::{Behaviour, Command, Message, ServerConfig, ServerSession, Verdict};

/// Read buffer per connection.
const READ_BUF_BYTES: usize = 16 * 1024;
/// Per-second counters kept (a day); later seconds are folded into the last one.
const PER_SECOND_MAX: usize = 86_400;

pub struct SinkOptions {
    pub profile: Profile,
    pub threads: usize,
    pub driver: Driver,
    /// Write each accepted message here as a .eml file.
    pub keep: Option<PathBuf>,
    /// PEM certificate chain and key; generated (self-signed) when absent.
    pub tls_files: Option<(PathBuf, PathBuf)>,
}

/// A running sink. Its threads serve until the process exits.
pub struct Sink {
    shared: Arc<Shared>,
    /// Every address served, per provider (ports resolved when 0 was asked).
    pub addrs: Vec<Vec<SocketAddr>>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub connections: u64,
    pub messages_accepted: u64,
    pub rcpts_accepted: u64,
    pub rcpt_tempfail: u64,
    pub rcpt_permfail: u64,
    pub data_tempfail: u64,
    pub data_permfail: u64,
    pub conn_cap_421: u64,
    pub rate_421: u64,
    pub greylisted: u64,
    pub disconnects_in_data: u64,
    pub duplicates: u64,
    pub corrupt: u64,
    pub no_integrity: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.connections += o.connections;
        self.messages_accepted += o.messages_accepted;
        self.rcpts_accepted += o.rcpts_accepted;
        self.rcpt_tempfail += o.rcpt_tempfail;
        self.rcpt_permfail += o.rcpt_permfail;
        self.data_tempfail += o.data_tempfail;
        self.data_permfail += o.data_permfail;
        self.conn_cap_421 += o.conn_cap_421;
        self.rate_421 += o.rate_421;
        self.greylisted += o.greylisted;
        self.disconnects_in_data += o.disconnects_in_data;
        self.duplicates += o.duplicates;
        self.corrupt += o.corrupt;
        self.no_integrity += o.no_integrity;
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct DomainCounts {
    /// Recipients accepted (first time; duplicates are counted apart).
    pub accepted: u64,
    pub tempfail: u64,
    pub permfail: u64,
}

impl DomainCounts {
    /// Recipients at a final state: accepted, or refused permanently.
    pub fn terminal(&self) -> u64 {
        self.accepted + self.permfail
    }
}

/// Everything the sink has seen; what `summary` returns and the JSON it writes.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub uptime_s: f64,
    pub counts: Counts,
    /// Recipients that reached a final state at the sink: accepted once, or refused
    /// permanently. The bench waits for this to reach the campaign size.
    pub rcpts_terminal: u64,
    pub per_domain: BTreeMap<String, DomainCounts>,
    pub per_provider: BTreeMap<String, ProviderSummary>,
    pub connections_per_client_ip: BTreeMap<String, u64>,
    /// Recipients accepted in each second since start (index = second).
    pub accepted_per_second: Vec<u64>,
    /// Time from the latency origin (start, or `reset_latency_origin`) to acceptance, ms.
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderSummary {
    pub rcpts_accepted: u64,
    pub connections_max_concurrent: u32,
    /// Second by second since the sink started: what a shaping test measures.
    pub per_second: Vec<Second>,
}

/// One provider's second.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Second {
    /// Messages accepted (end of DATA / last BDAT), whatever their recipient count.
    pub messages: u64,
    /// Most connections open at once seen during the second.
    pub conns_max: u32,
    /// 421 replies for going over the per-IP rate or connection cap.
    pub throttled: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

struct ShardStats {
    counts: Counts,
    per_domain: HashMap<String, DomainCounts>,
    per_provider_accepted: Vec<u64>,
    per_ip: HashMap<IpAddr, u64>,
    per_second: Vec<u64>,
    latency: Histogram<u64>,
}

struct ProviderState {
    conns_now: AtomicU32,
    conns_max: AtomicU32,
    timeline: Mutex<Vec<Second>>,
    /// Per client IP: open connections, and a token bucket for the message rate.
    per_ip: Mutex<HashMap<IpAddr, IpState>>,
}

impl ProviderState {
    /// Updates this second's entry in the timeline.
    fn second(&self, started: Instant, f: impl FnOnce(&mut Second)) {
        let i = (started.elapsed().as_secs() as usize).min(PER_SECOND_MAX - 1);
        let mut t = self.timeline.lock().unwrap();
        if t.len() <= i {
            t.resize(i + 1, Second::default());
        }
        let s = &mut t[i];
        s.conns_max = s.conns_max.max(self.conns_now.load(Ordering::Relaxed));
        f(s);
    }
}

struct IpState {
    conns: u32,
    tokens: f64,
    refilled: Instant,
}

struct Shared {
    profile: Profile,
    server: ServerConfig,
    started: Instant,
    latency_origin: Mutex<Instant>,
    shards: Vec<Mutex<ShardStats>>,
    seen: Mutex<HashSet<u64>>,
    providers: Vec<ProviderState>,
    greylist: Mutex<HashMap<u64, Instant>>,
    keep: Option<PathBuf>,
    keep_seq: AtomicU64,
    tls: Option<monoio_rustls::TlsAcceptor>,
}

impl Sink {
    pub fn start(opts: SinkOptions) -> anyhow::Result<Sink> {
        anyhow::ensure!(opts.threads >= 1, "--threads must be at least 1");
        let tls = if opts.profile.sink.starttls {
            Some(tls_acceptor(
                &opts.profile.sink.hostname,
                opts.tls_files.as_ref(),
            )?)
        } else {
            None
        };
        if let Some(dir) = &opts.keep {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("--keep {}: {e}", dir.display()))?;
        }
        // Bind every address once per thread, here, so errors surface before any thread starts.
        let mut addrs = Vec::new();
        let mut per_thread: Vec<Vec<(usize, std::net::TcpListener)>> =
            (0..opts.threads).map(|_| Vec::new()).collect();
        // Port 0 means "any free port": the first one picked is then used for every
        // address, so a client needs one port number for all providers.
        let mut picked_port = None;
        for (pi, p) in opts.profile.providers.iter().enumerate() {
            let mut resolved = Vec::new();
            for a in &p.listen {
                let mut a = *a;
                if a.port() == 0 {
                    if let Some(port) = picked_port {
                        a.set_port(port);
                    }
                }
                // SO_REUSEPORT would silently share the port with another process (an old
                // sink still running): probe with a plain bind first.
                if a.port() != 0 {
                    if let Err(e) = std::net::TcpListener::bind(a) {
                        anyhow::bail!(
                            "provider {}: cannot listen on {a}: {e} (another sink still running?)",
                            p.name
                        );
                    }
                }
                let first = volley::deliver::runtime::bind_reuseport(a, 4096).map_err(|e| {
                    anyhow::anyhow!("provider {}: cannot listen on {a}: {e}", p.name)
                })?;
                let actual = first.local_addr()?;
                picked_port.get_or_insert(actual.port());
                resolved.push(actual);
                per_thread[0].push((pi, first));
                for t in per_thread.iter_mut().skip(1) {
                    t.push((pi, volley::deliver::runtime::bind_reuseport(actual, 4096)?));
                }
            }
            addrs.push(resolved);
        }
        let now = Instant::now();
        let shared = Arc::new(Shared {
            server: ServerConfig {
                hostname: opts.profile.sink.hostname.clone(),
                size_max: opts.profile.sink.size_max,
                offer_starttls: tls.is_some(),
                offer_pipelining: true,
                offer_chunking: true,
            },
            started: now,
            latency_origin: Mutex::new(now),
            shards: (0..opts.threads)
                .map(|_| {
                    Mutex::new(ShardStats {
                        counts: Counts::default(),
                        per_domain: HashMap::new(),
                        per_provider_accepted: vec![0; opts.profile.providers.len()],
                        per_ip: HashMap::new(),
                        per_second: Vec::new(),
                        latency: Histogram::new(3).expect("3 significant digits is valid"),
                    })
                })
                .collect(),
            seen: Mutex::new(HashSet::new()),
            providers: opts
                .profile
                .providers
                .iter()
                .map(|_| ProviderState {
                    conns_now: AtomicU32::new(0),
                    conns_max: AtomicU32::new(0),
                    timeline: Mutex::new(Vec::new()),
                    per_ip: Mutex::new(HashMap::new()),
                })
                .collect(),
            greylist: Mutex::new(HashMap::new()),
            keep: opts.keep,
            keep_seq: AtomicU64::new(0),
            tls,
            profile: opts.profile,
        });
        for (shard, listeners) in per_thread.into_iter().enumerate() {
            let sh = shared.clone();
            let driver = opts.driver;
            std::thread::Builder::new()
                .name(format!("sink-{shard}"))
                .spawn(move || {
                    let run = async move {
                        let mut tasks = Vec::new();
                        for (pi, l) in listeners {
                            let l = monoio::net::TcpListener::from_std(l)
                                .expect("listener registers with the runtime");
                            tasks.push(monoio::spawn(accept_loop(sh.clone(), shard, pi, l)));
                        }
                        for t in tasks {
                            t.await;
                        }
                    };
                    if let Err(e) = volley::deliver::runtime::block_on(driver, run) {
                        eprintln!("volley-load sink: thread {shard} cannot start its runtime: {e}");
                    }
                })?;
        }
        Ok(Sink { shared, addrs })
    }

    /// The port every provider listens on (the first address's).
    pub fn port(&self) -> u16 {
        self.addrs[0][0].port()
    }

    /// The first address of a provider, by name.
    pub fn addr_of(&self, provider: &str) -> Option<SocketAddr> {
        let i = self
            .shared
            .profile
            .providers
            .iter()
            .position(|p| p.name == provider)?;
        self.addrs[i].first().copied()
    }

    pub fn profile(&self) -> &Profile {
        &self.shared.profile
    }

    /// Latency percentiles are measured from now on (the bench calls this when the
    /// system under test starts).
    pub fn reset_latency_origin(&self) {
        *self.shared.latency_origin.lock().unwrap() = Instant::now();
        for s in &self.shared.shards {
            s.lock().unwrap().latency.reset();
        }
    }

    /// Recipients at a final state so far (accepted, or refused permanently): what a
    /// bench polls for, without building the whole summary (which copies every
    /// domain's counts while holding the locks the connections need).
    pub fn rcpts_terminal(&self) -> u64 {
        self.shared
            .shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                s.per_domain
                    .values()
                    .map(DomainCounts::terminal)
                    .sum::<u64>()
            })
            .sum()
    }

    pub fn summary(&self) -> Summary {
        let sh = &self.shared;
        let mut counts = Counts::default();
        let mut per_domain: BTreeMap<String, DomainCounts> = BTreeMap::new();
        let mut per_ip: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_second: Vec<u64> = Vec::new();
        let mut per_provider: BTreeMap<String, ProviderSummary> = BTreeMap::new();
        let mut latency = Histogram::<u64>::new(3).expect("valid");
        for s in &sh.shards {
            let s = s.lock().unwrap();
            counts.add(&s.counts);
            for (d, c) in &s.per_domain {
                let e = per_domain.entry(d.clone()).or_default();
                e.accepted += c.accepted;
                e.tempfail += c.tempfail;
                e.permfail += c.permfail;
            }
            for (ip, n) in &s.per_ip {
                *per_ip.entry(ip.to_string()).or_default() += n;
            }
            if per_second.len() < s.per_second.len() {
                per_second.resize(s.per_second.len(), 0);
            }
            for (i, n) in s.per_second.iter().enumerate() {
                per_second[i] += n;
            }
            for (i, p) in sh.profile.providers.iter().enumerate() {
                per_provider
                    .entry(p.name.clone())
                    .or_default()
                    .rcpts_accepted += s.per_provider_accepted[i];
            }
            latency.add(&s.latency).expect("same bounds");
        }
        for (i, p) in sh.profile.providers.iter().enumerate() {
            let e = per_provider.entry(p.name.clone()).or_default();
            e.connections_max_concurrent = sh.providers[i].conns_max.load(Ordering::Relaxed);
            e.per_second = sh.providers[i].timeline.lock().unwrap().clone();
        }
        let rcpts_terminal = per_domain.values().map(DomainCounts::terminal).sum();
        Summary {
            uptime_s: sh.started.elapsed().as_secs_f64(),
            counts,
            rcpts_terminal,
            per_domain,
            per_provider,
            connections_per_client_ip: per_ip,
            accepted_per_second: per_second,
            latency_ms: Percentiles::of(&latency),
        }
    }
}

fn tls_acceptor(
    hostname: &str,
    files: Option<&(PathBuf, PathBuf)>,
) -> anyhow::Result<monoio_rustls::TlsAcceptor> {
    let files = files.map(|(c, k)| (c.as_path(), k.as_path()));
    Ok(monoio_rustls::TlsAcceptor::from(
        volley::deliver::tls::server_config(hostname, files)?,
    ))
}

async fn accept_loop(sh: Arc<Shared>, shard: usize, provider: usize, l: monoio::net::TcpListener) {
    loop {
        match l.accept().await {
            Ok((stream, peer)) => {
                monoio::spawn(connection(sh.clone(), shard, provider, stream, peer.ip()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("volley-load sink: accept: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Decrements the provider's and the client IP's connection counts when dropped.
struct ConnGuard<'a> {
    ps: &'a ProviderState,
    ip: IpAddr,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.ps.conns_now.fetch_sub(1, Ordering::Relaxed);
        if let Some(s) = self.ps.per_ip.lock().unwrap().get_mut(&self.ip) {
            s.conns -= 1;
        }
    }
}

async fn connection(
    sh: Arc<Shared>,
    shard: usize,
    provider: usize,
    mut stream: monoio::net::TcpStream,
    ip: IpAddr,
) {
    let _ = stream.set_nodelay(true);
    let ps = &sh.providers[provider];
    let p = &sh.profile.providers[provider];
    let now = ps.conns_now.fetch_add(1, Ordering::Relaxed) + 1;
    ps.conns_max.fetch_max(now, Ordering::Relaxed);
    ps.second(sh.started, |_| {});
    let per_ip_conns = {
        let mut m = ps.per_ip.lock().unwrap();
        let s = m.entry(ip).or_insert(IpState {
            conns: 0,
            tokens: p.behaviour.rate_per_s_per_ip,
            refilled: Instant::now(),
        });
        s.conns += 1;
        s.conns
    };
    let _guard = ConnGuard { ps, ip };
    {
        let mut st = sh.shards[shard].lock().unwrap();
        st.counts.connections += 1;
        *st.per_ip.entry(ip).or_default() += 1;
    }
    let mut b = Conn {
        sh: &sh,
        shard,
        provider,
        p,
        ip,
        rng: fastrand::Rng::new(),
    };
    let cap = p.behaviour.max_conns_per_ip;
    if cap > 0 && per_ip_conns > cap {
        sh.shards[shard].lock().unwrap().counts.conn_cap_421 += 1;
        ps.second(sh.started, |s| s.throttled += 1);
        let _ = stream
            .write_all(format!("{}\r\n", p.behaviour.conn_cap_reply).into_bytes())
            .await;
        return;
    }
    let delay = b.uniform(p.behaviour.latency_ms.greeting);
    if delay > 0 {
        monoio::time::sleep(Duration::from_millis(delay)).await;
    }
    let idle = Duration::from_secs(sh.profile.sink.timeout_s_idle);
    let mut session = ServerSession::new(&sh.server);
    let (res, _) = stream.write_all(session.greeting()).await;
    if res.is_err() {
        return;
    }
    match serve(&mut stream, &mut session, &mut b, idle).await {
        Next::StartTls => {}
        Next::Close => return,
    }
    let Some(acceptor) = &sh.tls else { return };
    let Ok(mut tls) = acceptor.accept(stream).await else {
        return;
    };
    session.tls_started();
    let _ = serve(&mut tls, &mut session, &mut b, idle).await;
}

enum Next {
    Close,
    StartTls,
}

async fn serve<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    session: &mut ServerSession<'_>,
    b: &mut Conn<'_>,
    idle: Duration,
) -> Next {
    let mut buf = Vec::with_capacity(READ_BUF_BYTES);
    loop {
        let read = monoio::time::timeout(idle, stream.read(buf)).await;
        let (res, back) = match read {
            Ok(r) => r,
            Err(_) => {
                let _ = stream
                    .write_all(b"421 4.4.2 Idle timeout, closing\r\n".to_vec())
                    .await;
                return Next::Close;
            }
        };
        buf = back;
        match res {
            Ok(0) | Err(_) => return Next::Close,
            Ok(_) => {}
        }
        let out = session.feed(&buf, b);
        if out.delay_ms > 0 {
            monoio::time::sleep(Duration::from_millis(out.delay_ms)).await;
        }
        if !out.write.is_empty() {
            let (res, _) = stream.write_all(out.write).await;
            if res.is_err() {
                return Next::Close;
            }
        }
        if out.close || session.is_closed() {
            return Next::Close;
        }
        if out.start_tls {
            return Next::StartTls;
        }
        buf.clear();
    }
}

/// One connection's view of the profile: the [`Behaviour`] the session asks.
struct Conn<'a> {
    sh: &'a Shared,
    shard: usize,
    provider: usize,
    p: &'a Provider,
    ip: IpAddr,
    rng: fastrand::Rng,
}

impl Conn<'_> {
    fn uniform(&mut self, [lo, hi]: [u64; 2]) -> u64 {
        if hi == 0 {
            0
        } else {
            self.rng.u64(lo..=hi)
        }
    }

    fn pick(&mut self, replies: &[String], rcpt: &str) -> String {
        let r = &replies[self.rng.usize(..replies.len())];
        r.replace("{rcpt}", rcpt)
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, ShardStats> {
        self.sh.shards[self.shard].lock().unwrap()
    }

    fn count_domain(&self, rcpt: &str, f: impl Fn(&mut DomainCounts)) {
        let domain = rcpt
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let mut st = self.stats();
        f(st.per_domain.entry(domain).or_default());
    }

    /// Takes one message token from the client IP's bucket; false when over the rate.
    fn rate_ok(&self) -> bool {
        let rate = self.p.behaviour.rate_per_s_per_ip;
        if rate <= 0.0 {
            return true;
        }
        let mut m = self.sh.providers[self.provider].per_ip.lock().unwrap();
        let s = m.get_mut(&self.ip).expect("inserted at connect");
        let now = Instant::now();
        // One second of burst: enough for pipelining, small enough to show the limit.
        s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(rate);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Behaviour for Conn<'_> {
    fn mail_from(&mut self, _from: &str) -> Verdict {
        if !self.rate_ok() {
            self.stats().counts.rate_421 += 1;
            self.sh.providers[self.provider].second(self.sh.started, |s| s.throttled += 1);
            return Verdict::ReplyAndClose(self.p.behaviour.rate_reply.clone());
        }
        Verdict::Accept
    }

    fn rcpt(&mut self, from: &str, rcpt: &str) -> Verdict {
        let b = &self.p.behaviour;
        let local = rcpt
            .rsplit_once('@')
            .map_or(rcpt, |(l, _)| l)
            .to_ascii_lowercase();
        let temp = if local.starts_with("tempfail") {
            true
        } else if local.starts_with("permfail") {
            false
        } else {
            if b.greylist_s > 0 {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (self.ip, from, rcpt).hash(&mut h);
                let key = h.finish();
                let now = Instant::now();
                let first = *self.sh.greylist.lock().unwrap().entry(key).or_insert(now);
                if now.duration_since(first) < Duration::from_secs(b.greylist_s) {
                    self.stats().counts.greylisted += 1;
                    self.count_domain(rcpt, |d| d.tempfail += 1);
                    return Verdict::Reply(format!(
                        "451 4.7.1 <{rcpt}>: Greylisted, try again in {} seconds",
                        b.greylist_s
                    ));
                }
            }
            let r = self.rng.f64();
            if r < b.rcpt_permfail {
                false
            } else if r < b.rcpt_permfail + b.rcpt_tempfail {
                true
            } else {
                return Verdict::Accept;
            }
        };
        let reply = if temp {
            self.stats().counts.rcpt_tempfail += 1;
            self.count_domain(rcpt, |d| d.tempfail += 1);
            self.pick(&b.rcpt_tempfail_replies, rcpt)
        } else {
            self.stats().counts.rcpt_permfail += 1;
            self.count_domain(rcpt, |d| d.permfail += 1);
            self.pick(&b.rcpt_permfail_replies, rcpt)
        };
        // A 421 closes the session, as the real ones do.
        if reply.starts_with("421") {
            Verdict::ReplyAndClose(reply)
        } else {
            Verdict::Reply(reply)
        }
    }

    fn data_start(&mut self) -> Verdict {
        if self.rng.f64() < self.p.behaviour.disconnect_in_data {
            self.stats().counts.disconnects_in_data += 1;
            return Verdict::Disconnect;
        }
        Verdict::Accept
    }

    fn message(&mut self, msg: &Message<'_>) -> Verdict {
        let b = &self.p.behaviour;
        let r = self.rng.f64();
        let first = msg.rcpts.first().map_or("", String::as_str);
        if r < b.data_permfail {
            self.stats().counts.data_permfail += 1;
            for rc in msg.rcpts {
                self.count_domain(rc, |d| d.permfail += 1);
            }
            return Verdict::Reply(self.pick(&b.data_permfail_replies, first));
        }
        if r < b.data_permfail + b.data_tempfail {
            self.stats().counts.data_tempfail += 1;
            for rc in msg.rcpts {
                self.count_domain(rc, |d| d.tempfail += 1);
            }
            let reply = self.pick(&b.data_tempfail_replies, first);
            return if reply.starts_with("421") {
                Verdict::ReplyAndClose(reply)
            } else {
                Verdict::Reply(reply)
            };
        }
        let content = msg.content();
        let inspected = integrity::inspect(&content);
        // Duplicates are per (Message-ID, recipient): one message may carry several.
        let mut fresh = Vec::with_capacity(msg.rcpts.len());
        if let Some(id) = inspected.message_id {
            let mut seen = self.sh.seen.lock().unwrap();
            for rc in msg.rcpts {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (id, rc.to_ascii_lowercase()).hash(&mut h);
                fresh.push(seen.insert(h.finish()));
            }
        } else {
            fresh.resize(msg.rcpts.len(), true);
        }
        self.sh.providers[self.provider].second(self.sh.started, |s| s.messages += 1);
        let now = Instant::now();
        let since_origin = now
            .duration_since(*self.sh.latency_origin.lock().unwrap())
            .as_millis() as u64;
        let second =
            (now.duration_since(self.sh.started).as_secs() as usize).min(PER_SECOND_MAX - 1);
        {
            let mut st = self.stats();
            st.counts.messages_accepted += 1;
            match inspected.check {
                Check::Ok => {}
                Check::Missing => st.counts.no_integrity += 1,
                Check::Mismatch => st.counts.corrupt += 1,
            }
            if st.per_second.len() <= second {
                st.per_second.resize(second + 1, 0);
            }
            for (rc, fresh) in msg.rcpts.iter().zip(&fresh) {
                if !fresh {
                    st.counts.duplicates += 1;
                    continue;
                }
                st.counts.rcpts_accepted += 1;
                st.per_second[second] += 1;
                st.per_provider_accepted[self.provider] += 1;
                let _ = st.latency.record(since_origin);
                let domain = rc
                    .rsplit_once('@')
                    .map_or("", |(_, d)| d)
                    .to_ascii_lowercase();
                st.per_domain.entry(domain).or_default().accepted += 1;
            }
        }
        if let Some(dir) = &self.sh.keep {
            let n = self.sh.keep_seq.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{n:08}.eml"));
            if let Err(e) = std::fs::write(&path, &*content) {
                eprintln!("volley-load sink: --keep {}: {e}", path.display());
            }
        }
        Verdict::Accept
    }

    fn delay_ms(&mut self, cmd: Command) -> u64 {
        let l = self.p.behaviour.latency_ms;
        let range = match cmd {
            Command::Ehlo => l.ehlo,
            Command::Mail => l.mail,
            Command::Rcpt => l.rcpt,
            Command::Data => l.data,
            Command::DataEnd => l.data_end,
            Command::Other => [0, 0],
        };
        self.uniform(range)
    }
}
