//! The warm-up ledger: messages sent today per warm-up key (a source address towards
//! a provider), over every `send` of the day, so a daily cap holds across runs and not
//! only within one. Kept in `SPOOL/warmup.tsv`, one tab-separated line per key:
//! `2026-11-25`, `source:192.0.2.10>provider:google`, `1840` (day, key, sent).
//! Only today's lines count (UTC days). The engine writes the file each second while
//! anything changed and at the end of the run, through a temporary file renamed into
//! place: a crash loses at most the last second's count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub struct Ledger {
    path: PathBuf,
    /// The day `before` counts for.
    day: i64,
    /// Sent on `day` by earlier runs, read at start (all shards together).
    before: HashMap<String, u64>,
    /// This run's counts: (the day they are for, per key).
    sent: Mutex<(i64, HashMap<String, u64>)>,
    changed: AtomicBool,
}

impl Ledger {
    /// Reads `SPOOL/warmup.tsv` if there is one; a bad line is an error naming it.
    pub fn load(spool_dir: &Path) -> anyhow::Result<Ledger> {
        let path = spool_dir.join("warmup.tsv");
        let day = super::today();
        let mut before = HashMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    if line.starts_with('#') || line.trim().is_empty() {
                        continue;
                    }
                    let bad = || {
                        anyhow::anyhow!(
                            "{}:{}: expected `YYYY-MM-DD<TAB>KEY<TAB>COUNT`, found {line:?}; \
                             fix or delete the line (deleting forgets that day's warm-up sends)",
                            path.display(),
                            i + 1
                        )
                    };
                    let mut f = line.split('\t');
                    let (Some(d), Some(key), Some(n), None) =
                        (f.next(), f.next(), f.next(), f.next())
                    else {
                        return Err(bad());
                    };
                    let d = super::rules::parse_day(d).map_err(|_| bad())?;
                    let n: u64 = n.parse().map_err(|_| bad())?;
                    if d == day {
                        *before.entry(key.to_string()).or_default() += n;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        }
        Ok(Ledger {
            path,
            day,
            before,
            sent: Mutex::new((day, HashMap::new())),
            changed: AtomicBool::new(false),
        })
    }

    /// What earlier runs sent for `key` on `day` (0 for any other day).
    pub fn sent_before(&self, key: &str, day: i64) -> u64 {
        if day == self.day {
            self.before.get(key).copied().unwrap_or(0)
        } else {
            0
        }
    }

    /// Counts one message sent for `key` on `day`. The ledger's day only moves
    /// forward: a shard that read the clock just before midnight, after another
    /// started the new day, counts in the new day (one message more today, never
    /// the new day's counts wiped).
    pub fn add(&self, key: &str, day: i64) {
        let mut sent = self.sent.lock().expect("ledger lock");
        if day > sent.0 {
            *sent = (day, HashMap::new());
        }
        match sent.1.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                sent.1.insert(key.to_string(), 1);
            }
        }
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Writes today's totals if anything changed since the last save.
    pub fn save(&self) -> std::io::Result<()> {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let (day, totals) = {
            let sent = self.sent.lock().expect("ledger lock");
            let mut totals = sent.1.clone();
            if sent.0 == self.day {
                for (k, n) in &self.before {
                    *totals.entry(k.clone()).or_default() += n;
                }
            }
            (sent.0, totals)
        };
        let date = humantime::format_rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(day as u64 * 86_400),
        )
        .to_string();
        let mut keys: Vec<_> = totals.into_iter().collect();
        keys.sort();
        let mut text = String::from("# day\tkey\tsent (volley's warm-up ledger, UTC days)\n");
        for (k, n) in keys {
            text.push_str(&format!("{}\t{k}\t{n}\n", &date[..10]));
        }
        let tmp = self.path.with_extension("tsv.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_from_just_before_midnight_keeps_the_new_days() {
        let dir = std::env::temp_dir().join(format!("volley-warmup-day-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let l = Ledger::load(&dir).unwrap();
        let day = l.day;
        l.add("k", day + 1);
        l.add("k", day + 1);
        l.add("k", day);
        let sent = l.sent.lock().unwrap();
        assert_eq!((sent.0, sent.1["k"]), (day + 1, 3));
        drop(sent);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn counts_add_up_over_runs_and_only_today_counts() {
        let dir = std::env::temp_dir().join(format!("volley-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let today = super::super::today();
        std::fs::write(
            dir.join("warmup.tsv"),
            "# day\tkey\tsent\n2020-01-01\tsource:a>provider:x\t999\n",
        )
        .unwrap();
        let first = Ledger::load(&dir).unwrap();
        assert_eq!(first.sent_before("source:a>provider:x", today), 0);
        first.add("source:a>provider:x", today);
        first.add("source:a>provider:x", today);
        first.save().unwrap();
        let second = Ledger::load(&dir).unwrap();
        assert_eq!(second.sent_before("source:a>provider:x", today), 2);
        assert_eq!(second.sent_before("source:a>provider:x", today + 1), 0);
        second.add("source:a>provider:x", today);
        second.save().unwrap();
        assert_eq!(
            Ledger::load(&dir)
                .unwrap()
                .sent_before("source:a>provider:x", today),
            3
        );
        std::fs::write(dir.join("warmup.tsv"), "2026-11-25\tonly two fields\n").unwrap();
        let e = Ledger::load(&dir).err().unwrap().to_string();
        assert!(e.contains("warmup.tsv:1: expected"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
