//! An operator's purge (`volley queue purge`, control.rs) on one shard: every
//! matching recipient waiting outside a transaction is bounced now; those in a
//! transaction are remembered and bounced if they come back for a retry.

use super::*;

/// A purge remembered for the recipients that were in flight when it came.
pub(super) struct PurgeRule {
    target: Target,
    reason: String,
    /// Recipients of the target queued at or before it are purged when they come back.
    at: SystemTime,
}

/// The reply logged for a purged recipient. RFC 3463 §3.8: X.7.1 "Delivery not
/// authorized, message refused": the sending site's policy (here its operator's
/// decision) no longer authorises this delivery. A permanent 5.x.x because it is
/// final: the recipient is never tried again. Class `policy`, stage `local`.
const PURGE_CODE: u16 = 550;
const PURGE_ENHANCED: &str = "5.7.1";

impl Shard {
    /// Whether a purge of `target` takes the recipient at `rref` of `instance` to
    /// `domain`, queued at or before `at` (None: whenever).
    fn purge_takes(
        &self,
        target: &Target,
        at: Option<SystemTime>,
        (rref, instance, domain): (RecordRef, u32, &str),
    ) -> bool {
        let hit = match target {
            Target::Domain(d) => domain.eq_ignore_ascii_case(d),
            Target::Campaign(c) => {
                // Compared in place: a purge scans every queued job.
                let inst = self.instance(instance);
                match inst.submission {
                    true => *c == self.envelope(&inst, rref).campaign,
                    false => *c == inst.settings.id,
                }
            }
            // Refused by the parser: a purge names a campaign or a domain.
            Target::Destination(_) | Target::Source(_) => false,
        };
        hit && at.is_none_or(|at| self.queued_at(&self.instance(instance), rref) <= at)
    }

    /// A recipient back from a transaction (to be retried or sent again): bounced
    /// now, and true, if a purge of its campaign or domain came while it was out.
    pub(super) fn purged_on_return(&self, job: &Job) -> bool {
        self.in_flight.borrow_mut().remove(&job.rref);
        let purges = self.purges.borrow();
        if purges.is_empty() {
            return false;
        }
        let this = (job.rref, job.instance, &*job.domain);
        let Some(p) = purges
            .iter()
            .find(|p| self.purge_takes(&p.target, Some(p.at), this))
        else {
            return false;
        };
        let why = purge_text(&p.target, &p.reason);
        drop(purges);
        self.purge_bounce(job, &why);
        self.commit_when_full();
        true
    }

    /// An operator's purge of a campaign or domain (control.rs): every recipient of
    /// it this shard holds outside a transaction is bounced, logged (Bounce, class
    /// `policy`, stage `local`) and marked done now; those in a transaction are
    /// remembered, to be bounced if they come back for a retry. No DSN is sent, as
    /// with PowerMTA's `delete` (without `--dsn`) and KumoMTA's admin bounce: the
    /// operator is purging the mail on purpose, and a campaign's purge would
    /// otherwise send as many notices to its own return path; the accounting log
    /// (and its webhooks) carry every purged recipient.
    pub(super) fn purge(self: &Rc<Self>, target: &Target, reason: &str) -> Purged {
        let at = SystemTime::now();
        // DSNs queued by the last commit are in no queue yet.
        let fresh = std::mem::take(&mut *self.fresh.borrow_mut());
        self.start_jobs(fresh);
        let out =
            self.take_queued(|j| self.purge_takes(target, None, (j.rref, j.instance, &*j.domain)));
        let in_flight = self
            .in_flight
            .borrow()
            .iter()
            .filter(|(r, (i, d))| self.purge_takes(target, Some(at), (**r, *i, &**d)))
            .count() as u64;
        if in_flight > 0 {
            self.purges.borrow_mut().push(PurgeRule {
                target: target.clone(),
                reason: reason.to_string(),
                at,
            });
        }
        let why = purge_text(target, reason);
        for job in &out {
            self.purge_bounce(job, &why);
            self.commit_when_full();
        }
        let counts = Purged {
            purged: out.len() as u64,
            in_flight,
        };
        self.log.borrow_mut().push(&log::ShapingRecord {
            kind: "Shaping",
            time: log::now_rfc3339(),
            event: "purged",
            key: &target.key(),
            rate_per_s: None,
            connections: None,
            reason: &format!(
                "operator purge: {} recipients bounced, {} in flight: {reason}",
                counts.purged, counts.in_flight
            ),
            shard: self.id,
        });
        // Answered once it is on disk: a restart after the answer sends none of them.
        if let Err(e) = self.commit(true) {
            eprintln!("volley: shard {}: {e:#}; stopping", self.id);
            self.stop.store(true, Ordering::Relaxed);
        }
        counts
    }

    /// Takes out every job `takes` picks that waits outside a transaction: in a
    /// site's queue, held by a pause, waiting on DNS, in the retry wheel.
    fn take_queued(&self, takes: impl Fn(&Job) -> bool + Copy) -> Vec<Job> {
        let mut out: Vec<Job> = Vec::new();
        for site in self.sites.borrow().values() {
            out.extend(site.take_where(takes));
        }
        let mut held = self.sched.held.borrow_mut();
        let (taken, kept): (Vec<Job>, Vec<Job>) = held.drain(..).partition(takes);
        *held = kept;
        out.extend(taken);
        drop(held);
        for state in self.domains.borrow_mut().values_mut() {
            if let DomainState::Resolving(waiting) = state {
                let (taken, kept): (Vec<Job>, Vec<Job>) = waiting.drain(..).partition(takes);
                *waiting = kept;
                out.extend(taken);
            }
        }
        out.extend(self.sched.retries.borrow_mut().take_where(takes));
        out
    }

    /// Logs `job` as bounced by a purge and marks it done at the next commit. Not
    /// an attempt: the attempt count stays what the receiver saw.
    fn purge_bounce(&self, job: &Job, why: &str) {
        let inst = self.instance(job.instance);
        let now_sys = SystemTime::now();
        let queued_ms = now_sys
            .duration_since(self.queued_at(&inst, job.rref))
            .unwrap_or_default()
            .as_millis() as u64;
        let Envelope {
            rcpt,
            campaign,
            sender,
        } = self.envelope(&inst, job.rref);
        let rec = log::Record {
            kind: Kind::Bounce,
            time: log::rfc3339(now_sys),
            campaign: &campaign,
            rcpt: &rcpt,
            sender: &sender,
            domain: &job.domain,
            mx: None,
            ip: None,
            tls: None,
            code: PURGE_CODE,
            enhanced: Some(PURGE_ENHANCED),
            class: Some(Class::Policy.name()),
            reply: why,
            stage: "local",
            attempt: job.attempts,
            queued_ms,
            tx_ms: None,
            shard: self.id,
            last_attempt: None,
        };
        self.count(&rec, None);
        self.log.borrow_mut().push(&rec);
        self.batch.borrow_mut().entry(job.instance).or_default()[1] += 1;
        self.pending
            .borrow_mut()
            .push(Pending::Done(job.rref, Terminal::Bounced));
    }

    /// Forgets purges none of whose recipients is in flight any more.
    pub(super) fn forget_purges(&self) {
        if self.purges.borrow().is_empty() {
            return;
        }
        let in_flight = self.in_flight.borrow();
        let still: Vec<bool> = self
            .purges
            .borrow()
            .iter()
            .map(|p| {
                in_flight
                    .iter()
                    .any(|(r, (i, d))| self.purge_takes(&p.target, Some(p.at), (*r, *i, &**d)))
            })
            .collect();
        let mut keep = still.into_iter();
        self.purges
            .borrow_mut()
            .retain(|_| keep.next().expect("one per purge"));
    }
}

/// The reply text of a purged recipient: who purged it, what, and why.
fn purge_text(target: &Target, reason: &str) -> String {
    format!(
        "purged from the queue by the operator (volley queue purge {}): {reason}",
        target.key()
    )
}
