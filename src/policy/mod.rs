//! Decisions with no IO, time passed in: traffic shaping (limits, back-off, warm-up),
//! what a reply means (classification), when to try again (retry), and what an
//! MTA-STS record and policy say (mta_sts).

pub mod classify;
pub mod mta_sts;
pub mod retry;
pub mod shaping;
