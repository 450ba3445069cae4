//! What happened: the accounting log (one typed record per event) and the report
//! read back from it, over every rotated generation: the campaign report, a
//! recipient's records through an index (track.rs), the PowerMTA CSV view.

pub mod csv;
pub mod log;
pub mod logged;
pub mod report;
pub mod rotation;
pub mod track;
