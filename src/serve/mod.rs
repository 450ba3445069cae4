//! `volley serve`: the long-running MTA. Listeners (SMTP submission, HTTP, pickup
//! directory) take mail in and hand it to the running shards through their inboxes;
//! nothing here delivers.
//!
//! - `daemon`: start-up, signals, readiness, the admin socket's `inject`/`progress`;
//! - `config`: the configuration file, its checks and the commented example;
//! - `submission`: the SMTP listeners (IO around `smtp::server`); `auth`: users,
//!   tokens, SASL; `submitted`: what is done to a message before it is queued;
//! - `http` and `inject`: the API, and a JSON body checked as a campaign directory;
//!   `monitor`: the status page, `/metrics` and queue control on the same listener;
//! - `pickup`: the pickup directory;
//! - `intake`: handing messages and campaigns to the shards, answered once durable;
//! - `webhook`: the accounting records POSTed to `[[webhook]]` receivers, at least once;
//! - `tls_reports`: the daily TLS-RPT reports (RFC 8460) sent once each day ends.

pub mod auth;
pub mod config;
pub mod daemon;
pub mod http;
pub mod inject;
pub mod intake;
pub mod monitor;
pub mod pickup;
pub mod submission;
pub mod submitted;
pub mod tls_reports;
pub mod webhook;
