//! What happened: the accounting log (one typed record per event) and the report
//! read back from it, over every rotated generation.

pub mod follow;
pub mod log;
pub mod report;
pub mod rotation;
