//! The sandbox's only way out when its network is isolated (`ORCH_AGENT_SANDBOX_NETWORK=
//! isolated`): an HTTP proxy of the launcher's on a unix socket in the job's directory,
//! bound into the sandbox and bridged to loopback ports inside it by `socat`. It lets
//! through only the hosts of the run's allow-list — the model API's and the profile's
//! `network` — whatever program asks: `CONNECT host:port` (HTTPS through `HTTPS_PROXY`), an
//! absolute URI (plain HTTP through `HTTP_PROXY`), or an origin-form request whose `Host`
//! names the target (the model API on loopback, forwarded port for port). Anything else is
//! answered 403 naming the host, and logged.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Hosts a run may reach: exact names, or `*.suffix` for any name below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<String>);

impl AllowList {
    /// Whether `host` (a name or an address, without port) may be reached.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().any(|a| {
            let a = a.to_ascii_lowercase();
            match a.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => host == a,
            }
        })
    }
}

/// The host and port of a URL (`http(s)://host[:port]/...`), the port defaulted by scheme.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    split_host_port(authority, default)
}

fn split_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// A run's proxy: serving while this lives; the socket goes with it.
pub struct Egress {
    pub socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Egress {
    /// Listens on `socket` (replaced if it exists) for `job_id`'s sandbox.
    pub fn start(socket: &Path, allow: AllowList, job_id: String) -> std::io::Result<Egress> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (allow, job_id) = (allow.clone(), job_id.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &allow, &job_id).await {
                        tracing::debug!(job_id, error = %e, "egress connection ended");
                    }
                });
            }
        });
        Ok(Egress {
            socket: socket.to_path_buf(),
            task,
        })
    }
}

/// The request head's end, at most this far in: a head is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

async fn serve(mut conn: UnixStream, allow: &AllowList, job_id: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return refuse(&mut conn, 431, "request head too large").await;
        }
        let mut chunk = [0u8; 2048];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    let host_header = lines
        .clone()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("host")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    // Where to, and what to send upstream first.
    let (host, port, upstream_head) = if method == "CONNECT" {
        let Some((h, p)) = split_host_port(target, 443) else {
            return refuse(&mut conn, 400, "CONNECT needs host:port").await;
        };
        (h, p, None)
    } else if let Some(after_scheme) = target.strip_prefix("http://") {
        let Some((h, p)) = host_port(target) else {
            return refuse(&mut conn, 400, "bad absolute URI").await;
        };
        let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
        let rest = &head[request_line.len()..];
        (h, p, Some(format!("{method} {path} {version}{rest}")))
    } else {
        let Some((h, p)) = split_host_port(&host_header, 80) else {
            return refuse(&mut conn, 400, "no Host header").await;
        };
        (h, p, Some(head.clone()))
    };
    if !allow.allows(&host) {
        tracing::warn!(
            job_id,
            host,
            port,
            "egress refused: the host is not in the run's allow-list"
        );
        return refuse(
            &mut conn,
            403,
            &format!("{host} is not in this agent's network allow-list"),
        )
        .await;
    }
    let mut up = match TcpStream::connect((host.as_str(), port)).await {
        Ok(s) => s,
        Err(e) => return refuse(&mut conn, 502, &format!("cannot reach {host}:{port}: {e}")).await,
    };
    match upstream_head {
        None => {
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
        }
        Some(h) => up.write_all(h.as_bytes()).await?,
    }
    // What followed the head (a body already read).
    if head_end < buf.len() {
        up.write_all(&buf[head_end..]).await?;
    }
    tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
    Ok(())
}

async fn refuse(conn: &mut UnixStream, code: u16, why: &str) -> std::io::Result<()> {
    let reason = match code {
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Bad Request",
    };
    let body = format!("orchestrator egress: {why}\n");
    let answer = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(answer.as_bytes()).await?;
    conn.shutdown().await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_matches_names_and_suffixes_only() {
        let a = AllowList(vec![
            "api.anthropic.com".into(),
            "*.pythonhosted.org".into(),
        ]);
        assert!(a.allows("api.anthropic.com"));
        assert!(a.allows("API.Anthropic.com."));
        assert!(a.allows("files.pythonhosted.org"));
        assert!(!a.allows("pythonhosted.org"));
        assert!(!a.allows("api.anthropic.com.evil.example"));
        assert!(!a.allows("evil-api.anthropic.com"));
        assert!(!a.allows("example.com"));
    }

    #[test]
    fn hosts_and_ports_come_from_urls_and_authorities() {
        assert_eq!(
            host_port("https://api.anthropic.com/v1"),
            Some(("api.anthropic.com".into(), 443))
        );
        assert_eq!(
            host_port("http://127.0.0.1:4321"),
            Some(("127.0.0.1".into(), 4321))
        );
        assert_eq!(host_port("http://u:p@h:81/x"), Some(("h".into(), 81)));
        assert_eq!(host_port("ftp://h"), None);
        assert_eq!(
            split_host_port("[::1]:8080", 80),
            Some(("::1".into(), 8080))
        );
        assert_eq!(split_host_port("h", 443), Some(("h".into(), 443)));
        assert_eq!(split_host_port(":80", 443), None);
    }
}
