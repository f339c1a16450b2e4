//! [`MigrationUri`]: where a stream goes or comes from, parsed from the `unix:PATH`,
//! `tcp:HOST:PORT` and `file:PATH` forms of the command line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP connection; `host` is a name, an IPv4 address or an IPv6 address (written
    /// in brackets in the URI).
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port (0 when listening: any free port).
        port: u16,
    },
    /// A snapshot file.
    File(PathBuf),
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme:` prefix.
    #[error("migration URI {0:?} has no scheme (expected unix:PATH, tcp:HOST:PORT or file:PATH)")]
    MissingScheme(String),
    /// A scheme other than unix, tcp and file.
    #[error("migration URI {uri:?}: unknown scheme {scheme:?} (expected unix, tcp or file)")]
    UnknownScheme {
        /// The whole URI.
        uri: String,
        /// The scheme found.
        scheme: String,
    },
    /// `unix:` or `file:` with no path.
    #[error("migration URI {0:?} has an empty path")]
    EmptyPath(String),
    /// `tcp:` with no `:PORT`.
    #[error("migration URI {0:?} has no port (expected tcp:HOST:PORT)")]
    MissingPort(String),
    /// A port that is not a number in 0..=65535.
    #[error("migration URI {uri:?}: bad port {port:?}")]
    BadPort {
        /// The whole URI.
        uri: String,
        /// The port text.
        port: String,
    },
    /// `tcp:` with an empty host, or an unclosed `[`.
    #[error("migration URI {0:?} has no valid host")]
    BadHost(String),
}

impl FromStr for MigrationUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<MigrationUri, UriError> {
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| UriError::MissingScheme(uri.to_string()))?;
        match scheme {
            "unix" | "file" if rest.is_empty() => Err(UriError::EmptyPath(uri.to_string())),
            "unix" => Ok(MigrationUri::Unix(rest.into())),
            "file" => Ok(MigrationUri::File(rest.into())),
            "tcp" => parse_tcp(uri, rest),
            _ => Err(UriError::UnknownScheme {
                uri: uri.to_string(),
                scheme: scheme.to_string(),
            }),
        }
    }
}

fn parse_tcp(uri: &str, rest: &str) -> Result<MigrationUri, UriError> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| UriError::BadHost(uri.to_string()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| UriError::MissingPort(uri.to_string()))?;
        (host, port)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| UriError::MissingPort(uri.to_string()))?
    };
    if host.is_empty() || (!rest.starts_with('[') && host.contains(':')) {
        return Err(UriError::BadHost(uri.to_string()));
    }
    // Digits only: u16's parser would also take a sign ("+80").
    let port = Some(port)
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| UriError::BadPort {
            uri: uri.to_string(),
            port: port.to_string(),
        })?;
    Ok(MigrationUri::Tcp {
        host: host.to_string(),
        port,
    })
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_uris_parse_and_print_back() {
        for s in [
            "unix:/tmp/m.sock",
            "unix:rel/path",
            "file:/tmp/snap",
            "tcp:127.0.0.1:4444",
            "tcp:localhost:0",
            "tcp:[::1]:65535",
        ] {
            let u: MigrationUri = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
        assert_eq!(
            "tcp:[::1]:5".parse::<MigrationUri>().unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 5
            }
        );
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        let e = |s: &str| s.parse::<MigrationUri>().unwrap_err();
        assert!(matches!(e("/tmp/x"), UriError::MissingScheme(_)));
        assert!(matches!(e("exec:cat"), UriError::UnknownScheme { .. }));
        assert!(matches!(e("unix:"), UriError::EmptyPath(_)));
        assert!(matches!(e("file:"), UriError::EmptyPath(_)));
        assert!(matches!(e("tcp:host"), UriError::MissingPort(_)));
        assert!(matches!(e("tcp:host:99999"), UriError::BadPort { .. }));
        assert!(matches!(e("tcp:host:x"), UriError::BadPort { .. }));
        assert!(matches!(e("tcp:host:+80"), UriError::BadPort { .. }));
        assert!(matches!(e("tcp:host:"), UriError::BadPort { .. }));
        assert!(matches!(e("tcp::80"), UriError::BadHost(_)));
        assert!(matches!(e("tcp:::1:80"), UriError::BadHost(_)));
        assert!(matches!(e("tcp:[::1:80"), UriError::BadHost(_)));
        assert!(matches!(e("tcp:[::1]"), UriError::MissingPort(_)));
        assert!(e("exec:cat")
            .to_string()
            .contains("unknown scheme \"exec\""));
    }
}
