//! `volley check`: everything `send` would refuse a campaign for (rows, template, DKIM
//! key, EHLO name), found before anything is queued, with each problem's file:line.

use super::{ehlo_name, print_problems, print_warnings, report_compliance};
use volley::message::campaign::Campaign;

pub(crate) fn run(
    dir: &std::path::Path,
    dkim_dir: &std::path::Path,
    ehlo: Option<&str>,
    skip_bad_rows: bool,
) -> anyhow::Result<i32> {
    let ehlo_ok = match ehlo_name(ehlo) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("volley: {e:#}");
            false
        }
    };
    let c = match Campaign::load(dir) {
        Ok(c) => c,
        Err(problems) => {
            print_problems(dir, &problems);
            eprintln!(
                "volley: {} problem(s); nothing was checked past them",
                problems.len()
            );
            return Ok(1);
        }
    };
    let signing = match volley::message::dkim::key_for(dkim_dir, &c.settings) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{}/campaign.toml: {e}", dir.display());
            return Ok(1);
        }
    };
    let (mut bad, mut skipped, mut good) = (0u64, 0u64, 0u64);
    let streamed = c
        .recipients(
            |_| {
                good += 1;
                Ok(())
            },
            |b| {
                if skip_bad_rows && b.error.skippable() {
                    skipped += 1;
                } else {
                    bad += 1;
                }
                if (bad + skipped) as usize <= volley::message::campaign::ERRORS_LISTED_MAX {
                    eprintln!("{}/{}", dir.display(), b.problem());
                }
            },
        )
        .map_err(|p| anyhow::anyhow!("{}/{p}", dir.display()))?;
    let rows = streamed.rows;
    if (bad + skipped) as usize > volley::message::campaign::ERRORS_LISTED_MAX {
        eprintln!(
            "... and {} more",
            (bad + skipped) as usize - volley::message::campaign::ERRORS_LISTED_MAX
        );
    }
    print_warnings(dir, &c.template_warnings);
    print_warnings(dir, &streamed.warnings);
    if bad > 0 || good == 0 {
        if rows == 0 {
            eprintln!("{}/recipients.csv: no recipients", dir.display());
        }
        eprintln!(
            "volley: campaign {} has {} bad row(s) of {rows}",
            c.settings.id,
            bad + skipped
        );
        return Ok(1);
    }
    if !ehlo_ok {
        return Ok(1);
    }
    report_compliance(dir, &c);
    if skipped > 0 {
        println!(
            "campaign {}: {skipped} bad row(s) would be skipped (--skip-bad-rows), each logged as a local bounce",
            c.settings.id
        );
    }
    match signing {
        Some(k) => println!(
            "campaign {}: ok, {good} recipients, DKIM d={} {}",
            c.settings.id,
            k.domain,
            k.keys
                .iter()
                .map(|f| format!("s={} ({})", f.selector, f.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => println!(
            "campaign {}: ok, {good} recipients, not DKIM-signed (dkim = false)",
            c.settings.id
        ),
    }
    Ok(0)
}
