//! volley: a bulk email sending engine. The code lives in rooms, and data flows one
//! way through them:
//!
//! - `serve`: the daemon's listeners (SMTP submission, HTTP, pickup) and signals; it
//!   hands mail to `spool` and runs `deliver`.
//! - `spool`: segments and recovery, ingest of a campaign, the running shards'
//!   inboxes, and retention (finished campaigns pruned).
//! - `deliver`: the engine and its shards: sites, connections, DNS, TLS, the retry
//!   wheel, outcomes, the admin socket.
//! - `message`: what is sent: campaigns, templates, compliance headers, DKIM, MIME
//!   conversion, DSN text.
//! - `policy`: pure decisions with time passed in: shaping, reply classification,
//!   retry schedules.
//! - `smtp`: sans-IO client and server sessions, the reply parser, names.
//! - `observe`: the accounting log and the report read from it; the metrics board
//!   the shards publish to (Prometheus, the status page).
//! - `host`: how volley sits on its host: private file modes, secrets checks, the
//!   host's accounts and who may use the admin socket.
//!
//! What may import what: `serve` → every room; `deliver` → `spool`, `message`,
//! `policy`, `smtp`, `observe`, `host`; `spool` → `message`, `observe`, `smtp`,
//! `host` (the spool directory's owner check);
//! `message` → `policy` (reply classes, rates), `smtp` (name syntax), `host` (the
//! DKIM key's check); `policy` → `smtp` (the reply parser), `observe` (a shaping
//! key's view for the metrics); `observe` → `host`;
//! `host` and `smtp` import no room. Nothing imports `serve`.

pub mod deliver;
pub mod host;
pub mod message;
pub mod observe;
pub mod policy;
pub mod serve;
pub mod smtp;
pub mod spool;
