//! A hierarchical timer wheel for the retry queue: inserting is O(1), and a tick
//! costs O(1) plus the items that fall due, however many are waiting. Each of four
//! levels has 64 slots; level 0 slots are one tick wide, level n slots 64^n ticks, so
//! the wheel spans 64^4 ticks (19 days at 100 ms). An item moves down a level at most
//! three times before it is due. Items further out than the span are parked in the
//! last level and placed again when they come round.

use std::time::{Duration, Instant};

const BITS: u32 = 6;
const SLOTS: usize = 1 << BITS;
const LEVELS: usize = 4;
const SPAN: u64 = 1 << (BITS as usize * LEVELS);

pub struct Wheel<T> {
    tick: Duration,
    origin: Instant,
    /// Ticks processed: every item due at or before it has been returned.
    now: u64,
    levels: Vec<Vec<Vec<(u64, T)>>>,
    len: usize,
}

impl<T> Wheel<T> {
    pub fn new(tick: Duration, origin: Instant) -> Wheel<T> {
        Wheel {
            tick,
            origin,
            now: 0,
            levels: (0..LEVELS)
                .map(|_| (0..SLOTS).map(|_| Vec::new()).collect())
                .collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `item` for `at`, rounded up to a tick (never early).
    pub fn insert(&mut self, at: Instant, item: T) {
        let since = at.saturating_duration_since(self.origin);
        let due = since.as_nanos().div_ceil(self.tick.as_nanos()) as u64;
        self.place(due.max(self.now + 1), item);
        self.len += 1;
    }

    fn place(&mut self, due: u64, item: T) {
        // The level is the highest 6-bit group in which `due` differs from now: the
        // item is cascaded when now reaches that group's value.
        let at = due.min(self.now + SPAN - 1);
        let differ = at ^ self.now;
        // Past the top level's boundary the top level still works: its slot for `at`
        // comes round (at the start of `at`'s block) before `at`, as at - now < SPAN.
        let level = if differ == 0 {
            0
        } else {
            (((63 - differ.leading_zeros()) / BITS) as usize).min(LEVELS - 1)
        };
        let slot = ((at >> (BITS as usize * level)) as usize) & (SLOTS - 1);
        self.levels[level][slot].push((due, item));
    }

    /// Takes out every item `pred` picks, whenever it is due (an operator's purge):
    /// O(slots + items), as every slot of every level is looked at.
    pub fn take_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for slot in self.levels.iter_mut().flatten() {
            if slot.is_empty() {
                continue;
            }
            let (taken, kept): (Vec<_>, Vec<_>) =
                std::mem::take(slot).into_iter().partition(|(_, t)| pred(t));
            *slot = kept;
            out.extend(taken.into_iter().map(|(_, t)| t));
        }
        self.len -= out.len();
        out
    }

    /// Every item `pred` picks, with when it is due (a tracking question): O(slots +
    /// items), as `take_where`.
    pub fn find_where(&self, mut pred: impl FnMut(&T) -> bool) -> Vec<(Instant, &T)> {
        let tick_ns = self.tick.as_nanos() as u64;
        self.levels
            .iter()
            .flatten()
            .flatten()
            .filter(|(_, t)| pred(t))
            .map(|(due, t)| {
                let at = self.origin + Duration::from_nanos(due.saturating_mul(tick_ns));
                (at, t)
            })
            .collect()
    }

    /// Moves time on to `now`; returns the items that fell due, in due order per tick.
    pub fn advance(&mut self, now: Instant) -> Vec<T> {
        let target =
            (now.saturating_duration_since(self.origin).as_nanos() / self.tick.as_nanos()) as u64;
        let mut out = Vec::new();
        while self.now < target {
            if self.is_empty() {
                // Nothing waits: jump, rather than stepping every tick.
                self.now = target;
                break;
            }
            self.now += 1;
            for level in (1..LEVELS).rev() {
                let width = BITS as usize * level;
                if self.now & ((1u64 << width) - 1) == 0 {
                    let slot = ((self.now >> width) as usize) & (SLOTS - 1);
                    for (due, item) in std::mem::take(&mut self.levels[level][slot]) {
                        self.place(due.max(self.now), item);
                    }
                }
            }
            let slot = (self.now as usize) & (SLOTS - 1);
            for (due, item) in std::mem::take(&mut self.levels[0][slot]) {
                if due > self.now {
                    // Parked beyond the span: not yet.
                    self.place(due, item);
                } else {
                    self.len -= 1;
                    out.push(item);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_due_on_their_tick_never_early() {
        let t0 = Instant::now();
        let tick = Duration::from_millis(100);
        let mut w = Wheel::new(tick, t0);
        // Delays across every level, and beyond the span (40 days).
        let mut rng = fastrand::Rng::with_seed(7);
        let mut delays: Vec<u64> = (0..5000).map(|_| rng.u64(1..40 * 86_400_000)).collect();
        delays.extend([1, 99, 100, 101, 6_400, 6_500, 409_600, 26_214_400]);
        for (i, ms) in delays.iter().enumerate() {
            w.insert(t0 + Duration::from_millis(*ms), i);
        }
        assert_eq!(w.len(), delays.len());
        let mut seen = vec![false; delays.len()];
        let mut by_due: Vec<usize> = (0..delays.len()).collect();
        by_due.sort_by_key(|&i| delays[i]);
        let mut next = 0;
        // Step in irregular strides, as a busy shard's ticks come.
        let mut now_ms = 0u64;
        while !w.is_empty() {
            now_ms += rng.u64(50..400_000);
            for i in w.advance(t0 + Duration::from_millis(now_ms)) {
                assert!(!seen[i], "item {i} twice");
                seen[i] = true;
                assert!(
                    delays[i] <= now_ms,
                    "item {i} due at {} came at {now_ms}",
                    delays[i]
                );
            }
            // Nothing due by the last whole tick is still waiting.
            while next < by_due.len() && delays[by_due[next]].div_ceil(100) <= now_ms / 100 {
                let i = by_due[next];
                assert!(
                    seen[i],
                    "item {i} due at {} ms still waiting at {now_ms}",
                    delays[i]
                );
                next += 1;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn items_inserted_along_the_way_are_neither_early_nor_late() {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let t0 = Instant::now();
        let mut w = Wheel::new(Duration::from_millis(100), t0);
        let mut rng = fastrand::Rng::with_seed(11);
        let mut due: Vec<u64> = Vec::new();
        let mut pending = BinaryHeap::new();
        let mut now_ms = 0u64;
        for step in 0..20_000 {
            if step < 15_000 {
                for _ in 0..rng.usize(0..4) {
                    let at = now_ms + rng.u64(1..30 * 86_400_000);
                    pending.push(Reverse((at.div_ceil(100), due.len())));
                    w.insert(t0 + Duration::from_millis(at), due.len());
                    due.push(at);
                }
            }
            now_ms += rng.u64(1..200_000);
            for i in w.advance(t0 + Duration::from_millis(now_ms)) {
                assert!(
                    due[i] <= now_ms,
                    "item {i} due at {} came at {now_ms}",
                    due[i]
                );
            }
            while pending
                .peek()
                .is_some_and(|Reverse((tick, _))| *tick <= now_ms / 100)
            {
                pending.pop();
            }
            assert_eq!(w.len(), pending.len(), "at {now_ms} ms");
        }
    }

    #[test]
    fn items_taken_out_never_come_due_and_the_rest_still_do() {
        let t0 = Instant::now();
        let mut w = Wheel::new(Duration::from_millis(100), t0);
        // Spread over every level, and beyond the span.
        let delays: Vec<u64> = (0..2000u64).map(|i| 1 + i * i * 997).collect();
        for (i, ms) in delays.iter().enumerate() {
            w.insert(t0 + Duration::from_millis(*ms), i);
        }
        let taken = w.take_where(|i| i % 3 == 0);
        assert_eq!(taken.len(), (0..2000).filter(|i| i % 3 == 0).count());
        assert!(taken.iter().all(|i| i % 3 == 0));
        assert_eq!(w.len(), 2000 - taken.len());
        let mut seen = 0;
        let mut now_ms = 0;
        while !w.is_empty() {
            now_ms += 86_400_000;
            for i in w.advance(t0 + Duration::from_millis(now_ms)) {
                assert_ne!(i % 3, 0, "item {i} was taken out");
                seen += 1;
            }
        }
        assert_eq!(seen, 2000 - taken.len());
    }

    #[test]
    fn an_idle_wheel_jumps_and_later_items_still_come() {
        let t0 = Instant::now();
        let mut w = Wheel::new(Duration::from_millis(100), t0);
        assert!(w.advance(t0 + Duration::from_secs(86_400)).is_empty());
        w.insert(t0 + Duration::from_secs(86_400 + 5), "x");
        assert!(w.advance(t0 + Duration::from_secs(86_404)).is_empty());
        assert_eq!(w.advance(t0 + Duration::from_secs(86_405)), vec!["x"]);
    }
}
