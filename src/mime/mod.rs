//! MIME (RFC 2045, RFC 2046) as volley needs it on the way out: reading a rendered
//! message's entity structure, and re-encoding it for receivers that take only 7 bit
//! ([`seven_bit`]). Pure functions over bytes; nothing here does IO.

mod header;
pub mod seven_bit;

pub use seven_bit::{to_seven_bit, PartPath, Unconvertible};
