//! How volley sits on its host: the modes of what it writes (private whatever the
//! umask), the checks on what it reads that must stay private, who may use the admin
//! socket, and the user `volley serve` runs as (root only to bind; `privilege`).

pub mod accounts;
pub mod files;
pub mod peers;
pub mod privilege;
pub mod secrets;
