//! Run-time control over the admin socket (`SPOOL/admin.sock`): pause, resume or
//! re-rate a domain, provider, campaign or source address without a restart, and
//! purge a campaign's or a domain's queued recipients.
//!
//! The protocol is one line in, one line out: `pause gmail.com`, `resume
//! provider:google`, `rate campaign:spring 50/s`, `rate source:10.0.0.5 unlimited`,
//! `purge campaign:spring list bought by mistake`, `status`. Each shard applies a
//! command on its next tick (100 ms), so it takes effect within a second; rates are
//! totals, split over the shards like the rules'. A purge is answered with every
//! shard's counts (each shard sends them back on a bounded channel), waiting at most
//! `PURGE_ANSWER_WAIT`.
//!
//! Who may use it: root, the user volley runs as and the members of `admin_group`
//! (host/peers.rs). The socket is 0600 (0660 with the group), and each connection's
//! peer is checked (SO_PEERCRED) before a byte of it is read.

use crate::host::peers::{self, AdminAccess, Peer};
use crate::policy::shaping::rules::{parse_per, Per};
use crossbeam_channel::Sender;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a command applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Domain(String),
    Campaign(String),
    /// `provider:NAME` or `site:MX,MX`: a destination limiter's key.
    Destination(String),
    Source(IpAddr),
}

impl Target {
    /// The limiter key this target names, or the prefix of the keys it names.
    pub fn key(&self) -> String {
        match self {
            Target::Domain(d) => format!("domain:{d}"),
            Target::Campaign(c) => format!("campaign:{c}"),
            Target::Destination(k) => k.clone(),
            Target::Source(ip) => format!("source:{ip}"),
        }
    }

    /// Whether the limiter `key` is this target's (a source's keys are `source:IP>dest`).
    pub fn matches(&self, key: &str) -> bool {
        let k = self.key();
        key == k
            || key
                .strip_prefix(&k)
                .is_some_and(|rest| rest.starts_with('>'))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Pause,
    Resume,
    /// A new total rate; None is `unlimited`: no rate at all, whatever the rules or
    /// the campaign set, until the run ends or another `rate` replaces it.
    Rate(Option<Per>),
    /// Between shards, not from the socket: another shard backed this key off.
    PeerThrottled(String),
    /// Bounce every queued recipient of a campaign or domain (PowerMTA's `delete`,
    /// KumoMTA's admin bounce); see `Shard::purge`.
    Purge(Purge),
    /// Where one recipient waits (`volley track`); the target is its domain.
    Track(Track),
}

/// A question about one recipient, as it travels to the shards: each answers with
/// what it holds of it (deliver/shard/track.rs).
#[derive(Debug, Clone)]
pub struct Track {
    /// The address, lowercase.
    pub rcpt: String,
    /// Only this campaign's.
    pub campaign: Option<String>,
    /// Where each shard sends its answer; set by the admin socket.
    pub answer: Option<Sender<Vec<crate::spool::peek::Queued>>>,
}

/// The same question, whatever channel it is answered on.
impl PartialEq for Track {
    fn eq(&self, other: &Track) -> bool {
        (&self.rcpt, &self.campaign) == (&other.rcpt, &other.campaign)
    }
}

/// How long the admin socket waits for every shard's answer to `track` (each
/// answers on its next tick, 100 ms).
pub const TRACK_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The admin socket's answer to `track`, after `ok: ` on one line as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackAnswer {
    /// Shards asked and shards that answered within [`TRACK_ANSWER_WAIT`].
    pub shards: usize,
    pub answered: usize,
    pub queued: Vec<crate::spool::peek::Queued>,
}

/// An operator's purge, as it travels to the shards.
#[derive(Debug, Clone)]
pub struct Purge {
    /// The operator's words, logged with every recipient purged; at most
    /// `PURGE_REASON_OCTETS_MAX`, printable, one line.
    pub reason: String,
    /// Where each shard sends its counts; set by the admin socket (a parsed
    /// command has none).
    pub answer: Option<Sender<Purged>>,
}

/// Two purges are the same command when they say the same: the answer channel is
/// how the counts come back, not part of what was asked.
impl PartialEq for Purge {
    fn eq(&self, other: &Purge) -> bool {
        self.reason == other.reason
    }
}

/// One shard's answer to a purge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Recipients bounced now: in site queues, the retry wheel, held by a pause,
    /// waiting on DNS.
    pub purged: u64,
    /// Recipients of the target in a transaction at that moment: delivered or
    /// bounced by the receiver as it answers, or, if it defers them, bounced by the
    /// purge as they come back.
    pub in_flight: u64,
}

/// Longest reason a purge takes, in octets: it is repeated in the log line of
/// every recipient purged.
pub const PURGE_REASON_OCTETS_MAX: usize = 256;

/// How long the admin socket waits for every shard's purge counts. A shard
/// answers on its next tick (100 ms) once it has bounced and committed what it
/// holds; a million queued recipients take a few seconds. Past it the answer says
/// which shards are missing from the counts (the purge still applies there).
pub const PURGE_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// The reason logged when the operator gives none.
pub const PURGE_REASON_DEFAULT: &str = "no reason given";

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub action: Action,
    pub target: Target,
}

pub const USAGE: &str =
    "commands: pause TARGET | resume TARGET | rate TARGET N/s|unlimited | purge campaign:ID|DOMAIN [REASON] | track ADDRESS [CAMPAIGN] | status; \
TARGET: a domain (gmail.com or domain:gmail.com), provider:NAME, site:MX, campaign:ID or source:IP";

/// Parses one command line; `Ok(None)` is `status`.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let target = |w: &str| -> Result<Target, String> {
        let t = if let Some(p) = w.strip_prefix("provider:") {
            Target::Destination(format!("provider:{p}"))
        } else if w.starts_with("site:") {
            Target::Destination(w.to_string())
        } else if let Some(c) = w.strip_prefix("campaign:") {
            Target::Campaign(c.to_string())
        } else if let Some(d) = w.strip_prefix("domain:") {
            Target::Domain(d.trim_end_matches('.').to_ascii_lowercase())
        } else if let Some(ip) = w.strip_prefix("source:") {
            Target::Source(
                ip.parse()
                    .map_err(|_| format!("`{ip}` is not an IP address"))?,
            )
        } else if w.contains('.') && !w.contains(':') {
            Target::Domain(w.trim_end_matches('.').to_ascii_lowercase())
        } else {
            return Err(format!("`{w}` is not a target; {USAGE}"));
        };
        if t.key().ends_with(':') {
            return Err(format!("`{w}` names nothing; {USAGE}"));
        }
        Ok(t)
    };
    match words.as_slice() {
        ["status"] => Ok(None),
        ["pause", t] => Ok(Some(Command {
            action: Action::Pause,
            target: target(t)?,
        })),
        ["resume", t] => Ok(Some(Command {
            action: Action::Resume,
            target: target(t)?,
        })),
        ["rate", t, r] => {
            let rate = match *r {
                "unlimited" | "none" => None,
                r => Some(parse_per(r)?),
            };
            Ok(Some(Command {
                action: Action::Rate(rate),
                target: target(t)?,
            }))
        }
        ["purge", t, reason @ ..] => {
            let target = target(t)?;
            if !matches!(target, Target::Domain(_) | Target::Campaign(_)) {
                return Err(format!(
                    "`{t}`: purge takes campaign:ID or a domain (gmail.com, domain:gmail.com); \
                     to stop a provider, site or source, pause it"
                ));
            }
            Ok(Some(Command {
                action: Action::Purge(Purge {
                    reason: purge_reason(reason)?,
                    answer: None,
                }),
                target,
            }))
        }
        ["track", rcpt, campaign @ ..] if campaign.len() <= 1 => {
            let Some((_, domain)) = rcpt
                .rsplit_once('@')
                .filter(|(l, d)| !l.is_empty() && !d.is_empty())
            else {
                return Err(format!(
                    "`{rcpt}` is not an address (local@domain); track takes one recipient"
                ));
            };
            Ok(Some(Command {
                action: Action::Track(Track {
                    rcpt: rcpt.to_lowercase(),
                    campaign: campaign.first().map(|c| c.to_string()),
                    answer: None,
                }),
                target: Target::Domain(domain.trim_end_matches('.').to_ascii_lowercase()),
            }))
        }
        _ => Err(format!("`{line}` is not a command; {USAGE}")),
    }
}

/// The reason words of a purge, checked: one line of printable text within
/// `PURGE_REASON_OCTETS_MAX`.
fn purge_reason(words: &[&str]) -> Result<String, String> {
    let reason = words.join(" ");
    if reason.is_empty() {
        return Ok(PURGE_REASON_DEFAULT.to_string());
    }
    if reason.len() > PURGE_REASON_OCTETS_MAX {
        return Err(format!(
            "the purge reason is {} octets, over the {PURGE_REASON_OCTETS_MAX}-octet limit; shorten it",
            reason.len()
        ));
    }
    if reason.chars().any(is_unprintable) {
        return Err(
            "the purge reason has a control or direction-changing character; use plain text".into(),
        );
    }
    Ok(reason)
}

/// Control characters, and the bidirectional formatting ones (U+202A..U+202E,
/// U+2066..U+2069) that make a log line read differently from what it holds.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// Checks one operator-given word of a command line (a target): the socket's line is
/// split at whitespace, so a target with a space would make its tail a reason or a
/// rate. Errors: whitespace or a control character, with what to do.
pub fn check_word(what: &str, w: &str) -> Result<(), String> {
    if w.is_empty() || w.chars().any(|c| c.is_whitespace() || is_unprintable(c)) {
        return Err(format!(
            "{what} {w:?} has a space or a control character; a target is one word: a domain, provider:NAME, site:MX, campaign:ID or source:IP"
        ));
    }
    Ok(())
}

/// `inject DIR`: queue the campaign at DIR (`volley serve` only, its `Extra`).
pub const INJECT: &str = "inject ";
/// `inject-new DIR`: queue it again as a new instance (`volley serve` only).
pub const INJECT_NEW: &str = "inject-new ";
/// `progress N`: campaign instance N's counts (`volley serve` only).
pub const PROGRESS: &str = "progress ";
/// The admin commands only `volley serve` answers.
const SERVE_ONLY: [&str; 3] = [INJECT, INJECT_NEW, PROGRESS];

pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("admin.sock")
}

/// The live status every shard publishes: its queue, and one line per key that is
/// not running at its configured limits; and the service's own lines (`volley
/// serve`'s disk budget), shown first.
#[derive(Default)]
pub struct Status {
    pub per_shard: Mutex<Vec<Vec<String>>>,
    pub service: Mutex<Vec<String>>,
}

impl Status {
    pub fn lines(&self) -> Vec<String> {
        let mut out = self.service.lock().expect("status lock").clone();
        out.extend(
            self.per_shard
                .lock()
                .expect("status lock")
                .iter()
                .enumerate()
                .flat_map(|(i, v)| v.iter().map(move |l| format!("shard {i}: {l}"))),
        );
        out
    }
}

/// A handler for admin commands beyond the shards' own: `Some(answer)` if it
/// knows the line (`volley serve`'s `inject DIR`, `progress N`), given who asked.
pub type Extra = Arc<dyn Fn(&str, &peers::Peer) -> Option<String> + Send + Sync>;

/// How long a reply may take to write before the connection is dropped (a client
/// that never reads must not hold a slot).
pub const ADMIN_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One of the [`ADMIN_CONNECTIONS_MAX`] connection slots, given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    fn take(busy: &Arc<std::sync::atomic::AtomicUsize>) -> Option<Slot> {
        if busy.fetch_add(1, Ordering::AcqRel) >= ADMIN_CONNECTIONS_MAX {
            busy.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(busy.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admin connections answered at once, each on its own thread (an `inject` waits
/// until its campaign is durable; a client may connect and say nothing for the 5 s
/// read limit). Past it, a connection is told to try again and closed.
pub const ADMIN_CONNECTIONS_MAX: usize = 16;

/// Commands waiting for one shard (it takes them every tick): operators' commands
/// and other shards' back-off signals.
pub const COMMANDS_QUEUED_MAX: usize = 1024;

/// Refusals of peers not allowed on the admin socket that get their own stderr line
/// per minute; past it they are counted, and the first one of the next minute says
/// how many were not logged, so a flood of refused connections cannot flood the log.
pub const REFUSALS_LOGGED_PER_MIN: u32 = 10;

/// The stderr lines of refused peers, at most [`REFUSALS_LOGGED_PER_MIN`] a minute.
struct RefusalLog {
    minute_start: Instant,
    logged: u32,
    unlogged: u64,
}

impl RefusalLog {
    fn new() -> RefusalLog {
        RefusalLog {
            minute_start: Instant::now(),
            logged: 0,
            unlogged: 0,
        }
    }

    /// The line to log for a refusal of `peer` at `now`, if it is within the limit.
    fn line(&mut self, peer: &Peer, now: Instant) -> Option<String> {
        let mut before = String::new();
        if now.duration_since(self.minute_start) >= Duration::from_secs(60) {
            if self.unlogged > 0 {
                before = format!(
                    " ({} more refused in the minute before, not logged: over {REFUSALS_LOGGED_PER_MIN} a minute)",
                    self.unlogged
                );
            }
            *self = RefusalLog {
                minute_start: now,
                logged: 0,
                unlogged: 0,
            };
        }
        if self.logged >= REFUSALS_LOGGED_PER_MIN {
            self.unlogged += 1;
            return None;
        }
        self.logged += 1;
        Some(format!(
            "volley: admin socket: refused {} (pid {}): not root, the user volley runs as, nor in admin_group{before}",
            crate::host::accounts::describe_user(peer.uid),
            peer.pid
        ))
    }
}

/// Serves the admin socket until `stop`; commands go to every shard, or to `extra`
/// first when given. The socket gets its modes from `access` (0600, or 0660 and the
/// admin group) before the first connection is taken, and each peer `access` does
/// not allow gets one `error:` line and nothing it sent is read.
pub fn serve(
    path: PathBuf,
    access: AdminAccess,
    shards: Vec<Sender<Command>>,
    status: Arc<Status>,
    stop: Arc<AtomicBool>,
    extra: Option<Extra>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // A socket left by a process that is gone (the spool lock says none is running).
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("admin socket {}: {e}", path.display()))
    })?;
    // Between bind and here the socket has the umask's mode (0700 under volley's
    // 077); a peer that connected in that moment still meets the check below.
    access.set_modes(&path).map_err(|e| {
        let _ = std::fs::remove_file(&path);
        std::io::Error::new(e.kind(), format!("admin socket {}: {e}", path.display()))
    })?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let mut refusals = RefusalLog::new();
            let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_write_timeout(Some(ADMIN_WRITE_TIMEOUT));
                        let Some(slot) = Slot::take(&busy) else {
                            // Not waited on: the accept thread never blocks on a peer.
                            let _ = conn.set_nonblocking(true);
                            let _ = (&conn).write_all(format!("error: the admin socket is answering {ADMIN_CONNECTIONS_MAX} connections already (ADMIN_CONNECTIONS_MAX); try again\n").as_bytes());
                            continue;
                        };
                        let job: Box<dyn FnOnce() + Send> = match peers::peer_of(&conn) {
                            Ok(peer) if access.allows(&peer) => {
                                let (shards, status, extra) =
                                    (shards.clone(), status.clone(), extra.clone());
                                Box::new(move || {
                                    let _ = answer(conn, &peer, &shards, &status, extra.as_ref());
                                })
                            }
                            Ok(peer) => {
                                if let Some(line) = refusals.line(&peer, Instant::now()) {
                                    eprintln!("{line}");
                                }
                                let why = access.refusal(&peer);
                                Box::new(move || refuse(&conn, &why))
                            }
                            Err(e) => {
                                eprintln!("volley: admin socket: peer credentials: {e}");
                                continue;
                            }
                        };
                        let spawned = std::thread::Builder::new()
                            .name("admin-conn".into())
                            .spawn(move || {
                                // Given back however the job ends, a panic included.
                                let _slot = slot;
                                job();
                            });
                        if let Err(e) = spawned {
                            eprintln!("volley: admin socket: no thread for a connection: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        eprintln!("volley: admin socket: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })
}

/// Most a refused peer is waited for: its command line is read (and dropped) so that
/// closing does not reset the connection before it has read the refusal.
const REFUSED_DRAIN_MAX: Duration = Duration::from_secs(1);

/// Answers a peer that may not use the socket: one `error:` line; what it sent is
/// read to its end (at most 4 KiB, [`REFUSED_DRAIN_MAX`]) and dropped unparsed.
fn refuse(conn: &UnixStream, why: &str) {
    let _ = conn.set_nonblocking(false);
    let mut conn = conn;
    let _ = conn.write_all(format!("error: {why}\n").as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(REFUSED_DRAIN_MAX));
    let _ = std::io::copy(&mut conn.take(4096), &mut std::io::sink());
}

fn answer(
    conn: UnixStream,
    peer: &peers::Peer,
    shards: &[Sender<Command>],
    status: &Status,
    extra: Option<&Extra>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut octets = Vec::new();
    // One line of at most 4 KiB: a command, not a stream. Not UTF-8: answered as the
    // unknown command it is, not dropped.
    BufReader::new((&conn).take(4096)).read_until(b'\n', &mut octets)?;
    let line = String::from_utf8_lossy(&octets);
    if let Some(reply) = extra.and_then(|x| x(line.trim(), peer)) {
        return (&conn).write_all(format!("{reply}\n").as_bytes());
    }
    // Without `extra` this is a run that is not `volley serve` (a `volley send`, the
    // demo): a second `send` on its spool hands its campaign over here, and must hear
    // who holds the spool, not "not a command".
    if extra.is_none() && SERVE_ONLY.iter().any(|w| line.trim().starts_with(w)) {
        let reply = format!(
            "error: this spool is in use by volley process {} (a `volley send`, not a `volley serve`), \
             which takes no other campaign; wait for it to end, or use another --spool",
            std::process::id()
        );
        return (&conn).write_all(format!("{reply}\n").as_bytes());
    }
    let reply = match parse(line.trim()) {
        Ok(None) => {
            let lines = status.lines();
            if lines.is_empty() {
                "ok: every destination at its configured limits".to_string()
            } else {
                format!("ok:\n{}", lines.join("\n"))
            }
        }
        Ok(Some(cmd)) => dispatch(cmd, line.trim(), shards, PURGE_ANSWER_WAIT),
        Err(e) => format!("error: {e}"),
    };
    (&conn).write_all(format!("{reply}\n").as_bytes())
}

/// Sends `cmd` to every shard; the answer line. A purge waits for every shard's
/// counts (at most `wait`, `PURGE_ANSWER_WAIT` on the socket) and sums them.
fn dispatch(mut cmd: Command, line: &str, shards: &[Sender<Command>], wait: Duration) -> String {
    if let Action::Track(t) = &mut cmd.action {
        let (tx, rx) = crossbeam_channel::bounded(shards.len());
        t.answer = Some(tx);
        let answer = ask_track(cmd, shards, rx, TRACK_ANSWER_WAIT.min(wait));
        return format!(
            "ok: {}",
            serde_json::to_string(&answer).expect("serialising to memory does not fail")
        );
    }
    let answers = match &mut cmd.action {
        Action::Purge(p) => {
            // Room for every shard's answer: a shard never waits to send it.
            let (tx, rx) = crossbeam_channel::bounded(shards.len());
            p.answer = Some(tx);
            Some(rx)
        }
        _ => None,
    };
    let taken = shards
        .iter()
        .filter(|s| s.send_timeout(cmd.clone(), Duration::from_secs(1)).is_ok())
        .count();
    if taken < shards.len() {
        return format!(
            "error: {line} reached {taken} of {} shards (the others' command queues are full, {COMMANDS_QUEUED_MAX} each); send it again",
            shards.len()
        );
    }
    let Some(rx) = answers else {
        return format!("ok: {line} applied on {} shards", shards.len());
    };
    let target = cmd.target.key();
    // Our own copy of the answer channel goes: a shard that drops the command (it
    // stopped) then closes it, and the wait ends rather than running out.
    drop(cmd);
    let deadline = Instant::now() + wait;
    let mut sum = Purged::default();
    let mut answered = 0;
    while answered < taken {
        match rx.recv_deadline(deadline) {
            Ok(p) => {
                sum.purged += p.purged;
                sum.in_flight += p.in_flight;
                answered += 1;
            }
            Err(_) => break,
        }
    }
    let missing = match taken - answered {
        0 => String::new(),
        n => format!(
            "; {n} shard(s) did not answer (stopping, or not within {} ms) and are not in these counts (the purge applies there all the same; see the accounting log)",
            wait.as_millis()
        ),
    };
    // A typo purges nothing and must not read like a purge that worked.
    let nothing = match (sum.purged + sum.in_flight, answered == taken) {
        (0, true) => format!(
            "; nothing of {target} is queued here: check the campaign id or domain (`volley queue status`, `volley report`)"
        ),
        _ => String::new(),
    };
    format!(
        "ok: {} purged: {} recipients bounced, {} in flight (bounced if they are deferred) on {answered} of {} shards{missing}{nothing}",
        target,
        sum.purged,
        sum.in_flight,
        shards.len()
    )
}

/// Sends a `track` question to every shard and gathers their answers until `wait`.
fn ask_track(
    cmd: Command,
    shards: &[Sender<Command>],
    rx: crossbeam_channel::Receiver<Vec<crate::spool::peek::Queued>>,
    wait: Duration,
) -> TrackAnswer {
    let asked = shards
        .iter()
        .filter(|s| s.send_timeout(cmd.clone(), Duration::from_secs(1)).is_ok())
        .count();
    // As for a purge: a shard that drops the question closes the channel.
    drop(cmd);
    let deadline = Instant::now() + wait;
    let mut out = TrackAnswer {
        shards: shards.len(),
        answered: 0,
        queued: Vec::new(),
    };
    while out.answered < asked {
        match rx.recv_deadline(deadline) {
            Ok(q) => {
                out.queued.extend(q);
                out.answered += 1;
            }
            Err(_) => break,
        }
    }
    out.queued
        .sort_by(|a, b| (a.shard, &a.campaign).cmp(&(b.shard, &b.campaign)));
    out
}

/// Sends one command to a running `volley send` and returns its answer.
pub fn request(spool: &Path, line: &str) -> anyhow::Result<String> {
    request_waiting(spool, line, Duration::from_secs(10))
}

/// As [`request`], waiting up to `patience` for the answer (a campaign handed to
/// `volley serve` is answered once all of it is durable).
pub fn request_waiting(spool: &Path, line: &str, patience: Duration) -> anyhow::Result<String> {
    let path = socket_path(spool);
    let mut conn = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot reach {}: {e}; the admin socket is for root, the user volley runs as{} and the members of its admin_group: run this as that user (sudo -u USER volley queue ...), or add your user to admin_group",
            path.display(),
            owner_of(spool)
        ),
        _ => anyhow::anyhow!(
            "cannot reach {}: {e}; is `volley send --spool {}` or `volley serve` running?",
            path.display(),
            spool.display()
        ),
    })?;
    conn.set_read_timeout(Some(patience))?;
    // A refusal may come before the line is taken: its answer is still read.
    let sent = conn.write_all(format!("{line}\n").as_bytes());
    let mut out = Vec::new();
    let read = conn.read_to_end(&mut out);
    if out.is_empty() {
        sent?;
        read?;
    }
    let out = String::from_utf8_lossy(&out).trim_end().to_string();
    match out.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None => Ok(out),
    }
}

/// ` (OWNER, who owns SPOOL)`: the spool's owner is the user volley runs as; empty
/// when the spool cannot be looked at.
fn owner_of(spool: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(spool) {
        Ok(m) => format!(
            " ({}, who owns {})",
            crate::host::accounts::describe_user(m.uid()),
            spool.display()
        ),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        let c = parse("pause gmail.com").unwrap().unwrap();
        assert_eq!(c.target, Target::Domain("gmail.com".into()));
        let c = parse("rate provider:google 100/s").unwrap().unwrap();
        assert_eq!(c.action, Action::Rate(Some(parse_per("100/s").unwrap())));
        assert!(c.target.matches("provider:google"));
        let c = parse("resume source:127.0.0.2").unwrap().unwrap();
        assert!(c.target.matches("source:127.0.0.2>provider:google"));
        assert!(!c.target.matches("source:127.0.0.20>provider:google"));
        assert_eq!(parse("status"), Ok(None));
        assert!(parse("pause").is_err());
        assert!(parse("rate gmail.com fast").is_err());
        assert!(parse("pause source:nope").is_err());
        assert!(parse("pause provider:").is_err());
        assert_eq!(
            parse("pause domain:Gmail.com.").unwrap().unwrap().target,
            Target::Domain("gmail.com".into())
        );
    }

    #[test]
    fn track_names_one_address_and_maybe_a_campaign() {
        let c = parse("track Ann@Gmail.COM spring").unwrap().unwrap();
        assert_eq!(c.target, Target::Domain("gmail.com".into()));
        let Action::Track(t) = c.action else {
            panic!("a track")
        };
        assert_eq!(
            (t.rcpt.as_str(), t.campaign.as_deref()),
            ("ann@gmail.com", Some("spring"))
        );
        assert!(parse("track ann@gmail.com").is_ok());
        for bad in [
            "track",
            "track gmail.com",
            "track @x.test",
            "track a@b.test c d",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_purge_names_a_campaign_or_a_domain_and_a_bounded_reason() {
        let c = parse("purge campaign:spring list bought by mistake")
            .unwrap()
            .unwrap();
        assert_eq!(c.target, Target::Campaign("spring".into()));
        let Action::Purge(p) = c.action else {
            panic!("a purge")
        };
        assert_eq!(p.reason, "list bought by mistake");
        assert!(p.answer.is_none());
        let c = parse("purge example.com").unwrap().unwrap();
        assert_eq!(c.target, Target::Domain("example.com".into()));
        assert!(
            matches!(c.action, Action::Purge(Purge { reason, .. }) if reason == PURGE_REASON_DEFAULT)
        );
        assert!(parse("purge domain:example.com").is_ok());
        for bad in [
            "purge",
            "purge provider:google",
            "purge source:127.0.0.1",
            "purge site:mx.x.test",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let long = format!("purge x.test {}", "a".repeat(PURGE_REASON_OCTETS_MAX + 1));
        assert!(parse(&long).unwrap_err().contains("256-octet limit"));
        assert!(parse("purge x.test bell\u{7}").is_err());
    }

    #[test]
    fn a_purge_answer_sums_every_shard_and_names_the_ones_missing() {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| crossbeam_channel::bounded(4)).unzip();
        let shards = std::thread::spawn(move || {
            for (i, rx) in rxs.into_iter().enumerate() {
                let cmd: Command = rx.recv().unwrap();
                let Action::Purge(p) = cmd.action else {
                    panic!("a purge")
                };
                // The third shard drops it unanswered (as a stopping one does).
                if i < 2 {
                    let n = Purged {
                        purged: 10 + i as u64,
                        in_flight: 1,
                    };
                    p.answer.unwrap().send(n).unwrap();
                }
            }
        });
        let cmd = parse("purge campaign:x oops").unwrap().unwrap();
        // Not waited out: the dropped command closes the answer channel.
        let wait = Duration::from_secs(600);
        let started = Instant::now();
        let line = dispatch(cmd, "purge campaign:x oops", &txs, wait);
        shards.join().unwrap();
        assert!(started.elapsed() < wait);
        assert!(
            line.starts_with("ok: campaign:x purged: 21 recipients bounced, 2 in flight"),
            "{line}"
        );
        assert!(
            line.contains("on 2 of 3 shards; 1 shard(s) did not answer"),
            "{line}"
        );
    }

    #[test]
    fn refusals_are_logged_at_most_ten_a_minute_then_counted() {
        let peer = Peer {
            pid: 7,
            uid: 4_000_001,
            gid: 4_000_001,
        };
        let mut log = RefusalLog::new();
        let t0 = log.minute_start;
        let lines: Vec<_> = (0..25).filter_map(|_| log.line(&peer, t0)).collect();
        assert_eq!(lines.len(), REFUSALS_LOGGED_PER_MIN as usize);
        assert!(lines[0].starts_with("volley: admin socket: refused uid 4000001 (pid 7)"));
        let next = log.line(&peer, t0 + Duration::from_secs(61)).unwrap();
        assert!(
            next.contains("(15 more refused in the minute before"),
            "{next}"
        );
        let after = log.line(&peer, t0 + Duration::from_secs(62)).unwrap();
        assert!(!after.contains("more refused"), "{after}");
    }
}
