//! Spot interruption notices: the agent polls a metadata URL (AWS:
//! `http://169.254.169.254/latest/meta-data/spot/instance-action`; GCP:
//! `http://metadata.google.internal/computeMetadata/v1/instance/preempted`) or watches a
//! file, and tells the coordinator once, with the grace the notice leaves. The
//! coordinator stops new awards to the node and moves its attempts (SIGTERM with that
//! grace first, so they can checkpoint), without using a retry.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often the notice is looked for.
pub const NOTICE_POLL: Duration = Duration::from_secs(1);
/// Grace when a notice does not say when the node goes (GCP gives about 30 s).
pub const DEFAULT_GRACE_MS: u64 = 30_000;
/// Longest one poll of the URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of a notice read at most.
const MAX_NOTICE: usize = 16 << 10;

/// Where the notice comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeSource {
    Url(String),
    File(PathBuf),
}

/// What a notice's text means: the grace left at `now_ms`, or `None` when it is no
/// notice (GCP answers `FALSE` until it preempts).
pub fn parse_notice(body: &str, now_ms: u64) -> Option<u64> {
    let t = body.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("false") {
        return None;
    }
    // AWS: {"action": "terminate"|"stop"|"hibernate", "time": "2026-12-01T10:00:00Z"}
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(t) {
        if let Some(when) = v.get("time").and_then(|x| x.as_str()) {
            if let Ok(at) = humantime::parse_rfc3339(when) {
                let at_ms =
                    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                return Some(at_ms.saturating_sub(now_ms));
            }
        }
    }
    Some(DEFAULT_GRACE_MS)
}

/// The notice's text, if there is one now.
pub async fn read(source: &NoticeSource) -> Option<String> {
    match source {
        NoticeSource::File(p) => tokio::fs::read_to_string(p).await.ok(),
        NoticeSource::Url(u) => tokio::time::timeout(FETCH_TIMEOUT, get(u)).await.ok().flatten(),
    }
}

/// A plain-HTTP GET (metadata services are `http://` on a link-local address): the
/// body of a 200 answer, nothing otherwise.
async fn get(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = if host.contains(':') { host.to_string() } else { format!("{host}:80") };
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.take(MAX_NOTICE as u64).read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let ok = head.lines().next().is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    ok.then(|| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_give_their_grace() {
        let now = 1_700_000_000_000;
        let aws = r#"{"action": "terminate", "time": "2023-11-14T22:15:20Z"}"#;
        assert_eq!(parse_notice(aws, now), Some(120_000), "two minutes left");
        assert_eq!(parse_notice("TRUE", now), Some(DEFAULT_GRACE_MS));
        assert_eq!(parse_notice("FALSE\n", now), None);
        assert_eq!(parse_notice("", now), None);
        // A time already past leaves no grace.
        let past = r#"{"action": "stop", "time": "2001-01-01T00:00:00Z"}"#;
        assert_eq!(parse_notice(past, now), Some(0));
    }
}
