//! The shipped classifier measured on a labelled corpus of real replies
//! (corpus/replies.tsv; how rows are labelled: corpus/CONVENTIONS.md).
//! `cargo test -p volley --lib classify::accuracy -- --nocapture` prints the table.

use super::{parse_logged, Class, Classifier};
use std::collections::BTreeMap;
use std::fmt::Write;

const CORPUS: &str = include_str!("corpus/replies.tsv");
/// The targets of issue 13: a wrong retry decision costs more than a wrong class.
const RETRY_ACCURACY_MIN: f64 = 0.99;
const CLASS_ACCURACY_MIN: f64 = 0.85;
const CORPUS_ROWS_MIN: usize = 600;

struct Row<'a> {
    line: usize,
    reply: &'a str,
    class: Class,
    retry: bool,
}

fn rows() -> Vec<Row<'static>> {
    let mut out = Vec::new();
    for (i, l) in CORPUS.lines().enumerate().skip(1) {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(
            f.len(),
            4,
            "replies.tsv:{}: want 4 tab-separated columns",
            i + 1
        );
        let class: Class = serde_json::from_value(serde_json::Value::String(f[1].into()))
            .unwrap_or_else(|_| panic!("replies.tsv:{}: unknown class {:?}", i + 1, f[1]));
        let retry = match f[2] {
            "yes" => true,
            "no" => false,
            x => panic!("replies.tsv:{}: retry is yes or no, not {x:?}", i + 1),
        };
        assert!(!f[3].trim().is_empty(), "replies.tsv:{}: no source", i + 1);
        out.push(Row {
            line: i + 1,
            reply: f[0],
            class,
            retry,
        });
    }
    out
}

#[derive(Default)]
struct Tally {
    rows: usize,
    class_ok: usize,
    retry_ok: usize,
}

struct Report {
    per_class: BTreeMap<&'static str, Tally>,
    all: Tally,
    halves: [Tally; 2],
    misses: Vec<String>,
}

fn measure(c: &Classifier, rows: &[Row]) -> Report {
    let mut r = Report {
        per_class: BTreeMap::new(),
        all: Tally::default(),
        halves: [Tally::default(), Tally::default()],
        misses: Vec::new(),
    };
    for (n, row) in rows.iter().enumerate() {
        let reply = parse_logged(row.reply)
            .unwrap_or_else(|e| panic!("replies.tsv:{}: {e}: {}", row.line, row.reply));
        let (v, rule) = c.classify_named(&reply);
        let (class_ok, retry_ok) = (v.class == row.class, v.retry == row.retry);
        for t in [
            r.per_class.entry(row.class.name()).or_default(),
            &mut r.all,
            &mut r.halves[n % 2],
        ] {
            t.rows += 1;
            t.class_ok += usize::from(class_ok);
            t.retry_ok += usize::from(retry_ok);
        }
        if !(class_ok && retry_ok) {
            r.misses.push(format!(
                "replies.tsv:{}: want {}/{} got {}/{} ({}): {}",
                row.line,
                row.class,
                row.retry,
                v.class,
                v.retry,
                rule.unwrap_or("by code"),
                row.reply
            ));
        }
    }
    r
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

impl Report {
    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<18} {:>5} {:>8} {:>8}",
            "class", "rows", "class%", "retry%"
        );
        let line = |s: &mut String, name: &str, t: &Tally| {
            let _ = writeln!(
                s,
                "{name:<18} {:>5} {:>8.1} {:>8.1}",
                t.rows,
                pct(t.class_ok, t.rows),
                pct(t.retry_ok, t.rows)
            );
        };
        for (name, t) in &self.per_class {
            line(&mut s, name, t);
        }
        line(&mut s, "all", &self.all);
        line(&mut s, "even rows", &self.halves[0]);
        line(&mut s, "odd rows", &self.halves[1]);
        s
    }
}

#[test]
fn shipped_rules_meet_the_targets_on_the_corpus() {
    let rows = rows();
    let r = measure(&Classifier::shipped(), &rows);
    let table = r.table();
    println!("{table}");
    for m in &r.misses {
        println!("{m}");
    }
    let class = r.all.class_ok as f64 / r.all.rows as f64;
    let retry = r.all.retry_ok as f64 / r.all.rows as f64;
    assert!(
        class >= CLASS_ACCURACY_MIN && retry >= RETRY_ACCURACY_MIN,
        "class {:.1}% (want {}%), retry {:.1}% (want {}%)\n{table}{}",
        100.0 * class,
        100.0 * CLASS_ACCURACY_MIN,
        100.0 * retry,
        100.0 * RETRY_ACCURACY_MIN,
        r.misses.join("\n")
    );
}

#[test]
fn corpus_is_large_and_distinct() {
    let rows = rows();
    let distinct: std::collections::HashSet<&str> = rows.iter().map(|r| r.reply).collect();
    assert_eq!(distinct.len(), rows.len(), "a reply appears twice");
    assert!(
        rows.len() >= CORPUS_ROWS_MIN,
        "{} rows, want at least {CORPUS_ROWS_MIN}",
        rows.len()
    );
}
