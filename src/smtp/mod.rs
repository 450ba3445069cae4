//! SMTP protocol code with no IO: replies, the client and server sessions, and the
//! syntax of the names said on the wire.

pub mod client;
pub mod names;
pub mod reply;
pub mod server;
