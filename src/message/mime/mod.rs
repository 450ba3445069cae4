//! MIME (RFC 2045, RFC 2046, RFC 2047) as volley needs it on the way out: reading a
//! rendered message's entity structure, re-encoding it for receivers that take only 7
//! bit ([`seven_bit`]), and encoding its header fields for receivers without SMTPUTF8
//! ([`encoded_words`]). Pure functions over bytes; nothing here does IO.

pub mod encoded_words;
pub(crate) mod header;
pub mod seven_bit;

pub use encoded_words::{encode_headers, HeaderEncodingError};
pub use seven_bit::{to_seven_bit, PartPath, Unconvertible};
