//! What is sent: a campaign's settings, template and recipients, the headers
//! compliance adds, DKIM signatures, MIME conversions for receivers that need them,
//! and the text of delivery status notifications.

pub mod campaign;
pub mod compliance;
pub mod dkim;
pub mod dsn;
pub mod mime;
pub mod template;
