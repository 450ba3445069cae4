//! Run-time control over the admin socket (`SPOOL/admin.sock`): pause, resume or
//! re-rate a domain, provider, campaign or source address without a restart.
//!
//! The protocol is one line in, one line out: `pause gmail.com`, `resume
//! provider:google`, `rate campaign:spring 50/s`, `rate source:10.0.0.5 unlimited`,
//! `status`. Each shard applies a command on its next tick (100 ms), so it takes
//! effect within a second; rates are totals, split over the shards like the rules'.

use crate::policy::shaping::rules::{parse_per, Per};
use crossbeam_channel::Sender;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub action: Action,
    pub target: Target,
}

pub const USAGE: &str =
    "commands: pause TARGET | resume TARGET | rate TARGET N/s|unlimited | status; \
TARGET: a domain (gmail.com), provider:NAME, site:MX, campaign:ID or source:IP";

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
        _ => Err(format!("`{line}` is not a command; {USAGE}")),
    }
}

pub fn socket_path(spool: &Path) -> PathBuf {
    spool.join("admin.sock")
}

/// The live status every shard publishes: its queue, and one line per key that is
/// not running at its configured limits.
#[derive(Default)]
pub struct Status {
    pub per_shard: Mutex<Vec<Vec<String>>>,
}

impl Status {
    pub fn lines(&self) -> Vec<String> {
        self.per_shard
            .lock()
            .expect("status lock")
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.iter().map(move |l| format!("shard {i}: {l}")))
            .collect()
    }
}

/// A handler for admin commands beyond the shards' own: `Some(answer)` if it
/// knows the line (`volley serve`'s `inject DIR`, `progress N`).
pub type Extra = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Commands waiting for one shard (it takes them every tick): operators' commands
/// and other shards' back-off signals.
pub const COMMANDS_QUEUED_MAX: usize = 1024;

/// Serves the admin socket until `stop`; commands go to every shard, or to `extra`
/// first when given.
pub fn serve(
    path: PathBuf,
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
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = answer(conn, &shards, &status, extra.as_ref());
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

fn answer(
    conn: UnixStream,
    shards: &[Sender<Command>],
    status: &Status,
    extra: Option<&Extra>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    // One line of at most 4 KiB: a command, not a stream.
    BufReader::new((&conn).take(4096)).read_line(&mut line)?;
    if let Some(reply) = extra.and_then(|x| x(line.trim())) {
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
        Ok(Some(cmd)) => {
            let taken = shards
                .iter()
                .filter(|s| s.send_timeout(cmd.clone(), Duration::from_secs(1)).is_ok())
                .count();
            match taken == shards.len() {
                true => format!("ok: {} applied on {} shards", line.trim(), shards.len()),
                false => format!(
                    "error: {} reached {taken} of {} shards (the others' command queues are full, {COMMANDS_QUEUED_MAX} each); send it again",
                    line.trim(),
                    shards.len()
                ),
            }
        }
        Err(e) => format!("error: {e}"),
    };
    (&conn).write_all(format!("{reply}\n").as_bytes())
}

/// Sends one command to a running `volley send` and returns its answer.
pub fn request(spool: &Path, line: &str) -> anyhow::Result<String> {
    request_waiting(spool, line, Duration::from_secs(10))
}

/// As [`request`], waiting up to `patience` for the answer (a campaign handed to
/// `volley serve` is answered once all of it is durable).
pub fn request_waiting(spool: &Path, line: &str, patience: Duration) -> anyhow::Result<String> {
    let path = socket_path(spool);
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach {}: {e}; is `volley send --spool {}` running?",
            path.display(),
            spool.display()
        )
    })?;
    conn.set_read_timeout(Some(patience))?;
    conn.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    let out = out.trim_end().to_string();
    match out.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None => Ok(out),
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
    }
}
