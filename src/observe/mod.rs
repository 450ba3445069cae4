//! What happened: the accounting log (one typed record per event) and the report
//! read back from it, over every rotated generation: the campaign report, a
//! recipient's records through an index (track.rs), the PowerMTA CSV view; and
//! what is happening: the metrics the shards publish once a second, for
//! Prometheus and the status page.

pub mod csv;
pub mod follow;
pub mod log;
pub mod logged;
pub mod metrics;
pub mod report;
pub mod rotation;
pub mod status;
pub mod track;
