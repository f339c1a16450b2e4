//! Creating the API's unix socket safely: mode 0600 from the moment it exists, a live VMM's
//! socket never taken over, a stale one (nobody listening) replaced, and the file removed
//! at exit only if it is still ours.
//!
//! The mode comes from the umask in force at `bind` (0177 for that call: Linux takes a
//! socket file's mode from it, and `fchmod` on the socket descriptor does not reach the
//! file); a `chmod` afterwards makes sure. The umask is process-wide: the runner creates
//! the socket before any vCPU or device thread exists.
//!
//! Known race: two VMMs started at the same instant on the same stale socket may both
//! find it stale; the second to unlink removes the first's fresh socket.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The socket file's mode.
pub const SOCKET_MODE: u32 = 0o600;

/// Why a control socket cannot be created; the messages name the socket's kind (`api`
/// for `--api-socket`, `qmp` for `--qmp`).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A VMM (or something) accepts connections there.
    #[error("{kind} socket {} is in use", .path.display())]
    InUse {
        /// `api` or `qmp`.
        kind: &'static str,
        /// The socket's path.
        path: PathBuf,
    },
    /// The path is a file, directory or symlink, not a socket: never removed.
    #[error("{kind} socket path {} exists and is not a socket", .path.display())]
    NotASocket {
        /// `api` or `qmp`.
        kind: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Checking, removing or creating failed.
    #[error("{kind} socket {}: {what}: {source}", .path.display())]
    Io {
        /// `api` or `qmp`.
        kind: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

/// The listening API socket; its file is removed on drop if it is still ours.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the file we created.
    file: (u64, u64),
    /// `api` or `qmp`, for messages.
    kind: &'static str,
}

impl ApiSocket {
    /// Creates and listens on `path` (non-blocking), for `--api-socket`.
    pub fn bind(path: &Path) -> Result<ApiSocket, SocketError> {
        ApiSocket::bind_as(path, "api")
    }

    /// Creates and listens on `path` (non-blocking), its errors naming it a `kind` socket
    /// (`qmp` for `--qmp`): the same rules whatever protocol it serves.
    pub fn bind_as(path: &Path, kind: &'static str) -> Result<ApiSocket, SocketError> {
        let io_err = |what| {
            move |source| SocketError::Io {
                kind,
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking the path")(e)),
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    kind,
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        kind,
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    log::info!("replacing stale {kind} socket {}", path.display());
                    match fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(io_err("removing the stale socket")(e))
                        }
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("checking whether a VMM listens there")(e)),
            },
        }
        let listener =
            with_umask(0o777 & !SOCKET_MODE, || UnixListener::bind(path)).map_err(|e| {
                match e.kind() {
                    io::ErrorKind::AddrInUse => SocketError::InUse {
                        kind,
                        path: path.to_path_buf(),
                    },
                    _ => io_err("creating the socket")(e),
                }
            })?;
        let socket = ApiSocket {
            kind,
            file: fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()))
                .map_err(io_err("checking the new socket"))?,
            listener,
            path: path.to_path_buf(),
        };
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_err("setting the socket's mode"))?;
        socket
            .listener
            .set_nonblocking(true)
            .map_err(io_err("making the socket non-blocking"))?;
        Ok(socket)
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file)
            .unwrap_or(false);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("removing {} socket {}: {e}", self.kind, self.path.display());
            }
        }
    }
}

/// Runs `f` with the process's umask set to `mask`, then restores it.
fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let result = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-sock-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn mode_in_use_stale_and_cleanup() {
        let d = dir("life");
        let path = d.join("api");
        let a = ApiSocket::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        assert!(matches!(
            ApiSocket::bind(&path),
            Err(SocketError::InUse { .. })
        ));
        assert_eq!(
            ApiSocket::bind(&path).unwrap_err().to_string(),
            format!("api socket {} is in use", path.display())
        );
        // The refused second bind left the first's file alone.
        assert!(path.exists());
        drop(a);
        assert!(!path.exists());
        // A stale socket (bound, nobody listening any more) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let b = ApiSocket::bind(&path).unwrap();
        drop(b);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn never_removes_what_is_not_a_socket() {
        let d = dir("file");
        let path = d.join("api");
        fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            ApiSocket::bind(&path),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_replaced_file_is_not_removed_at_exit() {
        let d = dir("replaced");
        let path = d.join("api");
        let a = ApiSocket::bind(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"someone else's").unwrap();
        drop(a);
        assert!(path.exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
