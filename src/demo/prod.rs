//! The demo's "staging" and "production": directories under its workspace that its deploy
//! target's commands fill (`git archive` of the deployed sha), and a health endpoint for
//! production that the post-deploy watch probes.
//!
//! The endpoint is a task of the demo's own process, on 127.0.0.1 with a port from the OS:
//! it needs nothing installed and cannot outlive the demo, however the demo ends (a
//! process started by the deploy command would be orphaned by a SIGKILL). What it answers
//! is what the deploy command deployed: `<workspace>/prod/HEALTH`, written by the deploy
//! script with the tree it puts there — `ok`, or with `--break-prod` a failure for the
//! demo's change, which the rollback command replaces with the previous sha's `ok`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The demo's deploy script: `sh deploy.sh <place> <sha> <workspace> <mode> [<git dir>]`.
/// It puts the sha's tree in `<workspace>/<place>` with its `DEPLOYED_SHA` and `HEALTH`.
/// `mode` holds `reject-once` (the first deploy to that place fails, as `--reject` asks),
/// `break` (the deployed program's health fails: `--break-prod`) or `rollback`. The git
/// dir is the forge's bare repository for a rollback, which runs outside any checkout.
const DEPLOY_SCRIPT: &str = r#"set -e
place=$1 sha=$2 root=$3 mode=$4 gitdir=$5
case "$mode" in *reject-once*)
  if [ ! -e "$root/$place.rejected" ]; then
    : > "$root/$place.rejected"
    echo "the demo refuses the first deploy to $place (--reject)"
    exit 1
  fi
esac
rm -rf "$root/$place.new" && mkdir -p "$root/$place.new"
if [ -n "$gitdir" ]; then
  git --git-dir="$gitdir" archive "$sha" | tar -x -C "$root/$place.new"
else
  git archive "$sha" | tar -x -C "$root/$place.new"
fi
echo "$sha" > "$root/$place.new/DEPLOYED_SHA"
case "$mode" in
  *break*) echo "failing: this change breaks production (--break-prod)" ;;
  *) echo ok ;;
esac > "$root/$place.new/HEALTH"
rm -rf "$root/$place" && mv "$root/$place.new" "$root/$place"
case "$mode" in
  rollback) echo "rolled $place back to $sha in $root/$place" ;;
  *) echo "deployed $sha to $root/$place" ;;
esac
"#;

/// How the demo's deploy target behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// The first staging deploy fails (`--reject deploy-staging`).
    pub reject_staging: bool,
    /// The first production deploy fails (`--reject deploy`).
    pub reject_prod: bool,
    /// The production deploy of the demo's change answers 500 on its health (`--break-prod`).
    pub break_prod: bool,
}

/// Writes [`DEPLOY_SCRIPT`] and returns the sample repo's `ORCH_DEPLOY_TARGETS_JSON`:
/// staging and deploy commands, production's health URL, and the rollback that puts
/// `{previous_sha}` back from the forge's repository `bare`.
pub fn targets(
    root: &Path,
    bare: &Path,
    health_url: &str,
    how: Behaviour,
) -> std::io::Result<String> {
    let script = root.join("deploy.sh");
    std::fs::write(&script, DEPLOY_SCRIPT)?;
    let script = script.display().to_string();
    let root = root.display().to_string();
    let command = |place: &str, reject: bool, broken: bool| {
        let mut mode = vec![];
        if reject {
            mode.push("reject-once");
        }
        if broken {
            mode.push("break");
        }
        if mode.is_empty() {
            mode.push("once");
        }
        serde_json::json!(["sh", script, place, "{sha}", root, mode.join(",")])
    };
    Ok(serde_json::json!({
        super::REPO: {
            "staging_command": command("staging", how.reject_staging, false),
            "deploy_command": command("prod", how.reject_prod, how.break_prod),
            "timeout_s": 60,
            "health_url": health_url,
            "rollback_command": [
                "sh", script, "prod", "{previous_sha}", root, "rollback", bare.display().to_string()
            ],
        }
    })
    .to_string())
}

/// Production's health endpoint (see the module's doc); it stops when dropped.
pub struct HealthEndpoint {
    /// `http://127.0.0.1:<port>/health`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long one connection may take to send its request.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

impl HealthEndpoint {
    /// Serves `GET /health` for the production directory `prod` on 127.0.0.1, a port from
    /// the OS.
    pub async fn start(prod: PathBuf) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/health", listener.local_addr()?);
        let task = tokio::spawn(async move {
            loop {
                // One bad connection never ends the endpoint.
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let prod = prod.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_LIMIT, answer(stream, &prod)).await;
                });
            }
        });
        Ok(HealthEndpoint { url, task })
    }
}

/// What production's health is: (HTTP status, body), from what was deployed there.
pub async fn health(prod: &Path) -> (u16, String) {
    let sha = tokio::fs::read_to_string(prod.join("DEPLOYED_SHA"))
        .await
        .unwrap_or_default();
    let sha = sha.trim();
    match tokio::fs::read_to_string(prod.join("HEALTH")).await {
        Err(_) => (503, "nothing deployed".to_owned()),
        Ok(h) if h.trim() == "ok" => (200, format!("ok: {sha} serves")),
        Ok(h) => (500, format!("{}: {sha}", h.trim())),
    }
}

async fn answer(mut stream: tokio::net::TcpStream, prod: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut words = request.split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/health")) => health(prod).await,
        _ => (404, "not found".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let body = format!("{body}\n");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_endpoint_answers_what_was_deployed() {
        let d = tempfile::tempdir().expect("tmp");
        let prod = d.path().join("prod");
        let ep = HealthEndpoint::start(prod.clone()).await.expect("start");
        let get = |url: String| async move {
            let r = reqwest::get(url).await.expect("GET");
            (r.status().as_u16(), r.text().await.expect("body"))
        };
        assert_eq!(get(ep.url.clone()).await.0, 503);
        std::fs::create_dir_all(&prod).expect("prod");
        std::fs::write(prod.join("DEPLOYED_SHA"), "abc1234\n").expect("sha");
        std::fs::write(prod.join("HEALTH"), "ok\n").expect("health");
        assert_eq!(
            get(ep.url.clone()).await,
            (200, "ok: abc1234 serves\n".to_owned())
        );
        std::fs::write(prod.join("HEALTH"), "failing: broken\n").expect("health");
        assert_eq!(
            get(ep.url.clone()).await,
            (500, "failing: broken: abc1234\n".to_owned())
        );
        let other = ep.url.replace("/health", "/other");
        assert_eq!(get(other).await.0, 404);
    }
}
