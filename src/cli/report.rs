//! `volley report`: what happened to a campaign, read back from the accounting log,
//! so the answer does not depend on the run that sent it still being around.

use std::path::PathBuf;

pub(crate) fn run(
    campaign: String,
    log: PathBuf,
    json: bool,
    domains: usize,
) -> anyhow::Result<i32> {
    let r = volley::observe::report::report(&log, &campaign)?;
    if r.recipients_final + r.recipients_pending == 0 {
        eprintln!(
            "volley: campaign {campaign} has no records in {}",
            log.display()
        );
        return Ok(1);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        r.print(domains);
    }
    Ok(0)
}
