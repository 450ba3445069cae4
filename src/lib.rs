//! volley: a bulk email sending engine. Campaigns are validated and spooled
//! durably (ingest, spool), spread over thread-per-core shards (shard, engine), and
//! delivered over pooled, pipelined SMTP connections (delivery, smtp) to the MX
//! hosts DNS names (dns), with every outcome in the accounting log (log).

pub mod campaign;
pub mod classify;
pub mod compliance;
pub mod config;
pub mod control;
pub mod delivery;

pub mod dkim;
pub mod dns;
pub mod dsn;
pub mod engine;
pub mod explain;
pub mod inbox;
pub mod ingest;
pub mod log;
pub mod mime;
pub mod pipeline;
pub mod report;
pub mod retry;
pub mod runtime;
pub mod serve;
pub mod shaping;
pub mod shard;
pub mod smtp;
pub mod spool;
pub mod template;
pub mod tls;
pub mod wheel;
