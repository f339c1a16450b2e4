//! The thin clients `vmm status|pause|resume|quit|ram-add|ram-remove --api-socket PATH`:
//! one request, one answer. An `{"ok":true}` answer is printed on stdout (`status` pretty,
//! the others as one line); a refusal becomes a [`ClientError`] carrying the VMM's error.

use super::protocol::Request;
use serde_json::Value;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for the answer (a pause waits up to 2 s for the vCPUs).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest answer line accepted.
const MAX_ANSWER: u64 = 16 << 20;

/// Why a thin client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket there, or nobody listening.
    #[error("cannot connect to api socket {path}: {source}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("api socket {path}: {what}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The connection closed before an answer.
    #[error("api socket {0}: the VMM closed the connection without answering")]
    NoAnswer(PathBuf),
    /// The answer is not a JSON object with `ok`.
    #[error("api socket {path}: not an answer: {line:?}")]
    BadAnswer {
        /// The socket's path.
        path: PathBuf,
        /// What came back (cut short).
        line: String,
    },
    /// The VMM refused the request; its error.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the VMM at `path`; returns its `{"ok":true}` answer.
pub fn request(path: &Path, request: &Request) -> Result<Value, ClientError> {
    let io_err = |what| {
        move |source| ClientError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(io_err("setting timeouts"))?;
    stream
        .write_all(request.to_line().as_bytes())
        .map_err(io_err("sending the request"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .take(MAX_ANSWER)
        .read_line(&mut line)
        .map_err(io_err("reading the answer"))?;
    if line.is_empty() {
        return Err(ClientError::NoAnswer(path.to_path_buf()));
    }
    let bad = || ClientError::BadAnswer {
        path: path.to_path_buf(),
        line: line.chars().take(200).collect(),
    };
    let answer: Value = serde_json::from_str(&line).map_err(|_| bad())?;
    match answer.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(answer),
        Some(false) => Err(ClientError::Refused(
            answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("refused, with no reason given")
                .to_string(),
        )),
        None => Err(bad()),
    }
}

/// Sends `req` and returns what to print: `status` pretty, other answers on one line.
pub fn run(path: &Path, req: &Request) -> Result<String, ClientError> {
    let answer = request(path, req)?;
    let text = match req {
        Request::Status => serde_json::to_string_pretty(&answer),
        _ => serde_json::to_string(&answer),
    };
    // Re-encoding a parsed JSON value cannot fail.
    Ok(text.unwrap_or_default())
}

/// Prints `line` on stdout for a thin client. A reader that left (`vmm status | head -3`)
/// is no error: the answer was had, and the rest has nobody to go to.
pub fn print_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_socket_is_one_clear_error() {
        let path = Path::new("/nonexistent/vmm-api.sock");
        let e = run(path, &Request::Status).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot connect to api socket /nonexistent/vmm-api.sock: "),
            "{msg}"
        );
        assert_eq!(msg.lines().count(), 1);
    }
}
