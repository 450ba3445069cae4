//! Decisions with no IO, time passed in: traffic shaping (limits, back-off, warm-up),
//! what a reply means (classification), when to try again (retry), and what an
//! MTA-STS record and policy say (mta_sts), and what TLS reports count (tls_rpt).

pub mod classify;
pub mod mta_sts;
pub mod retry;
pub mod shaping;
pub mod tls_rpt;
