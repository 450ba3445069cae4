//! What happened: the accounting log (one typed record per event) and the report
//! read back from it, over every rotated generation; and what is happening: the
//! metrics the shards publish once a second, for Prometheus and the status page.

pub mod log;
pub mod metrics;
pub mod report;
pub mod rotation;
pub mod status;
