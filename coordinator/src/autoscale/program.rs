//! Running a pool's launch or terminate program, as Slurm runs `ResumeProgram`: JSON on
//! stdin, JSON on stdout (`{"instance": "..."}` for a launch), a non-zero exit with the
//! reason on stderr. A program that hangs is killed after a timeout; one that prints
//! something else counts as failed, with what it printed in the reason.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a program may run before it is killed.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of a program's stdout and stderr kept (the rest is read and dropped).
const MAX_OUTPUT: usize = 64 << 10;
/// Bytes of its stderr quoted in a failure's reason.
const REASON_BYTES: usize = 400;

/// Why a program did not do its job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    #[error("cannot start {program}: {why}")]
    Start { program: String, why: String },
    #[error("{program} ran past {secs} s and was killed")]
    Hung { program: String, secs: u64 },
    #[error("{program} exited with {status}: {stderr}")]
    Failed { program: String, status: String, stderr: String },
    #[error("{program} printed no JSON object: {printed:?}")]
    Garbage { program: String, printed: String },
}

/// Run `argv` with `input` as JSON on stdin; the JSON object it printed.
pub async fn run(
    argv: &[String],
    input: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Map<String, serde_json::Value>, ProgramError> {
    let program = argv.first().cloned().unwrap_or_default();
    let start = |why: String| ProgramError::Start { program: program.clone(), why };
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1.min(argv.len())..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| start(e.to_string()))?;
    let body = serde_json::to_vec(input).unwrap_or_default();
    let (mut stdin, mut stdout, mut stderr) =
        match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => (i, o, e),
            _ => return Err(start("no pipes".into())),
        };
    let work = async {
        // A program that does not read its input must not block us.
        let _ = stdin.write_all(&body).await;
        drop(stdin);
        let (out, err) = tokio::join!(read_capped(&mut stdout), read_capped(&mut stderr));
        (child.wait().await, out, err)
    };
    let (status, out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => return Err(ProgramError::Hung { program, secs: timeout.as_secs() }),
    };
    let status = status.map_err(|e| start(e.to_string()))?;
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err).trim().chars().take(REASON_BYTES).collect();
        return Err(ProgramError::Failed { program, status: status.to_string(), stderr });
    }
    match serde_json::from_slice::<serde_json::Value>(&out) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(ProgramError::Garbage {
            program,
            printed: String::from_utf8_lossy(&out).chars().take(REASON_BYTES).collect(),
        }),
    }
}

async fn read_capped(r: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn json_in_json_out_failures_hangs_and_garbage() {
        let input = serde_json::json!({ "node": "p-1" });
        let ok = run(
            &sh("read l; echo \"{\\\"instance\\\": \\\"i-$(echo $l | wc -c)\\\"}\""),
            &input,
            PROGRAM_TIMEOUT,
        )
        .await
        .unwrap();
        assert!(ok["instance"].as_str().unwrap().starts_with("i-"));
        let e = run(&sh("echo InsufficientInstanceCapacity >&2; exit 3"), &input, PROGRAM_TIMEOUT)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("exit status: 3: InsufficientInstanceCapacity"), "{e}");
        let e = run(&sh("sleep 30"), &input, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(e, ProgramError::Hung { .. }), "{e}");
        let e = run(&sh("echo '\u{1}garbage{'"), &input, PROGRAM_TIMEOUT).await.unwrap_err();
        assert!(e.to_string().contains("printed no JSON object"), "{e}");
        let e = run(&["/nonexistent/prog".to_string()], &input, PROGRAM_TIMEOUT).await.unwrap_err();
        assert!(matches!(e, ProgramError::Start { .. }), "{e}");
    }
}
