//! Delivery: the engine starts a shard per core; each shard routes its recipients to
//! sites (MX host sets), opens pooled, pipelined connections to them, and records
//! every reply as an outcome.

pub mod config;
pub mod connection;
pub mod control;
pub mod dane;
pub mod dns;
pub mod engine;
pub mod explain;
pub mod load;
pub mod mta_sts;
pub mod pipeline;
pub mod runtime;
pub mod schedule;
pub mod shard;
pub mod tls;
pub mod tls_rpt;
pub mod track;
pub mod wheel;
