//! Who may submit to `volley serve`: the users file (SMTP AUTH), the API tokens file
//! (HTTP injection) and the SASL decoding the SMTP session needs. Sans-IO apart from
//! loading and rewriting the two files: the session hands in what the client sent and
//! gets back a decoded message or a yes/no, so every mechanism is tested without a
//! socket and no protocol decision hides in IO code.
//!
//! # Users file (`--users FILE`)
//!
//! One user per line, blank lines and `#` comments allowed:
//!
//! ```text
//! # name:PHC[:cram-md5=BASE64]
//! alice:$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH
//! tim:$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH:cram-md5=dGFuc3RhYWZ0YW5zdGFhZg==
//! ```
//!
//! The password is kept as an Argon2id PHC string: a slow, salted, one-way hash, so a
//! copy of the file does not give the passwords away. That is enough for PLAIN and
//! LOGIN, where the client sends the password itself. CRAM-MD5 (RFC 2195) is different:
//! the client sends HMAC-MD5 keyed with the password, and to check it the server needs
//! the key, i.e. the password. So for users added with `--cram-md5` (only those) the
//! password is also stored, base64-encoded, in `cram-md5=`. The trade-off: anyone who
//! can read the file can log in as those users over CRAM-MD5, PLAIN and LOGIN; the
//! Argon2 hash alone cannot be reversed. Offer CRAM-MD5 only to clients that cannot
//! use PLAIN over TLS, and keep the file mode 0600 (`add_user` writes it so).
//!
//! # Tokens file (`--tokens FILE`)
//!
//! One token per line, `name:SHA256HEX`, the SHA-256 of the token (the token itself is
//! shown once, by `add_token`, and never stored). A token is 32 random bytes, which is
//! why a fast unsalted hash is enough here where a password needs Argon2: there is no
//! dictionary to try.
//!
//! Both files are rewritten whole and atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory), so a crash leaves the old or the new file,
//! never half of one, and the server never reads a partial line.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::host::secrets::{self, Secret};
use anyhow::{anyhow, bail, Context};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use ring::rand::{SecureRandom, SystemRandom};

/// Longest user or token name, in octets. Names are printable ASCII (0x21–0x7E) other
/// than `:`, which separates the fields of a line.
pub const NAME_OCTETS_MAX: usize = 64;

/// Longest password `add_user` accepts, in octets: far above any real password, low
/// enough that a hash or HMAC over it costs nothing.
pub const PASSWORD_OCTETS_MAX: usize = 1024;

/// Longest base64 SASL line the decoders take, in octets: RFC 4954 section 4 sets
/// 12288 octets as the limit of an AUTH command line.
pub const SASL_LINE_OCTETS_MAX: usize = 12288;

/// Longest line in the users or tokens file, in octets (a PHC string with the default
/// parameters is about 100; a CRAM-MD5 secret adds at most 4/3 of a password).
pub const FILE_LINE_OCTETS_MAX: usize = 4096;

/// Largest users or tokens file `load` reads, in octets.
pub const FILE_OCTETS_MAX: u64 = 16 << 20;

/// Longest token `Tokens::check` hashes; anything longer cannot be one of ours
/// (`vly_` and 43 base64url characters).
pub const TOKEN_OCTETS_MAX: usize = 256;

/// Random bytes in a token: 256 bits, beyond guessing.
const TOKEN_RANDOM_OCTETS: usize = 32;

/// Prefix of every token, so a leaked one is recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "vly_";

/// Marker of the CRAM-MD5 secret, the optional third field of a users file line.
const CRAM_FIELD_PREFIX: &str = "cram-md5=";

/// Octets in an HMAC-MD5 digest (RFC 2104 with MD5): 32 hex digits on the wire.
const MD5_DIGEST_OCTETS: usize = 16;

/// A valid Argon2id hash with the default parameters (of a random password nobody
/// knows), verified against when the user is unknown so that an unknown name costs
/// the same time as a wrong password and timing does not tell which names exist.
const DUMMY_PHC: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$Tw/v3EPab6OkQZvEPTJn/g$f3LwrBaz+LhQcQQIPtzRxkuk4wlJheLeuNOFEN/Hrqc";

type HmacMd5 = Hmac<md5::Md5>;

/// One user of the users file.
struct User {
    /// Argon2id PHC string, checked parseable at load.
    phc: String,
    /// The password itself, for CRAM-MD5's HMAC key; only for users added with
    /// `--cram-md5`.
    cram_key: Option<Vec<u8>>,
}

/// The users file, loaded: names to their Argon2id hash and optional CRAM-MD5 secret.
/// Debug output names no secret.
pub struct Users {
    by_name: HashMap<String, User>,
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Reads and validates a users file (format in the module doc).
    ///
    /// Errors: every problem found, each as `FILE:LINE: what is wrong; what to do`
    /// (or `FILE: ...` when the file itself cannot be read), so an operator fixes them
    /// all in one pass.
    pub fn load(path: &Path) -> Result<Users, Vec<String>> {
        let text = read_bounded(path, Secret::UsersFile).map_err(|e| vec![e])?;
        let mut by_name = HashMap::new();
        let mut errors = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), index + 1);
            if is_blank_or_comment(line) {
                continue;
            }
            match parse_user_line(line) {
                Ok((name, user)) => {
                    if by_name.insert(name.to_owned(), user).is_some() {
                        errors.push(format!(
                            "{at}: user `{name}` appears twice; delete one of the lines"
                        ));
                    }
                }
                Err(what) => errors.push(format!("{at}: {what}")),
            }
        }
        if errors.is_empty() {
            Ok(Users { by_name })
        } else {
            Err(errors)
        }
    }

    /// How many users the file holds.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the file holds no user (the server then refuses every AUTH).
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether `name`'s password is right (PLAIN, RFC 4616, and LOGIN).
    ///
    /// Takes about one Argon2 hash whether or not `name` exists: an unknown name is
    /// checked against a dummy hash, so timing does not reveal which users exist (as
    /// long as the users' hashes use the default parameters, as `add_user` writes).
    pub fn verify_plain(&self, name: &str, password: &str) -> bool {
        let user = self.by_name.get(name);
        let phc = user.map_or(DUMMY_PHC, |u| u.phc.as_str());
        let matches = match PasswordHash::new(phc) {
            Ok(hash) => Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok(),
            Err(_) => false,
        };
        matches && user.is_some()
    }

    /// Whether `name` has a CRAM-MD5 secret, i.e. was added with `--cram-md5`. The
    /// session can use it to refuse CRAM-MD5 early with a clear reply.
    /// Whether any user has a CRAM-MD5 secret: only then is CRAM-MD5 offered.
    pub fn any_cram_md5(&self) -> bool {
        self.by_name.values().any(|u| u.cram_key.is_some())
    }

    /// Whether `name` has a CRAM-MD5 secret (was added with `--cram-md5`).
    pub fn has_cram_md5(&self, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|user| user.cram_key.is_some())
    }

    /// Whether `digest_hex` is HMAC-MD5 (RFC 2104) keyed with `name`'s password over
    /// `challenge`, as RFC 2195 defines CRAM-MD5. `challenge` is exactly what the server
    /// sent (before base64), e.g. `<1896.697170952@postoffice.reston.mci.net>`;
    /// `digest_hex` is 32 hex digits, compared in constant time, case-insensitively.
    ///
    /// False for unknown users and for users without a CRAM-MD5 secret; the HMAC is
    /// computed either way so the reply time does not say which.
    pub fn verify_cram_md5(&self, name: &str, challenge: &str, digest_hex: &str) -> bool {
        let key = self.by_name.get(name).and_then(|u| u.cram_key.as_deref());
        let expected = hmac_md5_hex(key.unwrap_or(b"no such user"), challenge.as_bytes());
        let presented = digest_hex.to_ascii_lowercase();
        let matches = constant_time_eq(expected.as_bytes(), presented.as_bytes());
        matches && key.is_some()
    }
}

/// Adds `name` to the users file at `path`, or replaces its line if it is there (other
/// lines, comments included, are kept as they are). The password is hashed with
/// Argon2id, the default parameters and a random 16-octet salt; with `cram_md5` the
/// password is also stored base64-encoded for CRAM-MD5 (see the module doc for what
/// that costs). Replacing a user without `cram_md5` drops any secret it had.
///
/// Creates the file if missing; writes it atomically with mode 0600 whatever the umask.
///
/// Errors: a name that is empty, over [`NAME_OCTETS_MAX`] or not printable ASCII
/// without `:`; an empty password, one over [`PASSWORD_OCTETS_MAX`] or holding a NUL
/// (PLAIN could never carry it); the file unreadable or not UTF-8; any write failing.
pub fn add_user(path: &Path, name: &str, password: &str, cram_md5: bool) -> anyhow::Result<()> {
    check_name(name).map_err(|what| anyhow!("user name: {what}"))?;
    check_password(password)?;
    let phc = hash_password(password)?;
    let mut line = format!("{name}:{phc}");
    if cram_md5 {
        line.push(':');
        line.push_str(CRAM_FIELD_PREFIX);
        line.push_str(&STANDARD.encode(password.as_bytes()));
    }
    upsert_line(path, name, &line)
}

/// What an API token may do. A token line without scopes may do all three (as
/// every token could before scopes existed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Queue campaigns (`POST /api/v1/inject`) and read their counts.
    Inject,
    /// Read the status, metrics and tracking, which name recipients.
    Read,
    /// Pause, resume and set rates (`POST /api/v1/queue`).
    Control,
}

/// Every scope, in the order the file names them.
pub const SCOPES: [Scope; 3] = [Scope::Inject, Scope::Read, Scope::Control];

impl Scope {
    /// Its name in the tokens file and in `volley token add --scope`.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Inject => "inject",
            Scope::Read => "read",
            Scope::Control => "control",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of scopes: what one token may do. Displays as the tokens file names it
/// (`inject,read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope: a token line that names none (made before scopes existed).
    pub const ALL: Scopes = Scopes((1 << SCOPES.len()) - 1);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = SCOPES
            .iter()
            .filter(|s| self.contains(**s))
            .map(|s| s.name())
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Parses `inject,read,control` (any of them, comma-separated) to a scope set.
/// Errors: an unknown or repeated name, or none.
pub fn parse_scopes(text: &str) -> Result<Scopes, String> {
    let mut set = Scopes(0);
    for word in text.split(',').map(str::trim) {
        let Some(s) = SCOPES.iter().find(|s| s.name() == word) else {
            return Err(format!(
                "scope `{word}` is not one of inject, read, control"
            ));
        };
        if set.contains(*s) {
            return Err(format!("scope `{word}` is named twice"));
        }
        set.0 |= s.bit();
    }
    Ok(set)
}

/// The API tokens file, loaded: each token's name, the SHA-256 of the token and
/// what it may do. `Tokens::default()` has none: every request is refused. Debug
/// output names no digest.
#[derive(Default)]
pub struct Tokens {
    /// In file order; `check` compares against every entry so its time depends only on
    /// how many there are.
    entries: Vec<(String, [u8; 32], Scopes)>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|(n, _, _)| n.as_str()).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

impl Tokens {
    /// Reads and validates a tokens file: lines `name:SHA256HEX` (64 hex digits; every
    /// scope) or `name:SHA256HEX:SCOPES` (`inject,read,control`, any of them), blank
    /// lines and `#` comments allowed.
    ///
    /// Errors: every problem found, each as `FILE:LINE: what is wrong; what to do`
    /// (or `FILE: ...` when the file itself cannot be read).
    pub fn load(path: &Path) -> Result<Tokens, Vec<String>> {
        let text = read_bounded(path, Secret::TokensFile).map_err(|e| vec![e])?;
        let mut entries: Vec<(String, [u8; 32], Scopes)> = Vec::new();
        let mut errors = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), index + 1);
            if is_blank_or_comment(line) {
                continue;
            }
            match parse_token_line(line) {
                Ok((name, _, _)) if entries.iter().any(|(n, _, _)| n == name) => errors.push(
                    format!("{at}: token `{name}` appears twice; delete one of the lines"),
                ),
                Ok((name, digest, scopes)) => entries.push((name.to_owned(), digest, scopes)),
                Err(what) => errors.push(format!("{at}: {what}")),
            }
        }
        if errors.is_empty() {
            Ok(Tokens { entries })
        } else {
            Err(errors)
        }
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no token (the API then refuses every request).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The token `presented`'s name (as the client sent it, prefix included) if it
    /// may do `scope`; else why not: `Err(None)` for no such token, `Err(Some(what
    /// it may do))` for one without that scope. Its SHA-256 is compared with every
    /// stored digest in constant time.
    pub fn check_scope(&self, presented: &str, scope: Scope) -> Result<&str, Option<String>> {
        match self.find(presented) {
            Some((name, set)) if set.contains(scope) => Ok(name),
            Some((name, set)) => Err(Some(format!(
                "token `{name}` may {set}, not {}",
                scope.name()
            ))),
            None => Err(None),
        }
    }

    fn find(&self, presented: &str) -> Option<(&str, Scopes)> {
        if presented.is_empty() || presented.len() > TOKEN_OCTETS_MAX {
            return None;
        }
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for (name, stored, scopes) in &self.entries {
            if constant_time_eq(stored, &digest) && found.is_none() {
                found = Some((name.as_str(), *scopes));
            }
        }
        found
    }
}

/// Makes a new token named `name`, stores its SHA-256 in the tokens file at `path`
/// (replacing that name's line if there is one, which revokes the old token) and
/// returns the token: `vly_` and 32 random octets (ring's SystemRandom) in base64url
/// without padding, 47 characters. It is not stored; show it to the operator once.
///
/// Creates the file if missing; writes it atomically with mode 0600 whatever the umask.
///
/// Errors: a bad name (as for `add_user`), the system RNG failing, the file unreadable
/// or not UTF-8, any write failing.
pub fn add_token(path: &Path, name: &str, scopes: Option<Scopes>) -> anyhow::Result<String> {
    check_name(name).map_err(|what| anyhow!("token name: {what}"))?;
    let mut random = [0u8; TOKEN_RANDOM_OCTETS];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(random));
    let mut line = format!("{name}:{}", hex_lower(&sha256(token.as_bytes())));
    if let Some(set) = scopes {
        line.push_str(&format!(":{set}"));
    }
    upsert_line(path, name, &line)?;
    Ok(token)
}

/// What is wrong with a SASL message from the client (RFC 4954 AUTH exchanges). The
/// session answers 501 with the Display text, or ends the exchange on `Cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*`: it gives up the exchange (RFC 4954 section 4).
    #[error("authentication cancelled by the client")]
    Cancelled,
    /// Over [`SASL_LINE_OCTETS_MAX`].
    #[error("SASL line longer than {SASL_LINE_OCTETS_MAX} octets")]
    TooLong,
    /// Not base64 (RFC 4648 section 4, with padding).
    #[error("not valid base64")]
    Base64,
    /// Decoded, but not UTF-8 (RFC 4616 requires UTF-8).
    #[error("decoded text is not UTF-8")]
    NotUtf8,
    /// PLAIN message not `authzid NUL authcid NUL passwd` (RFC 4616 section 2).
    #[error("PLAIN message is not authzid NUL authcid NUL password")]
    PlainShape,
    /// PLAIN with an empty authentication identity or password.
    #[error("PLAIN message with an empty user name or password")]
    PlainEmpty,
    /// PLAIN asking to act as another user; volley has no proxy authorization.
    #[error("authorization identity differs from the user name; acting as another user is not supported")]
    AuthzidMismatch,
    /// CRAM-MD5 response not `user SP 32-hex-digit-digest` (RFC 2195 section 2).
    #[error("CRAM-MD5 response is not a user name, a space and 32 hex digits")]
    CramMd5Shape,
}

/// Decodes a PLAIN (RFC 4616) initial response or continuation line, base64 of
/// `authzid NUL authcid NUL passwd`, to `(authcid, password)`.
///
/// Errors: [`SaslError::Cancelled`] for `*`, `TooLong`, `Base64`, `NotUtf8`,
/// `PlainShape` (not exactly two NULs), `PlainEmpty`, and `AuthzidMismatch` when the
/// authzid is neither empty nor the authcid.
pub fn decode_plain(b64: &str) -> Result<(String, String), SaslError> {
    let text = decode_base64_line(b64)?;
    let mut fields = text.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::PlainShape);
    };
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::PlainEmpty);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok((authcid.to_owned(), password.to_owned()))
}

/// Decodes one base64 line of a SASL exchange (RFC 4954) to text: the user name and
/// password steps of LOGIN, or any mechanism's response. A trailing CR LF is ignored;
/// `=` alone and the empty line decode to the empty string.
///
/// Errors: [`SaslError::Cancelled`] for `*`, `TooLong`, `Base64`, `NotUtf8`.
pub fn decode_base64_line(s: &str) -> Result<String, SaslError> {
    let s = s.trim_end_matches(['\r', '\n']);
    if s == "*" {
        return Err(SaslError::Cancelled);
    }
    if s.len() > SASL_LINE_OCTETS_MAX {
        return Err(SaslError::TooLong);
    }
    // RFC 4954 section 4: "=" is an empty initial response.
    if s == "=" {
        return Ok(String::new());
    }
    let octets = STANDARD.decode(s).map_err(|_| SaslError::Base64)?;
    String::from_utf8(octets).map_err(|_| SaslError::NotUtf8)
}

/// A fresh CRAM-MD5 challenge (RFC 2195 section 2), `<random.unixtime@hostname>`, to be
/// sent base64-encoded in the 334 reply and handed back to
/// [`Users::verify_cram_md5`] as is. The random part (from ring's SystemRandom, or
/// fastrand should that fail) makes it unpredictable, the time makes it unique.
pub fn cram_md5_challenge(hostname: &str) -> String {
    let mut octets = [0u8; 8];
    let random = match SystemRandom::new().fill(&mut octets) {
        Ok(()) => u64::from_le_bytes(octets),
        // A challenge only has to be unique and hard to guess; fastrand plus the time
        // is still both, so an RNG failure need not fail the session.
        Err(_) => fastrand::u64(..),
    };
    let unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cram_md5_challenge_from(hostname, random, unix_s)
}

/// [`cram_md5_challenge`] with its random number and time given, for tests.
fn cram_md5_challenge_from(hostname: &str, random: u64, unix_s: u64) -> String {
    format!("<{random}.{unix_s}@{hostname}>")
}

/// Decodes a CRAM-MD5 response (RFC 2195 section 2), base64 of `user SP digest`, to
/// `(user, digest_hex)` with the digest in lowercase. The user is split at the last
/// space, so a name with spaces comes through whole (and is then unknown).
///
/// Errors: [`SaslError::Cancelled`] for `*`, `TooLong`, `Base64`, `NotUtf8`,
/// `CramMd5Shape` (no space, empty user, or not 32 hex digits).
pub fn decode_cram_md5(b64: &str) -> Result<(String, String), SaslError> {
    let text = decode_base64_line(b64)?;
    let (user, digest) = text.rsplit_once(' ').ok_or(SaslError::CramMd5Shape)?;
    let is_digest =
        digest.len() == 2 * MD5_DIGEST_OCTETS && digest.bytes().all(|b| b.is_ascii_hexdigit());
    if user.is_empty() || !is_digest {
        return Err(SaslError::CramMd5Shape);
    }
    Ok((user.to_owned(), digest.to_ascii_lowercase()))
}

/// Reads a whole users or tokens file, refusing one over [`FILE_OCTETS_MAX`] or one
/// the group or others may read or another user owns (host/secrets.rs: the check ssh
/// makes of a private key). Errors are whole messages in the `FILE: what; what to do`
/// style, and never quote the file.
fn read_bounded(path: &Path, what: Secret) -> Result<String, String> {
    let octets = secrets::read(path, what, FILE_OCTETS_MAX).map_err(|e| e.to_string())?;
    String::from_utf8(octets).map_err(|_| {
        format!(
            "{}: not UTF-8 text; is this the right file?",
            path.display()
        )
    })
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

/// Parses `name:PHC[:cram-md5=BASE64]`; the error says what is wrong and what to do.
fn parse_user_line(line: &str) -> Result<(&str, User), String> {
    if line.len() > FILE_LINE_OCTETS_MAX {
        return Err(format!(
            "line over {FILE_LINE_OCTETS_MAX} octets; re-add the user to rewrite it"
        ));
    }
    let mut fields = line.splitn(3, ':');
    let name = fields.next().unwrap_or_default();
    let Some(phc) = fields.next() else {
        return Err("expected name:PHC or name:PHC:cram-md5=BASE64; \
                    re-add the user to rewrite the line"
            .to_owned());
    };
    check_name(name).map_err(|what| format!("user name: {what}"))?;
    // Not the name: on a malformed line it may be a password pasted in its place; the
    // caller's FILE:LINE says which user it is.
    check_phc(phc).map_err(|what| format!("the password hash: {what}; re-add the user"))?;
    let cram_key = match fields.next() {
        None => None,
        Some(field) => Some(parse_cram_field(field).map_err(|what| {
            format!("the CRAM-MD5 field: {what}; re-add the user with its CRAM-MD5 secret")
        })?),
    };
    let user = User {
        phc: phc.to_owned(),
        cram_key,
    };
    Ok((name, user))
}

/// Checks that `phc` is an Argon2id, version 19 PHC string with usable parameters.
fn check_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string ({e})"))?;
    if hash.algorithm != argon2::ARGON2ID_IDENT {
        return Err(format!("hash is {}, not argon2id", hash.algorithm));
    }
    if hash.version != Some(argon2::Version::V0x13 as u32) {
        return Err("hash is not Argon2 version 19 (v=19)".to_owned());
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("bad Argon2 parameters ({e})"))?;
    if hash.hash.is_none() || hash.salt.is_none() {
        return Err("PHC string without salt or hash".to_owned());
    }
    Ok(())
}

/// Parses `cram-md5=BASE64` to the password octets.
fn parse_cram_field(field: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = field.strip_prefix(CRAM_FIELD_PREFIX) else {
        return Err(format!("third field is not `{CRAM_FIELD_PREFIX}BASE64`"));
    };
    let key = STANDARD
        .decode(b64)
        .map_err(|_| "CRAM-MD5 secret is not valid base64".to_owned())?;
    if key.is_empty() {
        return Err("CRAM-MD5 secret is empty".to_owned());
    }
    Ok(key)
}

/// Parses `name:SHA256HEX` or `name:SHA256HEX:SCOPES`; the error says what is wrong
/// and what to do, quoting nothing of the line (see `check_name`).
fn parse_token_line(line: &str) -> Result<(&str, [u8; 32], Scopes), String> {
    let Some((name, rest)) = line.split_once(':') else {
        return Err("expected name:SHA256HEX; make the token again to rewrite the line".to_owned());
    };
    check_name(name).map_err(|what| format!("token name: {what}"))?;
    let (hex, scopes) = match rest.split_once(':') {
        Some((hex, s)) => (
            hex,
            parse_scopes(s).map_err(|_| {
                "the scopes field is not a comma-separated list of inject, read and control \
                 (each at most once); correct it or make the token again with --scope"
                    .to_owned()
            })?,
        ),
        None => (rest, Scopes::ALL),
    };
    let digest = parse_hex_32(hex).ok_or_else(|| {
        "the digest is not 64 hex digits (a SHA-256); make the token again".to_owned()
    })?;
    Ok((name, digest, scopes))
}

/// Why `name` is not a valid user or token name, if it is not. The text does not
/// quote the name: in a hand-edited file a bad name field may be a password pasted
/// in the wrong place, and these errors reach the log.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty; give a name".to_owned());
    }
    if name.len() > NAME_OCTETS_MAX {
        return Err(format!(
            "{} octets, over {NAME_OCTETS_MAX}; use a shorter one",
            name.len()
        ));
    }
    if let Some(at) = name
        .bytes()
        .position(|b| !b.is_ascii_graphic() || b == b':')
    {
        return Err(format!(
            "octet {} is not printable ASCII other than `:` and space; \
             use letters, digits and punctuation such as . - _ @",
            at + 1
        ));
    }
    Ok(())
}

fn check_password(password: &str) -> anyhow::Result<()> {
    if password.is_empty() {
        bail!("the password is empty; give one");
    }
    if password.len() > PASSWORD_OCTETS_MAX {
        bail!("the password is over {PASSWORD_OCTETS_MAX} octets; use a shorter one");
    }
    if password.contains('\0') {
        bail!("the password holds a NUL character, which SASL PLAIN cannot carry; use another");
    }
    Ok(())
}

/// Argon2id with the default parameters and a 16-octet salt from ring's SystemRandom
/// (argon2 is built without its rand_core/getrandom feature, so SaltString::generate
/// has no OsRng here).
fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; argon2::password_hash::Salt::RECOMMENDED_LENGTH];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("encoding the salt: {e}"))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow!("hashing the password: {e}"))?;
    Ok(hash.to_string())
}

/// Replaces the line for `name` in the file at `path` with `line`, or appends it, and
/// writes the file atomically with mode 0600. Other lines are kept as they are; a
/// second line for `name` (a hand edit) is dropped.
fn upsert_line(path: &Path, name: &str, line: &str) -> anyhow::Result<()> {
    let old = match fs::read(path) {
        Ok(octets) => String::from_utf8(octets).map_err(|_| {
            anyhow!(
                "{}: not UTF-8 text; is this the right file?",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut text = String::with_capacity(old.len() + line.len() + 1);
    let mut replaced = false;
    for old_line in old.lines() {
        let is_for_name =
            !is_blank_or_comment(old_line) && old_line.split(':').next() == Some(name);
        if !is_for_name {
            text.push_str(old_line);
        } else if !replaced {
            text.push_str(line);
            replaced = true;
        } else {
            continue;
        }
        text.push('\n');
    }
    if !replaced {
        text.push_str(line);
        text.push('\n');
    }
    write_atomic_0600(path, text.as_bytes())
}

/// Writes `contents` to `path` through a temporary file in the same directory (so the
/// rename cannot cross filesystems): create 0600, write, fsync, rename, fsync the
/// directory so the rename itself survives a crash. A file that exists keeps its
/// owner and group (root adding a user to the service user's file must not take it
/// from the service, which reads it again on SIGHUP).
fn write_atomic_0600(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(path).ok().map(|m| (m.uid(), m.gid()));
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    let temp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        fastrand::u64(..)
    ));
    let result = write_new_0600(&temp, contents, owner).and_then(|()| {
        fs::rename(&temp, path).with_context(|| format!("renaming to {}", path.display()))
    });
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = fs::remove_file(&temp);
    }
    result?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn write_new_0600(temp: &Path, contents: &[u8], owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    let context = || format!("writing {}", temp.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)
        .with_context(context)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).with_context(|| {
            format!(
                "the file belongs to {}; run this as that user or as root, so it keeps its owner",
                crate::host::accounts::describe_user(uid)
            )
        })?;
    }
    // The umask can only take bits away from 0600; set it again so a umask such as
    // 0277 does not leave a file its owner cannot rewrite next time.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(context)?;
    file.write_all(contents).with_context(context)?;
    file.sync_all().with_context(context)
}

fn sha256(octets: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, octets);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hmac_md5_hex(key: &[u8], message: &[u8]) -> String {
    // HMAC takes a key of any length (RFC 2104 section 2), so this cannot fail.
    let mut mac = HmacMd5::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    hex_lower(&mac.finalize().into_bytes())
}

/// Equality whose time depends only on the lengths (which are public here: digests of
/// a fixed size), not on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn hex_lower(octets: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * octets.len());
    for &octet in octets {
        out.push(char::from(DIGITS[usize::from(octet >> 4)]));
        out.push(char::from(DIGITS[usize::from(octet & 0xf)]));
    }
    out
}

fn parse_hex_32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "volley-auth-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// RFC 2195 section 2's example: user tim, password tanstaaftanstaaf.
    const RFC2195_CHALLENGE: &str = "<1896.697170952@postoffice.reston.mci.net>";
    const RFC2195_DIGEST: &str = "b913a602c7eda7a495b4e6e7334d3890";

    /// A users file written by hand, so loading it costs no Argon2 hash.
    fn users_from(dir: &TempDir, text: &str) -> Result<Users, Vec<String>> {
        let path = dir.0.join("users");
        write_0600(&path, text);
        Users::load(&path)
    }

    /// Writes a file as `add_user` would leave it: mode 0600, so the load's check passes.
    fn write_0600(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn a_users_or_tokens_file_others_may_read_is_refused_with_the_chmod() {
        let dir = TempDir::new();
        let path = dir.0.join("users");
        fs::write(&path, format!("alice:{DUMMY_PHC}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let errors = Users::load(&path).unwrap_err();
        assert_eq!(errors.len(), 1);
        let want = format!(
            "users file {0} is mode 0640: its group may use it; fix: chmod 600 {0}",
            path.display()
        );
        assert!(errors[0].starts_with(&want), "{}", errors[0]);
        assert!(!errors[0].contains("argon2"), "{}", errors[0]);
        let path = dir.0.join("tokens");
        fs::write(&path, format!("ops:{}\n", "ab".repeat(32))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o604)).unwrap();
        let errors = Tokens::load(&path).unwrap_err();
        assert!(errors[0].starts_with("tokens file "), "{}", errors[0]);
        assert!(errors[0].contains("chmod 600"), "{}", errors[0]);
    }

    #[test]
    fn a_bad_name_field_is_not_quoted_as_it_may_be_a_password() {
        let dir = TempDir::new();
        let errors = users_from(&dir, &format!("alice hunter2:{DUMMY_PHC}\n")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("octet 6 is not printable"),
            "{}",
            errors[0]
        );
        assert!(!errors[0].contains("hunter2"), "{}", errors[0]);
        let errors = users_from(&dir, "alice:hunter2\nbob:hunter2:cram-md5=hunter2\n").unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        for e in &errors {
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn an_added_user_logs_in_with_the_right_password_only() {
        let dir = TempDir::new();
        let path = dir.0.join("users");
        add_user(&path, "alice", "correct horse", false).unwrap();
        let users = Users::load(&path).unwrap();
        assert_eq!(users.len(), 1);
        assert!(users.verify_plain("alice", "correct horse"));
        assert!(!users.verify_plain("alice", "correct horse "));
        assert!(!users.verify_plain("bob", "correct horse"));
        // An unknown name is checked against the dummy, which must parse to cost a hash.
        assert_eq!(check_phc(DUMMY_PHC), Ok(()));
        assert!(!users.has_cram_md5("alice"));
    }

    #[test]
    fn the_users_file_is_0600_even_with_umask_022() {
        let dir = TempDir::new();
        let path = dir.0.join("users");
        // SAFETY: umask only swaps the process's file mode mask; no memory involved.
        // 022 is the usual default, so the other tests running meanwhile are unaffected.
        let before = unsafe { libc::umask(0o022) };
        let added = add_user(&path, "alice", "pw", false);
        // SAFETY: as above.
        unsafe { libc::umask(before) };
        added.unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn root_rewriting_a_file_keeps_its_owner() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: root_rewriting_a_file_keeps_its_owner needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = TempDir::new();
        let (users, tokens) = (dir.0.join("users"), dir.0.join("tokens"));
        add_user(&users, "alice", "pw", false).unwrap();
        add_token(&tokens, "ops", None).unwrap();
        // The service user's files (nobody here), as the unit that runs as it needs.
        for p in [&users, &tokens] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        }
        add_user(&users, "bob", "pw2", false).unwrap();
        add_token(&tokens, "ci", None).unwrap();
        for p in [&users, &tokens] {
            let m = fs::metadata(p).unwrap();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o600));
        }
        assert!(fs::read_to_string(&users).unwrap().contains("bob:"));
    }

    #[test]
    fn replacing_a_user_keeps_one_line_and_the_other_lines() {
        let dir = TempDir::new();
        let path = dir.0.join("users");
        let other = format!("bob:{DUMMY_PHC}");
        write_0600(&path, &format!("# staff\n{other}\n"));
        add_user(&path, "alice", "first", true).unwrap();
        add_user(&path, "alice", "second", false).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[..2], ["# staff", other.as_str()]);
        assert!(lines[2].starts_with("alice:$argon2id$v=19$"));
        let users = Users::load(&path).unwrap();
        assert!(!users.has_cram_md5("alice"), "replaced without --cram-md5");
        assert!(users.verify_plain("alice", "second"));
    }

    #[test]
    fn cram_md5_accepts_the_rfc_2195_example() {
        let dir = TempDir::new();
        let secret = STANDARD.encode("tanstaaftanstaaf");
        let text = format!("tim:{DUMMY_PHC}:cram-md5={secret}\nann:{DUMMY_PHC}\n");
        let users = users_from(&dir, &text).unwrap();
        assert!(users.has_cram_md5("tim"));
        assert!(users.verify_cram_md5("tim", RFC2195_CHALLENGE, RFC2195_DIGEST));
        let upper = RFC2195_DIGEST.to_ascii_uppercase();
        assert!(users.verify_cram_md5("tim", RFC2195_CHALLENGE, &upper));
        assert!(!users.verify_cram_md5("tim", "<1897.697170952@x>", RFC2195_DIGEST));
        assert!(!users.verify_cram_md5("tim", RFC2195_CHALLENGE, &RFC2195_DIGEST[1..]));
        assert!(!users.has_cram_md5("ann"));
        assert!(!users.verify_cram_md5("ann", RFC2195_CHALLENGE, RFC2195_DIGEST));
        assert!(!users.verify_cram_md5("nobody", RFC2195_CHALLENGE, RFC2195_DIGEST));
    }

    #[test]
    fn a_cram_md5_response_decodes_to_user_and_digest() {
        // The RFC 2195 example's response as the client sends it.
        let response = "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw";
        let decoded = decode_cram_md5(response).unwrap();
        assert_eq!(decoded, ("tim".to_owned(), RFC2195_DIGEST.to_owned()));
        let no_digest = STANDARD.encode("tim b913");
        assert_eq!(decode_cram_md5(&no_digest), Err(SaslError::CramMd5Shape));
        let no_user = STANDARD.encode(format!(" {RFC2195_DIGEST}"));
        assert_eq!(decode_cram_md5(&no_user), Err(SaslError::CramMd5Shape));
        assert_eq!(decode_cram_md5("*"), Err(SaslError::Cancelled));
    }

    #[test]
    fn a_challenge_is_random_dot_time_at_hostname() {
        assert_eq!(
            cram_md5_challenge_from("mx.example", 1896, 697170952),
            "<1896.697170952@mx.example>"
        );
        let challenge = cram_md5_challenge("mx.example");
        assert!(challenge.starts_with('<') && challenge.ends_with("@mx.example>"));
        assert_ne!(challenge, cram_md5_challenge("mx.example"));
    }

    #[test]
    fn plain_decodes_with_and_without_authzid() {
        let without = STANDARD.encode("\0tim\0tanstaaf");
        let pair = ("tim".to_owned(), "tanstaaf".to_owned());
        assert_eq!(decode_plain(&without), Ok(pair.clone()));
        let same = STANDARD.encode("tim\0tim\0tanstaaf");
        assert_eq!(decode_plain(&same), Ok(pair));
        let other = STANDARD.encode("root\0tim\0tanstaaf");
        assert_eq!(decode_plain(&other), Err(SaslError::AuthzidMismatch));
    }

    #[test]
    fn plain_refuses_malformed_messages() {
        let cases = [
            ("not base64!", SaslError::Base64),
            ("*", SaslError::Cancelled),
            ("=", SaslError::PlainShape),
            (&*STANDARD.encode("tim\0pw"), SaslError::PlainShape),
            (&*STANDARD.encode("\0tim\0pw\0x"), SaslError::PlainShape),
            (&*STANDARD.encode("\0\0pw"), SaslError::PlainEmpty),
            (&*STANDARD.encode("\0tim\0"), SaslError::PlainEmpty),
            (&*STANDARD.encode(b"\0tim\0\xff"), SaslError::NotUtf8),
        ];
        for (input, error) in cases {
            assert_eq!(decode_plain(input), Err(error), "{input}");
        }
        let long = "A".repeat(SASL_LINE_OCTETS_MAX + 4);
        assert_eq!(decode_plain(&long), Err(SaslError::TooLong));
    }

    #[test]
    fn a_login_step_decodes_to_text() {
        assert_eq!(decode_base64_line("dGlt\r\n"), Ok("tim".to_owned()));
        assert_eq!(decode_base64_line("="), Ok(String::new()));
        assert_eq!(decode_base64_line("*"), Err(SaslError::Cancelled));
    }

    #[test]
    fn a_bad_users_line_is_named_with_its_line_number() {
        let dir = TempDir::new();
        let argon2i = DUMMY_PHC.replacen("argon2id", "argon2i", 1);
        let text = format!(
            "# users\n\nalice:{DUMMY_PHC}\nbob\ncarol:{argon2i}\n\
             dan:{DUMMY_PHC}:cram-md5=!!\nalice:{DUMMY_PHC}\nbad name:{DUMMY_PHC}\n"
        );
        let errors = users_from(&dir, &text).unwrap_err();
        let at = dir.0.join("users").display().to_string();
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.strip_prefix(&at).unwrap().split(':').nth(1).unwrap())
            .collect();
        assert_eq!(lines, ["4", "5", "6", "7", "8"], "{errors:#?}");
        assert!(errors[1].contains("not argon2id"), "{}", errors[1]);
        assert!(errors.iter().all(|e| e.contains("; ")), "{errors:#?}");
    }

    #[test]
    fn names_are_bounded_printable_ascii_without_colons() {
        assert!(check_name("alice@example.com").is_ok());
        assert!(check_name(&"a".repeat(NAME_OCTETS_MAX)).is_ok());
        for bad in [
            "",
            "a:b",
            "a b",
            "tab\t",
            "é",
            &"a".repeat(NAME_OCTETS_MAX + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_found_by_name_and_a_wrong_one_refused() {
        let dir = TempDir::new();
        let path = dir.0.join("tokens");
        let first = add_token(&path, "crm", None).unwrap();
        let second = add_token(&path, "billing", None).unwrap();
        assert!(first.starts_with(TOKEN_PREFIX));
        assert_eq!(first.len(), TOKEN_PREFIX.len() + 43);
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.check_scope(&first, Scope::Read).ok(), Some("crm"));
        assert_eq!(
            tokens.check_scope(&second, Scope::Read).ok(),
            Some("billing")
        );
        assert_eq!(
            tokens
                .check_scope(&first[..first.len() - 1], Scope::Read)
                .ok(),
            None
        );
        assert_eq!(tokens.check_scope("", Scope::Read).ok(), None);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_token_may_do_what_its_scopes_say_and_an_old_line_everything() {
        let dir = TempDir::new();
        let path = dir.0.join("tokens");
        let all = add_token(&path, "ops", None).unwrap();
        let crm = add_token(&path, "crm", Some(parse_scopes("inject").unwrap())).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("crm:") && l.ends_with(":inject")),
            "{text}"
        );
        assert!(text
            .lines()
            .any(|l| l.starts_with("ops:") && l.matches(':').count() == 1));
        let tokens = Tokens::load(&path).unwrap();
        for s in SCOPES {
            assert_eq!(tokens.check_scope(&all, s), Ok("ops"));
        }
        assert_eq!(tokens.check_scope(&crm, Scope::Inject), Ok("crm"));
        assert_eq!(
            tokens.check_scope(&crm, Scope::Control),
            Err(Some("token `crm` may inject, not control".into()))
        );
        assert_eq!(tokens.check_scope("vly_nope", Scope::Read), Err(None));
        let set = parse_scopes("read,control").unwrap();
        assert!(set.contains(Scope::Read) && set.contains(Scope::Control));
        assert!(!set.contains(Scope::Inject));
        assert_eq!(set.to_string(), "read,control");
        assert_eq!(Scopes::ALL.to_string(), "inject,read,control");
        assert!(parse_scopes("read,read").unwrap_err().contains("twice"));
        assert!(parse_scopes("admin").unwrap_err().contains("not one of"));
        assert!(parse_scopes("").is_err());
        // A hand-edited line with a bad scope is named with its line, and nothing of
        // the field is quoted (it may be a secret pasted in the wrong place).
        fs::write(
            &path,
            format!("{}:{}\n", "x", "a".repeat(64) + ":inject,s3cret"),
        )
        .unwrap();
        let errs = Tokens::load(&path).unwrap_err();
        assert!(errs[0].contains(":1: the scopes field is not"), "{errs:?}");
        assert!(!errs[0].contains("s3cret"), "{errs:?}");
    }

    #[test]
    fn making_a_token_again_revokes_the_old_one() {
        let dir = TempDir::new();
        let path = dir.0.join("tokens");
        let old = add_token(&path, "crm", None).unwrap();
        let new = add_token(&path, "crm", None).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens.check_scope(&old, Scope::Read).ok(), None);
        assert_eq!(tokens.check_scope(&new, Scope::Read).ok(), Some("crm"));
    }

    #[test]
    fn a_bad_tokens_line_is_named_with_its_line_number() {
        let dir = TempDir::new();
        let path = dir.0.join("tokens");
        let hex = "ab".repeat(32);
        write_0600(&path, &format!("crm:{hex}\ncrm:{hex}\nx:abc\nnocolon\n"));
        let errors = Tokens::load(&path).unwrap_err();
        let at = path.display();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        for (error, line) in errors.iter().zip([2, 3, 4]) {
            assert!(error.starts_with(&format!("{at}:{line}: ")), "{error}");
        }
    }

    #[test]
    fn a_missing_file_is_one_error_naming_it() {
        let dir = TempDir::new();
        let path = dir.0.join("absent");
        let errors = Users::load(&path).unwrap_err();
        assert_eq!(errors.len(), 1);
        let want = format!("users file {}: cannot read it", path.display());
        assert!(errors[0].starts_with(&want), "{}", errors[0]);
    }
}
