//! `volley track` on one shard (the admin socket's `track ADDRESS [CAMPAIGN]`,
//! control.rs): every job this shard holds for the recipient, with where it waits
//! and what its last attempt got. Read only; the jobs stay where they are.

use super::*;
use crate::deliver::control::Track;
use crate::spool::peek::{same_rcpt, LastSeen, Queued};

impl Shard {
    /// What this shard holds of `ask.rcpt`: in a site's queue (`ready`), held by a
    /// pause (`paused`), waiting on DNS (`resolving`), in the retry wheel
    /// (`waiting`, with its time), in a transaction (`in_flight`). Only the jobs of
    /// the recipient's domain are looked at closely (their spool record read).
    pub(super) fn track(&self, ask: &Track) -> Vec<Queued> {
        let domain = ask.rcpt.rsplit_once('@').map_or("", |(_, d)| d);
        let is_it = |rref: RecordRef, instance: u32, d: &str| -> Option<Envelope> {
            if !d.eq_ignore_ascii_case(domain) {
                return None;
            }
            let e = self.envelope(&self.instance(instance), rref);
            let hit = same_rcpt(&e.rcpt, &ask.rcpt)
                && ask.campaign.as_ref().is_none_or(|c| *c == e.campaign);
            hit.then_some(e)
        };
        let mut out = Vec::new();
        let mut take = |j: &Job, state: &str, retry_at: Option<SystemTime>| {
            if let Some(e) = is_it(j.rref, j.instance, &j.domain) {
                out.push(self.queued(e, state, retry_at, Some(j)));
            }
        };
        for site in self.sites.borrow().values() {
            site.for_each_queued(|j| take(j, "ready", None));
        }
        self.sched
            .held
            .borrow()
            .iter()
            .for_each(|j| take(j, "paused", None));
        for state in self.domains.borrow().values() {
            if let DomainState::Resolving(waiting) = state {
                waiting.iter().for_each(|j| take(j, "resolving", None));
            }
        }
        let (now, now_sys) = (Instant::now(), SystemTime::now());
        let of_domain = |j: &Job| j.domain.eq_ignore_ascii_case(domain);
        for (at, j) in self.sched.retries.borrow().find_where(of_domain) {
            let when = now_sys + at.saturating_duration_since(now);
            take(j, "waiting", Some(when));
        }
        for (rref, (instance, d)) in self.in_flight.borrow().iter() {
            if let Some(e) = is_it(*rref, *instance, d) {
                out.push(self.queued(e, "in_flight", None, None));
            }
        }
        out
    }

    fn queued(
        &self,
        e: Envelope,
        state: &str,
        retry_at: Option<SystemTime>,
        job: Option<&Job>,
    ) -> Queued {
        Queued {
            shard: self.id,
            campaign: e.campaign,
            rcpt: e.rcpt,
            state: state.into(),
            retry_at: retry_at.map(log::rfc3339),
            attempts: job.map(|j| j.attempts),
            last: job.and_then(|j| j.last.as_deref()).map(LastSeen::from),
        }
    }
}
