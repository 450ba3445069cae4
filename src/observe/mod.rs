//! What happened: the accounting log (one typed record per event) and the report
//! read back from it.

pub mod log;
pub mod report;
