//! Tables, JSON and the small formats the commands print.

use anyhow::Result;
use clap::ValueEnum;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

const SECS_PER_MIN: u64 = 60;
const SECS_PER_HOUR: u64 = 3600;
const SECS_PER_DAY: u64 = 86_400;
const GIB: f64 = (1u64 << 30) as f64;

/// How long ago `unix_ms` was, roughly ("5m ago").
pub fn ago(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..SECS_PER_MIN => format!("{s}s ago"),
        SECS_PER_MIN..SECS_PER_HOUR => format!("{}m ago", s / SECS_PER_MIN),
        SECS_PER_HOUR..SECS_PER_DAY => format!("{}h ago", s / SECS_PER_HOUR),
        _ => format!("{}d ago", s / SECS_PER_DAY),
    }
}

pub fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / GIB)
}

pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

pub fn dash(o: &Option<String>) -> String {
    o.clone().unwrap_or_else(|| "-".into())
}

/// Comma-joined, or `-` when empty.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        outln!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Write raw text to stdout, ending quietly when it is closed.
pub fn print_raw(text: &str) {
    use std::io::Write as _;
    if std::io::stdout().write_all(text.as_bytes()).is_err() {
        std::process::exit(0);
    }
}

/// A byte progress bar for `what` (hashing, uploading, downloading).
pub fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}
