//! How new work reaches a running shard. A shard alone writes its spool (one
//! writer per segment), so the listeners of `volley serve` never touch it: they
//! send Queue records to the owning shard's bounded inbox and wait for its answer,
//! which comes only once the shard has synced them (its group commit: every
//! message that arrived while the last sync ran is appended and synced together).
//!
//! A campaign is two-phase, like `ingest` in batch mode: its records are appended
//! and synced but held ("staged") until every shard has answered and its `queued`
//! marker is written; then `Activate` sets them going. An ingest that fails midway
//! sends `Abandon`, and the held records are marked abandoned, never delivered.
//! Records of an instance the shard already runs (the submission instance) go out
//! as soon as they are synced.

use crate::message::dkim::KeyRef;
use crate::spool::ingest::Instance;
use crate::spool::QueueRecord;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Messages waiting in one shard's inbox before injection is refused with a
/// temporary error (SMTP 452 4.3.1, HTTP 503); `inbox_max` in the serve config.
pub const INBOX_MAX_DEFAULT: usize = 4096;

/// Records per `Append` a campaign ingest sends: big enough that a million
/// recipients are a few hundred messages, small enough to bound a shard's pause.
pub const APPEND_RECORDS_MAX: usize = 4096;

/// One message to a shard.
pub enum Inbound {
    /// Append these Queue records (all of one instance) and answer once they are
    /// synced: `Ok` then, or why not (the spool could not be written).
    Append {
        /// The campaign instance the records belong to.
        instance: u32,
        /// Which value of each record is the recipient's address.
        email_col: usize,
        /// At most `APPEND_RECORDS_MAX` for a campaign; a submitted message's
        /// recipients.
        records: Vec<QueueRecord>,
        /// The answer, once synced.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A campaign instance is acknowledged (its marker is on disk): run it, its
    /// staged records first. `dkim`: the key it signs with, if any.
    Activate {
        /// The instance, as loaded from its directory.
        instance: Arc<Instance>,
        /// Its DKIM key, checked when it was queued.
        dkim: Option<KeyRef>,
    },
    /// A campaign instance's ingest failed: mark its staged records abandoned.
    Abandon(u32),
    /// A campaign instance was pruned (retention.rs): every recipient of it is
    /// final, so the shard forgets it (its template and signer).
    Retire(u32),
}

/// Why an injection was not taken. Each is temporary: the client should try again.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The shard (its number) has its inbox bound (messages) waiting.
    #[error("shard {0}'s inbox is full ({1} messages waiting); try again shortly")]
    Full(usize, usize),
    /// The shards are stopping.
    #[error("the engine is shutting down; try again after it restarts")]
    Closed,
    /// The shard could not append or sync (the spool's error).
    #[error("the spool could not take the records: {0}")]
    Spool(String),
    /// Under `spool_free_min`: octets free now, and the reserve.
    #[error("the spool's file system has {free} octets free, under spool_free_min ({min}) with this message; try again later")]
    Disk {
        /// Octets free on the spool's file system.
        free: u64,
        /// `spool_free_min`.
        min: u64,
    },
}

/// The senders of every shard's inbox.
#[derive(Clone)]
pub struct Inboxes {
    senders: Vec<mpsc::Sender<Inbound>>,
    bound: usize,
}

impl Inboxes {
    /// One inbox per shard, each holding at most `bound` messages.
    pub fn new(shards: usize, bound: usize) -> (Inboxes, Vec<mpsc::Receiver<Inbound>>) {
        let (senders, receivers) = (0..shards).map(|_| mpsc::channel(bound.max(1))).unzip();
        (Inboxes { senders, bound }, receivers)
    }

    /// How many shards (and inboxes) there are.
    pub fn shards(&self) -> usize {
        self.senders.len()
    }

    /// Sends `records` to `shard` at once, or refuses if its inbox is full. The
    /// answer comes on the returned receiver once they are durable.
    pub fn append(
        &self,
        shard: usize,
        instance: u32,
        email_col: usize,
        records: Vec<QueueRecord>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, InboxError> {
        self.append_waiting(shard, instance, email_col, records, Duration::ZERO)
    }

    /// As [`append`](Self::append), waiting up to `patience` for room: a campaign
    /// ingest is paced by the shards rather than refused at the first full inbox.
    pub fn append_waiting(
        &self,
        shard: usize,
        instance: u32,
        email_col: usize,
        mut records: Vec<QueueRecord>,
        patience: Duration,
    ) -> Result<oneshot::Receiver<Result<(), String>>, InboxError> {
        let deadline = Instant::now() + patience;
        loop {
            let (done, answer) = oneshot::channel();
            let msg = Inbound::Append {
                instance,
                email_col,
                records,
                done,
            };
            match self.senders[shard].try_send(msg) {
                Ok(()) => return Ok(answer),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(InboxError::Closed),
                Err(mpsc::error::TrySendError::Full(Inbound::Append { records: r, .. })) => {
                    if Instant::now() >= deadline {
                        return Err(InboxError::Full(shard, self.bound));
                    }
                    records = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(mpsc::error::TrySendError::Full(_)) => unreachable!("sent an Append"),
            }
        }
    }

    /// Tells every shard that `instance` is acknowledged. Blocks while an inbox is
    /// full: activation must not be lost once the marker is written.
    pub fn activate(&self, instance: &Arc<Instance>, dkim: Option<&KeyRef>) {
        for s in &self.senders {
            let _ = s.blocking_send(Inbound::Activate {
                instance: instance.clone(),
                dkim: dkim.cloned(),
            });
        }
    }

    /// Tells every shard that `instance` was pruned. Blocks while an inbox is full,
    /// as `activate` does; a shard that has stopped has nothing to forget.
    pub fn retire(&self, instance: u32) {
        for s in &self.senders {
            let _ = s.blocking_send(Inbound::Retire(instance));
        }
    }

    /// Tells every shard that `instance`'s ingest failed.
    pub fn abandon(&self, instance: u32) {
        for s in &self.senders {
            let _ = s.blocking_send(Inbound::Abandon(instance));
        }
    }
}

/// Waits for a shard's answer from a thread outside any async runtime.
pub fn wait(answer: oneshot::Receiver<Result<(), String>>) -> Result<(), InboxError> {
    match answer.blocking_recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(InboxError::Spool(e)),
        Err(_) => Err(InboxError::Closed),
    }
}
