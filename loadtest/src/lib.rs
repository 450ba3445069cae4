//! volley-load: the load tool volley is measured with. A sink that behaves like real
//! receivers, a campaign generator, a test DNS server and the bench; each usable as
//! a library so the engine's tests and `volley-load demo` start them in-process.

pub mod bench;
pub mod counters;
pub mod dane_bench;
pub mod demo;
pub mod dkim_bench;
pub mod dns;
pub mod gen;
pub mod integrity;
pub mod profile;
pub mod shaping_bench;
pub mod sink;
pub mod submission_bench;
