//! SMTP protocol code with no IO: replies and the client session.

pub mod client;
pub mod reply;
