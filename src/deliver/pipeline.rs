//! How many transactions a destination gets pipelined on one connection (the
//! window). A receiver that closes a connection (a 421, or a drop) loses every
//! transaction pipelined behind the one it answered: they were sent for nothing
//! and go out again. Against the realistic sink profile (2% of messages answered
//! with a closing 421) a fixed window of 8 sent 8% of the messages twice. So the
//! window halves when a connection is cut off with transactions in flight, and
//! grows back by one for every `GROW_AFTER` transactions answered since.

use std::cell::Cell;

/// Answered transactions, since the window last changed, before it grows by one.
pub const GROW_AFTER: u32 = 50;

/// One destination's window, on one shard.
pub struct Window {
    max: usize,
    floor: usize,
    now: Cell<usize>,
    answered: Cell<u32>,
}

impl Window {
    /// A window of `max` (the configured `--window`), never below 2 unless `max` is:
    /// one transaction queued at the server behind the one it is answering keeps a
    /// slow server busy, and loses at most one when it closes.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Window {
            max,
            floor: max.min(2),
            now: Cell::new(max),
            answered: Cell::new(0),
        }
    }

    pub fn get(&self) -> usize {
        self.now.get()
    }

    /// For `queue status`: a line while the window is below the configured one.
    pub fn status(&self, destination: &str) -> Option<String> {
        (self.now.get() < self.max).then(|| {
            format!(
                "{destination} pipelining window {} of {} (the receiver closed connections with transactions in flight)",
                self.now.get(),
                self.max
            )
        })
    }

    /// A connection ended with `lost` transactions cut off before their answer.
    pub fn cut_off(&self, lost: usize) {
        if lost == 0 {
            return;
        }
        self.now.set((self.now.get() / 2).max(self.floor));
        self.answered.set(0);
    }

    /// A transaction got its answer.
    pub fn answered(&self) {
        let n = self.answered.get() + 1;
        if n >= GROW_AFTER && self.now.get() < self.max {
            self.now.set(self.now.get() + 1);
            self.answered.set(0);
        } else {
            self.answered.set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_a_cut_off_and_grows_back_one_per_fifty_answers() {
        let w = Window::new(8);
        assert_eq!(w.get(), 8);
        w.cut_off(0);
        assert_eq!(w.get(), 8, "a clean close changes nothing");
        assert_eq!(w.status("site:mx"), None);
        w.cut_off(5);
        assert_eq!(w.get(), 4);
        assert_eq!(
            w.status("site:mx").as_deref(),
            Some("site:mx pipelining window 4 of 8 (the receiver closed connections with transactions in flight)")
        );
        w.cut_off(3);
        w.cut_off(1);
        assert_eq!(w.get(), 2, "never below 2");
        for _ in 0..GROW_AFTER - 1 {
            w.answered();
        }
        assert_eq!(w.get(), 2);
        w.answered();
        assert_eq!(w.get(), 3);
        for _ in 0..10 * GROW_AFTER {
            w.answered();
        }
        assert_eq!(w.get(), 8, "back to the configured window, not past it");
    }

    #[test]
    fn a_cut_off_restarts_the_count_towards_growing() {
        let w = Window::new(8);
        w.cut_off(7);
        for _ in 0..GROW_AFTER - 1 {
            w.answered();
        }
        w.cut_off(2);
        assert_eq!(w.get(), 2);
        w.answered();
        assert_eq!(w.get(), 2);
    }

    #[test]
    fn a_window_of_one_stays_one() {
        let w = Window::new(1);
        w.cut_off(1);
        assert_eq!(w.get(), 1);
        for _ in 0..GROW_AFTER {
            w.answered();
        }
        assert_eq!(w.get(), 1);
    }
}
