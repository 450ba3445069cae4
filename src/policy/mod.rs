//! Decisions with no IO, time passed in: traffic shaping (limits, back-off, warm-up),
//! what a reply means (classification), and when to try again (retry).

pub mod classify;
pub mod retry;
pub mod shaping;
