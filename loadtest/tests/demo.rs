//! `volley-load demo` from the command line, as the README's first step runs it: the
//! bundled sink and DNS, a generated campaign through a temporary spool, the engine's
//! report checked against what the sink received. Small here, so a debug build ends
//! in seconds.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RECIPIENTS: u64 = 2000;
/// How long the demo may take before the test fails (seconds in a debug build).
const LIMIT: Duration = Duration::from_secs(120);

/// The demo, killed if the test fails before it ends (an orphan would hold the pipes
/// that `cargo test`, and whoever waits on it, hold).
struct Run(Option<Child>);

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn the_demo_delivers_every_recipient_once_and_intact() {
    let mut run = Run(Some(
        Command::new(env!("CARGO_BIN_EXE_volley-load"))
            .args(["demo", "--recipients", &RECIPIENTS.to_string()])
            .args(["--shards", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let t = Instant::now();
    while run.0.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(t.elapsed() < LIMIT, "the demo did not end within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run.0.take().unwrap().wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let line = |start: &str| -> &str {
        stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line in:\n{stdout}"))
    };
    assert!(
        line("demo: generated ")
            .starts_with(&format!("demo: generated {RECIPIENTS} recipients over ")),
        "{stdout}"
    );
    assert!(
        line("demo: queued ").starts_with(&format!("demo: queued {RECIPIENTS} recipients durably")),
        "{stdout}"
    );
    // The engine's report: every recipient delivered, none left.
    for (label, n) in [
        ("recipients", RECIPIENTS),
        ("delivered", RECIPIENTS),
        ("bounced", 0),
        ("expired", 0),
        ("still queued", 0),
    ] {
        let l = line(&format!("{label} "));
        assert_eq!(
            l.split_whitespace().last(),
            Some(n.to_string().as_str()),
            "{l}\n{stdout}"
        );
    }
    // What the sink received: each once, every body matching its integrity header.
    assert_eq!(
        line("sink "),
        format!(
            "sink         accepted {RECIPIENTS} recipients, 0 duplicates, 0 corrupt, 0 without integrity header"
        ),
        "{stdout}"
    );
    // The spool was temporary.
    let log = line("accounting ").trim_start_matches("accounting").trim();
    assert!(
        log.ends_with("accounting.jsonl") && !std::path::Path::new(log).exists(),
        "{log} left behind"
    );
}
