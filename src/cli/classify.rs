//! `volley classify`: replies from logs and DSNs classified by the same rules the
//! engine applies, so a rule can be tried on real replies before it is deployed.

pub(crate) fn run(rules: Option<&std::path::Path>) -> anyhow::Result<i32> {
    use std::io::{BufRead, Write};
    let c = volley::policy::classify::load(rules)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        // As found in logs and DSNs: wrappers dropped, a joined multi-line reply read whole.
        let v = match volley::policy::classify::parse_logged(line) {
            Ok(r) if r.is_positive() => serde_json::json!({
                "reply": line, "code": r.code, "enhanced": r.enhanced, "retry": false, "class": null, "rule": null
            }),
            Ok(r) => {
                let (v, rule) = c.classify_named(&r);
                serde_json::json!({
                    "reply": line, "code": r.code, "enhanced": r.enhanced, "retry": v.retry, "class": v.class, "rule": rule
                })
            }
            Err(e) => serde_json::json!({ "reply": line, "error": e.to_string() }),
        };
        serde_json::to_writer(&mut out, &v)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(0)
}
