//! `volley serve`: the long-running MTA. Listeners (SMTP submission, HTTP, pickup
//! directory) take mail in and hand it to the running shards through their inboxes;
//! nothing here delivers.

pub mod auth;
pub mod config;
pub mod daemon;
pub mod http;
pub mod inject;
pub mod intake;
pub mod pickup;
pub mod submission;
pub mod submitted;
